"""JSON Lines, the one way metacot reads and appends them: one JSON object a line, every problem named ``file:line``.

Reading (:func:`read_rows`) refuses the whole file with every problem listed, never drops a row silently, except
the one case a crash leaves behind in a file metacot appends to: a torn last line (no newline, not valid JSON),
dropped when the caller says the file is one of those (``torn_tail="drop"``). Appending (:func:`append_rows`) cuts
such a torn line first, then writes each row as one whole line and flushes and fsyncs, so a crash leaves either
complete rows or one torn line that the next read or append removes.

Used for the run folder's ``metrics.jsonl`` and ``cots.jsonl``, evaluation caches, label files, annotation outputs
and score files; dataset records (:func:`metacot.cot.schema.load_records`) add their schema checks on top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Literal

Row = dict[str, Any]
MAX_SHOWN = 50


class JSONLError(ValueError):
    """A JSONL file cannot be read as rows; ``problems`` lists each as ``file:line: what``."""

    def __init__(self, path: Path, problems: list[str], fix: str = "fix or delete those lines") -> None:
        self.path, self.problems = path, problems
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(f"{len(problems)} problem(s) in {path}:\n  {shown}{more}\n{fix}")


def read_rows(path: str | Path, *, torn_tail: Literal["error", "drop"] = "error", missing_ok: bool = False,
              objects: bool = True) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-empty line of ``path``.

    Args:
        torn_tail: "drop" for files metacot appends to: a last line without a newline that does not parse is the
            torn write of a killed process and is left out; "error" treats it like any other bad line.
        missing_ok: a missing file reads as no rows (else FileNotFoundError).
        objects: every value must be a JSON object.

    Raises:
        JSONLError: lines that are not valid JSON (or not objects), each as ``file:line``.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail == "drop" and number == len(lines):  # the last line, without its newline
                continue
            problems.append(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if objects and not isinstance(value, dict):
            problems.append(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            continue
        rows.append((number, value))
    if problems:
        raise JSONLError(path, problems)
    return rows


def read_dicts(path: str | Path, **options: Any) -> list[Row]:
    """The objects of :func:`read_rows` without their line numbers."""
    return [value for _, value in read_rows(path, **options)]


def cut_torn_tail(path: str | Path) -> int:
    """Remove a last line without a newline (a killed write); returns the bytes removed (0: nothing to cut)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "r+b") as handle:
        data = handle.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        handle.truncate(keep)
        os.fsync(handle.fileno())
    return len(data) - keep


def append_rows(path: str | Path, rows: Iterable[Row], *, ensure_ascii: bool = True) -> None:
    """Append ``rows`` as whole lines, crash-safely (module docstring); creates the file if needed."""
    cut_torn_tail(path)
    text = "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
