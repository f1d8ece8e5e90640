"""``metacot eval``: score a model's edits against ground truth, beside the copy and erase baselines.

Examples::

    metacot eval --model runs/quickstart/export --data runs/quickstart/data/test.jsonl --out runs/eval
    metacot eval --model runs/sft/final --data test.jsonl --out runs/eval --method sft --cot-source oracle
        # rows "sft (oracle CoT)": conditioned on the dataset's Meta-CoT instead of the model's own
    metacot eval --model runs/grpo/final --data test.jsonl --out runs/eval --method grpo \
        --judge-url http://127.0.0.1:8000 --judge-model judge --judge-prompt cec_v2   # not the training prompt
    metacot eval --config eval.yaml out=runs/eval-oracle cot_source=oracle   # a YAML of the flags, then overrides
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metacot eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an export (or its pipeline/), a run's final/ or a pipeline folder; omit "
                                        "with --baselines-only")
    parser.add_argument("--data", required=True, help="suite data (for --suite jsonl: a metacot JSONL)")
    parser.add_argument("--suite", default="jsonl", help="suite loader name (default jsonl)")
    parser.add_argument("--split", default=None, help="keep only records of this split")
    parser.add_argument("--out", required=True, help="output folder (samples.jsonl cache, results.json, table.md)")
    parser.add_argument("--method", default="model", help="name of the model's rows (e.g. sft, grpo)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--cfg", type=float, default=1.0, help="true CFG scale")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="resize samples to this square size")
    parser.add_argument("--cot-source", choices=("model", "oracle", "data"), default="model",
                        help="model (default): the model's understanding expert writes the Meta-CoT; oracle: the "
                             "dataset's (rows named '<method> (oracle CoT)'); data: old name of oracle")
    parser.add_argument("--max-cot-tokens", type=int, default=384, help="generation budget of a written Meta-CoT")
    parser.add_argument("--no-cot", action="store_true", help="condition on the instruction alone")
    parser.add_argument("--baselines-only", action="store_true")
    parser.add_argument("--judge-url", default="", help="OpenAI-compatible judge server for an extra judge column")
    parser.add_argument("--judge-model", default="")
    parser.add_argument("--judge-prompt", default="cec_v2", help="use a prompt other than the training reward's")
    parser.add_argument("--judge-mode", default="choice", choices=("parse", "choice", "logprobs"))
    from metacot.cli_config import parse_args

    args = parse_args(parser, argv)  # flags, or --config FILE and key=value (metacot.cli_config)
    if args.model is None and not args.baselines_only:
        parser.error("--model is required unless --baselines-only")
    from metacot.eval.runner import SUITES, format_paper_table, format_table, run_eval

    if args.cot_source == "data":
        print("metacot eval: note: --cot-source data is deprecated, it is now called oracle (the dataset's "
              "Meta-CoT)", file=sys.stderr)
        args.cot_source = "oracle"

    if args.suite not in SUITES:
        print(f"metacot eval: unknown suite {args.suite!r}; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    judge = None
    if args.judge_url:
        from rewards.contract import build_reward

        judge = build_reward("cec_vlm", url=args.judge_url, model=args.judge_model, prompt=args.judge_prompt,
                             mode=args.judge_mode)
    try:
        samples = SUITES[args.suite](args.data, args.split, args.resolution)
        results = run_eval(None if args.baselines_only else args.model, samples, args.out, num_steps=args.steps,
                           cfg_scale=args.cfg, batch_size=args.batch_size, no_cot=args.no_cot,
                           cot_source=args.cot_source, judge=judge, method=args.method,
                           max_cot_tokens=args.max_cot_tokens)
    except (ValueError, FileNotFoundError) as exc:
        print(f"metacot eval: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    print(format_paper_table(results))
    print(f"results: {args.out}/results.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
