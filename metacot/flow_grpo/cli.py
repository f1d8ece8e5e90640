"""``metacot grpo --config FILE [key=value ...]``: Stage 2 Flow-GRPO (see metacot.flow_grpo.trainer).

Examples::

    metacot grpo --config tiny model=runs/sft/final data.train=runs/data/train.jsonl data.eval=runs/data/val.jsonl \
        output_dir=runs/grpo
    accelerate launch --num_processes 8 -m metacot.flow_grpo.cli --config grpo_qwen_image_edit.yaml \
        model=/runs/sft/final judge.url=http://judge:8000 judge.calibration=/runs/calib/calibration.json ...
"""

from __future__ import annotations

import argparse
import sys

from metacot.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metacot grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file or preset name (tiny, qwen_image_edit)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.group_size=8")
    args = parser.parse_args(argv)
    from metacot.flow_grpo.config import GRPOConfig

    try:
        cfg = load_config(GRPOConfig, args.config, args.overrides, stage="grpo")
    except ConfigError as exc:
        print(f"metacot grpo: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from metacot.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from metacot.flow_grpo.gate import CalibrationGateError
    from metacot.flow_grpo.trainer import train
    from metacot.training import PREEMPTED_EXIT_CODE, Preempted

    try:
        final = train(cfg)
    except Preempted as exc:
        print(f"metacot grpo: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (CalibrationGateError, ValueError, FileNotFoundError, TimeoutError) as exc:
        print(f"metacot grpo: {exc}", file=sys.stderr)
        return 1
    print(f"final weights: {final}")
    return 0


if __name__ == "__main__":  # pragma: no cover - used by `accelerate launch -m metacot.flow_grpo.cli`
    sys.exit(main())
