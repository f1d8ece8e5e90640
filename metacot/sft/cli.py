"""``metacot sft --config FILE [key=value ...]``: Stage 1 SFT (see metacot.sft.trainer for what it trains).

Examples::

    metacot sft --config tiny model=runs/tiny/pipeline data.train=runs/data/train.jsonl output_dir=runs/sft
    accelerate launch --num_processes 8 -m metacot.sft.cli --config sft_qwen_image_edit.yaml model=... data.train=...
"""

from __future__ import annotations

import argparse
import sys

from metacot.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metacot sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file or preset name (tiny, qwen_image_edit)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    from metacot.sft.config import SFTConfig

    try:
        cfg = load_config(SFTConfig, args.config, args.overrides, stage="sft")
    except ConfigError as exc:
        print(f"metacot sft: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from metacot.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from metacot.sft.data import SFTDataError
    from metacot.sft.trainer import train
    from metacot.training import PREEMPTED_EXIT_CODE, Preempted

    try:
        final = train(cfg)
    except Preempted as exc:
        print(f"metacot sft: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (SFTDataError, ValueError, FileNotFoundError) as exc:
        print(f"metacot sft: {exc}", file=sys.stderr)
        return 1
    print(f"final weights: {final}")
    return 0


if __name__ == "__main__":  # pragma: no cover - used by `accelerate launch -m metacot.sft.cli`
    sys.exit(main())
