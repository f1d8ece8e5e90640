"""``metacot data ...``: build, import, annotate, mix and check datasets.

Subcommands:

- ``metacot data synth --out DIR --n N --seed S [--resolution R] [--chains K --chain-length L] [--workers W]
  [--overwrite]``: the synthetic scene-edit recipe (:mod:`data_recipes.synth`).
- ``metacot data synth-hypothetical --out DIR --n N --seed S [--resolution R] [--overwrite]``: synthetic physical
  hypothetical instructions with exact ground truth (:mod:`data_recipes.hypothetical`).
- ``metacot data import --format F --in PATH --out DIR [--map COLUMN=FIELD ...] [--split S] [--overwrite]``:
  public editing / understanding datasets -> metacot records (:mod:`data_recipes.importers`).
- ``metacot data annotate --in DATASET --out DIR --server URL [--model NAME] [--verify] [--threshold T]
  [--workers N] [--limit N] [--max-tokens N]``: Meta-CoTs written by a served VLM (:mod:`data_recipes.annotate`).
- ``metacot data hypothetical --in DATASET --out DIR --server URL [--model NAME] [--workers N] [--limit N]
  [--max-tokens N]``: explicit instructions rewritten into hypothetical ones by a served VLM.
- ``metacot data mix --recipe RECIPE.yaml --out DIR [--overwrite]``: a weighted training mixture
  (:mod:`data_recipes.mix`).
- ``metacot data check FILE.jsonl [...] [--no-images]``: validate record files; prints every problem as
  ``file:line: problem``. Edit records without a Meta-CoT (imported, not yet annotated) are valid and counted; a
  file without records is refused. Token budgets depend on the model and the run, so this form does not check them:
- ``metacot data check --stage sft|grpo --config FILE [key=value ...]``: every check the stage runs before loading
  its models, with the same code (``metacot.sft.data.check_inputs``, ``metacot.flow_grpo.preflight.check_inputs``):
  the data of the config (budgets counted with the model folder's tokenizer, ``file:line`` of each record over
  them), and for GRPO the reward specs, ``judge.url`` and the calibration gate. Nothing is written.

Errors print as one line on stderr (or the problem list for ``check``) and return a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from data_recipes.importers import FORMATS

    parser = argparse.ArgumentParser(prog="metacot data", description="Build and check metacot datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="generate the synthetic scene-edit dataset")
    synth.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    synth.add_argument("--n", required=True, type=int, help="edit samples (each also gives one understanding sample)")
    synth.add_argument("--seed", required=True, type=int, help="same seed and settings: byte-identical output")
    synth.add_argument("--resolution", type=int, default=32, help="image side in pixels (default 32; 64+ for GPU)")
    synth.add_argument("--chains", type=int, default=0, help="number of edit chains (default 0)")
    synth.add_argument("--chain-length", type=int, default=3, help="steps per chain (default 3)")
    synth.add_argument("--workers", type=int, default=1,
                       help="processes (default 1; more pay off only on many cores; output is the same)")
    synth.add_argument("--overwrite", action="store_true", help="replace --out once the new dataset is complete")

    hyp = sub.add_parser("synth-hypothetical", help="synthetic physical hypothetical-instruction edits")
    hyp.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    hyp.add_argument("--n", required=True, type=int, help="edit samples")
    hyp.add_argument("--seed", required=True, type=int, help="same seed and settings: byte-identical output")
    hyp.add_argument("--resolution", type=int, default=32, help="image side in pixels (default 32, at least 32)")
    hyp.add_argument("--overwrite", action="store_true", help="replace --out once the new dataset is complete")

    imp = sub.add_parser("import", help="import a parquet / JSONL / datasets folder into metacot records")
    imp.add_argument("--format", required=True, choices=FORMATS, help="column preset and record kind")
    imp.add_argument("--in", dest="source", required=True, type=Path, help="parquet, JSONL or save_to_disk folder")
    imp.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    imp.add_argument("--map", action="append", default=[], metavar="COLUMN=FIELD",
                     help="which record field a column fills (repeatable; overrides the preset)")
    imp.add_argument("--split", default="train", help="split of inputs that carry none (default train)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out once the new dataset is complete")

    for name, text in (("annotate", "write Meta-CoTs with a served VLM (resumable)"),
                       ("hypothetical", "rewrite instructions into hypothetical ones with a served VLM (resumable)")):
        served = sub.add_parser(name, help=text)
        served.add_argument("--in", dest="source", required=True, type=Path, help="JSONL file or dataset folder")
        served.add_argument("--out", required=True, type=Path, help="output folder; an existing one is resumed")
        served.add_argument("--server", required=True, help="server root URL, e.g. http://127.0.0.1:8000")
        served.add_argument("--model", default=None, help="served model name (default: the server's only model)")
        served.add_argument("--workers", type=int, default=8, help="requests in flight (default 8)")
        served.add_argument("--limit", type=int, default=None, help="process only the first N selected samples")
        served.add_argument("--max-tokens", type=int, default=1024 if name == "annotate" else 256,
                            help="reply budget per request (must fit the server's context with the prompt)")
        if name == "annotate":
            served.add_argument("--verify", action="store_true", help="score each CoT against the image pair")
            served.add_argument("--threshold", type=float, default=6.0,
                                help="with --verify: keep samples scoring at least this (0-10, default 6)")

    mix = sub.add_parser("mix", help="mix record files by a recipe YAML")
    mix.add_argument("--recipe", required=True, type=Path, help="recipe YAML (see data_recipes/mix.py)")
    mix.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    mix.add_argument("--overwrite", action="store_true", help="replace --out once the new mixture is complete")

    check = sub.add_parser("check", help="validate JSONL record files and their images, or a stage's inputs")
    check.add_argument("files", nargs="*", help="JSONL files; with --stage: key=value overrides of the config")
    check.add_argument("--no-images", action="store_true", help="skip opening image files")
    check.add_argument("--stage", choices=("sft", "grpo"), help="run the stage's own checks of --config's inputs")
    check.add_argument("--config", help="with --stage: the stage's YAML file or preset name")
    return parser


def _synth(args: argparse.Namespace) -> int:
    from data_recipes.synth import generate

    start = time.perf_counter()
    manifest = generate(args.out, args.n, args.seed, resolution=args.resolution, chains=args.chains,
                        chain_length=args.chain_length, workers=args.workers, overwrite=args.overwrite,
                        progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    splits = manifest["counts"]["splits"]
    summary = ", ".join(f"{s}: {c.get('edit', 0)} edit + {c.get('understanding', 0)} understanding"
                        for s, c in splits.items())
    print(f"wrote {args.out} in {seconds:.1f} s ({manifest['files']} files; {summary})")
    print(f"content sha256 {manifest['content_sha256']}")
    return 0


def _synth_hypothetical(args: argparse.Namespace) -> int:
    from data_recipes.hypothetical import generate_hypothetical

    start = time.perf_counter()
    manifest = generate_hypothetical(args.out, args.n, args.seed, resolution=args.resolution,
                                     overwrite=args.overwrite)
    counts = manifest["counts"]
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {json.dumps(counts['splits'])}, categories "
          f"{json.dumps(counts['categories'])}, meta-tasks {json.dumps(counts['meta_tasks'])}")
    print(f"content sha256 {manifest['content_sha256']}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from data_recipes.importers import import_dataset, parse_maps

    start = time.perf_counter()
    manifest = import_dataset(args.format, args.source, args.out, maps=parse_maps(args.map), split=args.split,
                              overwrite=args.overwrite, progress=sys.stderr.isatty())
    total = sum(manifest["counts"].values())
    print(f"imported {total} records ({json.dumps(manifest['counts'])}, {manifest['images']} images, "
          f"{manifest['chains']} chains) into {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _served(args: argparse.Namespace) -> int:
    if args.command == "annotate":
        from data_recipes.annotate import annotate

        summary, manifest = annotate(args.source, args.out, args.server, model=args.model, verify=args.verify,
                                     threshold=args.threshold, workers=args.workers, limit=args.limit,
                                     max_tokens=args.max_tokens, progress=True,
                                     log=lambda m: print(m, file=sys.stderr))
    else:
        from data_recipes.hypothetical import rewrite_hypothetical

        summary, manifest = rewrite_hypothetical(args.source, args.out, args.server, model=args.model,
                                                 workers=args.workers, limit=args.limit, max_tokens=args.max_tokens,
                                                 progress=True, log=lambda m: print(m, file=sys.stderr))
    counts = manifest["counts"]
    print(f"{args.command}: {summary.line()}")
    print(f"{args.out}: records {json.dumps(counts['records'])}, filtered {counts['filtered']}, failed "
          f"{counts['failed']} {json.dumps(counts['failure_reasons'])} (see failed.jsonl, manifest.json)")
    return 0


def _mix(args: argparse.Namespace) -> int:
    from data_recipes.mix import mix

    manifest = mix(args.recipe, args.out, overwrite=args.overwrite)
    counts = manifest["counts"]
    print(f"wrote {args.out}: {counts['total']} samples {json.dumps(counts['kinds'])}; per source "
          f"{json.dumps({k: v['drawn'] for k, v in counts['sources'].items()})}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from data_recipes.importers import load_dataset_records
    from metacot.cot.schema import DataError, EditRecord

    if args.stage:
        return _check_stage(args)
    if not args.files:
        print("metacot data check: name JSONL files, or --stage sft|grpo --config FILE", file=sys.stderr)
        return 2
    failed = False
    for path in map(Path, args.files):
        try:
            records = load_dataset_records(path, check_images=not args.no_images)
        except DataError as err:
            print("\n".join(err.problems), file=sys.stderr)
            failed = True
            continue
        if not records:
            print(f"{path}: no records; an empty file cannot train anything", file=sys.stderr)
            failed = True
            continue
        kinds = Counter(type(r).__name__ for r in records)
        without = sum(1 for r in records if isinstance(r, EditRecord) and r.cot is None)
        note = f"; edit records without a Meta-CoT: {without} (annotate them before SFT)" if without else ""
        print(f"{path}: ok, {json.dumps(dict(sorted(kinds.items())))}{note}; token budgets depend on the model: "
              f"check them with --stage sft|grpo --config FILE")
    return 1 if failed else 0


def _check_stage(args: argparse.Namespace) -> int:
    """The stage's own pre-model checks of a config's inputs (one line per problem, exit 1; config errors exit 2)."""
    from metacot.config import ConfigError, load_config
    from metacot.cot.schema import DataError

    if args.stage == "sft":
        from metacot.sft.config import SFTConfig as schema
        from metacot.sft.data import check_inputs
    else:
        from metacot.flow_grpo.config import GRPOConfig as schema
        from metacot.flow_grpo.preflight import check_inputs
    try:
        cfg = load_config(schema, args.config, args.files, stage=args.stage)
        check_inputs(cfg)
    except ConfigError as err:
        print(f"metacot data check: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print("\n".join(err.problems), file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as err:  # the gate, the Stage 1 facts, the model folder
        print(f"metacot data check: {err}", file=sys.stderr)
        return 1
    print(f"{args.stage} inputs of {args.config or 'the defaults'}: ok (the checks `metacot {args.stage}` runs "
          f"before loading its models)")
    return 0


_COMMANDS = {"synth": _synth, "synth-hypothetical": _synth_hypothetical, "import": _import, "annotate": _served,
             "hypothetical": _served, "mix": _mix, "check": _check}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``metacot data``; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2): return the code instead
        return int(exit_.code or 0)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError) as err:
        hint = ""
        if type(err).__name__ == "ServerUnavailable":
            hint = " (finished samples are kept; rerun the same command to resume)"
        print(f"metacot data {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
