"""``metacot experiment NAME ...``: run an experiment (``ablation``; see :mod:`metacot.experiments.ablation`)."""

from __future__ import annotations

import sys

EXPERIMENTS = {"ablation": "metacot.experiments.ablation"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        print(f"usage: metacot experiment {{{','.join(EXPERIMENTS)}}} [--preset NAME] [key=value ...]",
              file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    import importlib

    return int(importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
