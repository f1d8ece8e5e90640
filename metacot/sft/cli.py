"""``metacot sft --config FILE [key=value ...]``: Stage 1 SFT (see metacot.sft.trainer for what it trains).

Examples::

    metacot sft --config tiny model=runs/tiny/pipeline data.train=runs/data/train.jsonl output_dir=runs/sft
    accelerate launch --num_processes 8 -m metacot.sft.cli --config sft_qwen_image_edit.yaml model=... data.train=...
"""

from __future__ import annotations

import sys

from metacot.stage_cli import run_stage


def main(argv: list[str] | None = None) -> int:
    from metacot.cot.schema import DataError
    from metacot.sft.config import SFTConfig
    from metacot.sft.trainer import train

    return run_stage(argv, prog="metacot sft", doc=__doc__, schema=SFTConfig, stage="sft", train=train,
                     refusals=(DataError, ValueError, FileNotFoundError))


if __name__ == "__main__":  # pragma: no cover - used by `accelerate launch -m metacot.sft.cli`
    sys.exit(main())
