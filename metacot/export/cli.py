"""``metacot export RUN_DIR --out DIR``: a run's weights as folders that plain diffusers / transformers load.

Examples::

    metacot export runs/grpo --out exports/grpo                       # final/, LoRA merged, bf16, verified
    metacot export runs/sft --out exports/sft-lora --keep-lora        # peft adapters beside the base weights
    metacot export runs/sft --out exports/sft-200 --step 200 --dtype fp32 --check-against runs/sft
    metacot export runs/sft --config export.yaml out=exports/sft-b       # a YAML of the flags, then overrides

What ``DIR`` holds: ``pipeline/`` (a QwenImageEditPipeline folder), ``understanding/`` (the Meta-CoT writer as a
transformers folder), ``adapters/`` (with --keep-lora), ``README.md`` (model card), ``metacot.json``, ``report/``.
Every export is reloaded in a fresh process without metacot and must produce a finite 2-step edit before it appears.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metacot export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (output_dir of metacot sft / grpo)")
    parser.add_argument("--out", required=True, help="export folder to create")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", dest="keep_lora", action="store_false",
                      help="merge LoRA adapters into the weights (default)")
    lora.add_argument("--keep-lora", dest="keep_lora", action="store_true",
                      help="keep LoRA experts as peft adapters in adapters/, beside their base weights")
    parser.set_defaults(keep_lora=False)
    parser.add_argument("--step", type=int, default=None,
                        help="export the complete checkpoint checkpoints/step-N instead of final/")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the saved weights")
    parser.add_argument("--check-against", default=None, metavar="RUN_DIR",
                        help="compare the written weights with this run's (merged LoRA recomputed as W + alpha/r BA)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (only once the new export is complete and verified)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from metacot.cli_config import parse_args

    args = parse_args(build_parser(), argv)  # flags, or --config FILE and key=value (metacot.cli_config)
    from metacot.export.exporter import export_run
    from metacot.export.source import ExportError
    from metacot.export.verify import VerificationError
    from metacot.run import RunError

    try:
        result = export_run(args.run, args.out, keep_lora=args.keep_lora, step=args.step, dtype=args.dtype,
                            check_against_run=args.check_against, overwrite=args.overwrite)
    except (ExportError, VerificationError, RunError, OSError) as exc:
        print(f"metacot export: {exc}", file=sys.stderr)
        return 1
    facts = result.facts
    smoke, layout = facts["verification"]["smoke"], facts["layout"]
    checked = facts["verification"].get("check_against")
    print(f"exported {facts['source']['run']} ({facts['source']['stage']}, {facts['source']['weights']}, step "
          f"{facts['source']['step']}) -> {result.out} in {result.seconds:.1f} s")
    print(f"  pipeline/ {layout['dtype']}, LoRA {layout['lora']}; understanding/ {layout['understanding']['files']}")
    print(f"  fresh-process check: {smoke['image_shape'][1]}px edit finite, {smoke['seconds']} s on {smoke['device']}")
    if checked:
        tensors = sum(f["tensors"] for f in checked["folders"].values())
        merged = sum(f.get("lora_merged", 0) for f in checked["folders"].values())
        print(f"  weights match {checked['run']}: {tensors} tensors, {merged} merged LoRA weights recomputed")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
