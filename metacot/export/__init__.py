"""Export trained runs for users without metacot, and edit images with an export (``metacot export`` / ``edit``).

- :mod:`.source`: which weights (a run's ``final/`` or a consolidated DeepSpeed checkpoint).
- :mod:`.layout`: ``pipeline/`` (diffusers), ``understanding/`` (transformers), ``adapters/`` (peft).
- :mod:`.verify`: fresh-process smoke test without metacot; weight comparison with the run.
- :mod:`.card`: ``README.md`` model card and ``metacot.json`` provenance.
- :mod:`.exporter`: :func:`export_run`, the whole export, atomic.
- :mod:`.edit`: ``metacot edit``, Meta-CoT then edit, on an export or a run's ``final/``.

Nothing is imported here, so ``metacot export --help`` starts without torch.
"""
