"""``metacot grpo --config FILE [key=value ...]``: Stage 2 Flow-GRPO (see metacot.flow_grpo.trainer).

Examples::

    metacot grpo --config tiny model=runs/sft/final data.train=runs/data/train.jsonl data.eval=runs/data/val.jsonl \
        output_dir=runs/grpo
    accelerate launch --num_processes 8 -m metacot.flow_grpo.cli --config grpo_qwen_image_edit.yaml \
        model=/runs/sft/final judge.url=http://judge:8000 judge.calibration=/runs/calib/calibration.json ...
"""

from __future__ import annotations

import sys

from metacot.stage_cli import run_stage


def main(argv: list[str] | None = None) -> int:
    from metacot.cot.schema import DataError
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.gate import CalibrationGateError
    from metacot.flow_grpo.trainer import UnscoredError, train
    from metacot.training import RankFailure
    from rewards.client import JudgeError

    return run_stage(argv, prog="metacot grpo", doc=__doc__, schema=GRPOConfig, stage="grpo", train=train,
                     refusals=(CalibrationGateError, DataError, ValueError, FileNotFoundError, TimeoutError,
                               JudgeError, UnscoredError, RankFailure))


if __name__ == "__main__":  # pragma: no cover - used by `accelerate launch -m metacot.flow_grpo.cli`
    sys.exit(main())
