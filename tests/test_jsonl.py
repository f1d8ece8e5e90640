"""``metacot.jsonl``: the one reader (every problem as file:line; a torn tail dropped only where asked) and the one
crash-safe appender (cuts a torn tail before it writes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metacot.eval.runner import _done
from metacot.jsonl import JSONLError, append_rows, read_dicts, read_rows

TORN = '{"id": "a", "method": "sft"}\n{"id": "b", "method": "sft"}\n{"id": "c", "met'


def test_every_bad_line_is_named_and_nothing_is_dropped_silently(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n{"a": \n{"a": 4}\n')
    with pytest.raises(JSONLError) as err:
        read_rows(path)
    assert err.value.problems == [f"{path}:3: expected a JSON object, got list",
                                  f"{path}:4: not valid JSON (Expecting value at column 7)"]
    assert read_rows(path.with_name("none.jsonl"), missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_rows(path.with_name("none.jsonl"))


def test_a_torn_tail_is_dropped_only_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(TORN)
    with pytest.raises(JSONLError, match=r"m.jsonl:3: not valid JSON"):
        read_rows(path)
    assert [r["id"] for r in read_dicts(path, torn_tail="drop")] == ["a", "b"]
    path.write_text('{"id": "a"}\n{"id": "b\n{"id": "c"}\n')  # broken in the middle: damage, not a torn write
    with pytest.raises(JSONLError, match=r"m.jsonl:2: not valid JSON"):
        read_rows(path, torn_tail="drop")


def test_append_cuts_a_torn_tail_so_a_resumed_cache_stays_readable(tmp_path: Path) -> None:
    """An evaluation killed mid-write: the resume recomputes the torn sample and appends; before, the new rows were
    glued to the torn line and the cache no longer parsed."""
    cache = tmp_path / "samples.jsonl"
    cache.write_text(TORN)
    assert _done(cache) == {("a", "sft"), ("b", "sft")}
    append_rows(cache, [{"id": "c", "method": "sft"}, {"id": "d", "method": "sft"}])
    assert [r["id"] for r in read_dicts(cache)] == ["a", "b", "c", "d"]
    assert cache.read_text().endswith("\n")
