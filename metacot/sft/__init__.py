"""Stage 1 SFT of the understanding and generation experts (see :mod:`metacot.sft.trainer`)."""
