"""The command-line shape both training stages share: ``--config FILE [key=value ...]``, ``--print-config``.

Exit codes: 0 done; 1 the run refused its inputs (data, gate, missing files) or failed with a known cause (the run
folder in use by another run, a save failure such as a full disk, an unreachable or refusing judge, a reward that
scored too little), printed as one line; 2 a config error, found before or after loading (a wrong key in
``rewards.*``, a malformed ``judge.url``); 75 (``PREEMPTED_EXIT_CODE``) stopped by a signal after saving a checkpoint.
The SLURM templates (``launch/slurm/lib.sh``) requeue on 75 only: every other non-zero code fails the job with its
log, since running the same inputs again would fail the same way (resubmit once the cause is fixed: it resumes).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def run_stage(argv: list[str] | None, *, prog: str, doc: str | None, schema: type, stage: str,
              train: Callable[[Any], Any], refusals: tuple[type[BaseException], ...]) -> int:
    """Parse, load and validate the stage config, then call ``train(cfg)``; errors become one line on stderr."""
    from metacot.config import ConfigError, load_config, to_yaml
    from metacot.run import RunError
    from metacot.training import PREEMPTED_EXIT_CODE, Preempted

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file or preset name (tiny, qwen_image_edit)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides, stage=stage)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    try:
        final = train(cfg)
    except Preempted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (RunError, *refusals) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(f"final weights: {final}")
    return 0
