"""``accelerate launch tests/signal_one_rank.py ARGS``: ``metacot sft`` in which ONE rank gets SIGUSR1 right after a
given step (``METACOT_TEST_SIGNAL=rank:step``), for tests/test_multirank.py.

The signal is real (``os.kill`` of that rank's own process, handled by the trainer's real handler); only its timing is
injected, by wrapping ``train_step``: from outside, a signal cannot be aimed at one rank between two given steps.
"""

from __future__ import annotations

import os
import signal
import sys

from metacot.sft import trainer
from metacot.sft.cli import main

RANK, AT = (int(x) for x in os.environ["METACOT_TEST_SIGNAL"].split(":"))
_real_step = trainer.train_step


def _step(state: trainer.SFTState) -> dict[str, float]:
    out = _real_step(state)
    if state.step == AT and int(os.environ.get("RANK", "0")) == RANK:
        os.kill(os.getpid(), signal.SIGUSR1)
    return out


trainer.train_step = _step
sys.exit(main(sys.argv[1:]))
