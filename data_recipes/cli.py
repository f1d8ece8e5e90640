"""``metacot data ...``: build and check datasets.

Subcommands:

- ``metacot data synth --out DIR --n N --seed S [--resolution R] [--chains K --chain-length L] [--workers W]
  [--overwrite]``: the synthetic scene-edit recipe (:mod:`data_recipes.synth`).
- ``metacot data check FILE.jsonl [...] [--no-images]``: validate record files; prints every problem as
  ``file:line: problem``.

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
    check = sub.add_parser("check", help="validate JSONL record files and their images")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument("--no-images", action="store_true", help="skip opening image files")
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


def _check(args: argparse.Namespace) -> int:
    from metacot.cot.schema import DataError, load_records

    failed = False
    for path in args.files:
        try:
            records = load_records(path, check_images=not args.no_images)
        except DataError as err:
            print("\n".join(err.problems), file=sys.stderr)
            failed = True
            continue
        kinds = Counter(type(r).__name__ for r in records)
        print(f"{path}: ok, {json.dumps(dict(sorted(kinds.items())))}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``metacot data``; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2): return the code instead
        return int(exit_.code or 0)
    try:
        return _synth(args) if args.command == "synth" else _check(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"metacot data {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
