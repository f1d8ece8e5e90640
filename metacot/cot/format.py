"""The Meta-CoT record and its text form: what the understanding expert learns to write before an edit.

A :class:`MetaCoT` holds the three steps of the method (task summary, task thinking, target traversal) with the
(task, target, understanding) triplet inside the summary and the task expressed as meta-tasks. :func:`render`
turns it into text, :func:`parse` reads that text back strictly (``parse(render(x)) == x`` for every valid record)
and :func:`parse_lenient` recovers what it can from model output. Rendered example::

    ### Meta-task summary
    Meta-tasks: Replace
    Task: recolour
    Targets: the red circle
    Understanding: localization; color recognition
    ### Task thinking
    Recolouring replaces one attribute: the red circle keeps its shape, size and place and turns blue.
    ### Target traversal
    - the red circle: changed, becomes blue
    - the blue square: kept

Escaping: free text is written on one line. Inside any free-text field ``\\`` -> ``\\\\``, newline -> ``\\n``,
carriage return -> ``\\r`` and ``#`` -> ``\\#`` (so no field can start a line that looks like a section marker);
list items (meta-tasks, targets, understanding, separated by ``"; "``) also escape ``;`` and traversal names
(ended by ``": "``) also escape ``:``. Nothing else is escaped, so ordinary text stays readable.

Token budget: the rendered CoT is encoded together with the instruction by the condition encoder, whose stock
pipeline encodes at most 512 tokens. :func:`cot_token_lengths` measures rendered lengths. Measured on the synthetic
recipe with the tiny 1k-vocabulary BPE of ``metacot.models.tiny`` as of 2026-11-23 (2,200 single edits, 300
chains per length; re-measure with :func:`cot_token_lengths` when the tokenizer changes):

=====================  ===========================  ===========================
records                CoT: min / mean / p99 / max  CoT + instruction: p99 / max
=====================  ===========================  ===========================
single edits           101 / 147 / 250 / 255        264 / 275
whole chain, 3 steps   211 / 278 / 354 / 365        415 / 427
whole chain, 5 steps   298 / 360 / 408 / 414        487 / 492
=====================  ===========================  ===========================

(Whitespace words: single-edit CoTs 54-122; the tiny BPE spends about 1.9 tokens per word, Qwen's tokenizer far
fewer.) How long scenes are kept short: at most 5 objects per scene (6 after an edit that adds), kept objects
take one short ``- name: kept`` line, camera motions name ``the whole view`` as the single target, and whole-chain
records whose instruction + CoT exceed 240 words are redrawn (``data_recipes.synth_chains.COT_WORD_BUDGET``), which
caps chains at about 5 steps.

Deliberately left out: free-form (non-Meta-CoT) reasoning, localisation boxes inside the CoT (understanding is
trained from separate understanding samples), and any repair of strict input (:func:`parse` never guesses).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class MetaTask(str, Enum):
    """The five meta-tasks every single-image edit is composed of."""

    ADD = "Add"
    REMOVE = "Remove"
    REPLACE = "Replace"
    CAMERA_MOTION = "Camera Motion"
    POSITION_CHANGE = "Position Change"


class CoTParseError(ValueError):
    """Text or a dict is not a valid Meta-CoT. ``section`` names where (e.g. ``"target traversal"``)."""

    def __init__(self, section: str, message: str) -> None:
        super().__init__(f"{section}: {message}")
        self.section = section


@dataclass(frozen=True)
class TargetEntry:
    """One object of the image in the target traversal.

    Attributes:
        name: how the CoT refers to the object, e.g. ``"the red circle"`` (non-empty).
        changed: whether the edit changes it.
        how: what happens to it; required when changed, ``""`` allowed when kept.
    """

    name: str
    changed: bool
    how: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TargetEntry.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.changed, bool):
            raise ValueError(f"TargetEntry.changed must be a bool, got {self.changed!r} for {self.name!r}")
        if not isinstance(self.how, str):
            raise ValueError(f"TargetEntry.how must be a string, got {self.how!r} for {self.name!r}")
        if self.changed and not self.how:
            raise ValueError(f"TargetEntry {self.name!r} is changed, so `how` must say how (it is empty)")


@dataclass(frozen=True)
class MetaCoT:
    """A Meta-CoT: meta-task summary with the (task, targets, understanding) triplet, task thinking, traversal.

    Attributes:
        meta_tasks: step 1, the meta-tasks the edit is composed of, in order (non-empty; repeats allowed, e.g. a
            swap is two Position Changes).
        task: step 1, the task in words, e.g. ``"recolour"`` (non-empty).
        targets: the triplet's target(s), e.g. ``("the red circle",)``.
        understanding: the triplet's required understanding, e.g. ``("localization", "color recognition")``.
        thinking: step 2, the task thinking (may be empty: :func:`parse_lenient` returns that when the section
            is missing; the recipes always write it).
        traversal: step 3, every object of the image, changed or kept.

    Sequences are stored as tuples and meta-task names as :class:`MetaTask` (lists and valid names are accepted
    and converted, so records built in code compare equal to parsed ones). Invalid values raise ValueError.
    """

    meta_tasks: tuple[MetaTask, ...]
    task: str
    targets: tuple[str, ...]
    understanding: tuple[str, ...]
    thinking: str
    traversal: tuple[TargetEntry, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta_tasks", tuple(_meta_task(m) for m in _as_tuple(self.meta_tasks, "meta_tasks")))
        if not self.meta_tasks:
            raise ValueError("MetaCoT.meta_tasks must name at least one meta-task")
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"MetaCoT.task must be a non-empty string, got {self.task!r}")
        for name in ("targets", "understanding"):
            items = _as_tuple(getattr(self, name), name)
            if not all(isinstance(i, str) and i for i in items):
                raise ValueError(f"MetaCoT.{name} items must be non-empty strings, got {items!r}")
            object.__setattr__(self, name, items)
        if not isinstance(self.thinking, str):
            raise ValueError(f"MetaCoT.thinking must be a string, got {type(self.thinking).__name__}")
        traversal = _as_tuple(self.traversal, "traversal")
        if not all(isinstance(e, TargetEntry) for e in traversal):
            raise ValueError("MetaCoT.traversal items must be TargetEntry (use from_dict for plain dicts)")
        object.__setattr__(self, "traversal", traversal)


@dataclass(frozen=True)
class LenientResult:
    """What :func:`parse_lenient` recovered: the record (None if too little was readable) and what went wrong."""

    cot: MetaCoT | None
    problems: list[str]


def _as_tuple(value: Any, name: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"MetaCoT.{name} must be a tuple or list, got {type(value).__name__}")
    return tuple(value)


def _meta_task(value: Any) -> MetaTask:
    try:
        return MetaTask(value)
    except ValueError:
        valid = ", ".join(m.value for m in MetaTask)
        raise ValueError(f"unknown meta-task {value!r}; valid names: {valid}") from None


# ----------------------------------------------------------------------------------------------------- rendering
SUMMARY, THINKING, TRAVERSAL = "meta-task summary", "task thinking", "target traversal"
MARKERS = {SUMMARY: "### Meta-task summary", THINKING: "### Task thinking", TRAVERSAL: "### Target traversal"}
_KEYS = (("meta_tasks", "Meta-tasks:"), ("task", "Task:"), ("targets", "Targets:"), ("understanding", "Understanding:"))
_BASE_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "#": "\\#"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "#": "#", ";": ";", ":": ":"}


_ESCAPE_TABLES = {extra: str.maketrans({**_BASE_ESCAPES, **{c: "\\" + c for c in extra}}) for extra in ("", ";", ":")}


def _escape(text: str, extra: str = "") -> str:
    return text.translate(_ESCAPE_TABLES[extra])


def _unescape(text: str, strict: bool = True) -> str:
    """Undo :func:`_escape`. Strict: an unknown or dangling escape raises ValueError; lenient keeps it as is."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt in _UNESCAPES and nxt:
                out.append(_UNESCAPES[nxt])
                i += 2
                continue
            if strict:
                raise ValueError(f"invalid escape {text[i:i + 2]!r} at column {i + 1}")
        out.append(char)
        i += 1
    return "".join(out)


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split at ``sep`` characters that are not escaped (pieces keep their escapes)."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    pieces.append(text[start:])
    return pieces


def _render_list(items: Iterable[str]) -> str:
    return "; ".join(_escape(i, ";") for i in items)


def _render_entry(entry: TargetEntry) -> str:
    line = f"- {_escape(entry.name, ':')}: {'changed' if entry.changed else 'kept'}"
    return f"{line}, {_escape(entry.how)}" if entry.how else line


def render(cot: MetaCoT) -> str:
    """The text the understanding expert learns to write (no trailing newline); see the module docstring."""
    values = {
        "meta_tasks": _render_list(m.value for m in cot.meta_tasks),
        "task": _escape(cot.task),
        "targets": _render_list(cot.targets),
        "understanding": _render_list(cot.understanding),
    }
    lines = [MARKERS[SUMMARY]]
    lines += [f"{key} {values[name]}" if values[name] else key for name, key in _KEYS]
    lines += [MARKERS[THINKING], _escape(cot.thinking), MARKERS[TRAVERSAL]]
    lines += [_render_entry(e) for e in cot.traversal]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ strict parsing
def parse(text: str) -> MetaCoT:
    """Read text written by :func:`render` (one trailing newline tolerated); never guesses.

    Raises:
        CoTParseError: the text deviates from the format; ``section`` says where and the message what was expected.
    """
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    _expect_line(lines, 0, MARKERS[SUMMARY], SUMMARY)
    raw: dict[str, Any] = {}
    for offset, (name, key) in enumerate(_KEYS, start=1):
        raw[name] = _parse_key_line(lines, offset, name, key)
    _expect_line(lines, 5, MARKERS[THINKING], THINKING)
    if len(lines) < 7:
        raise CoTParseError(THINKING, "the thinking line is missing (an empty thinking is an empty line)")
    thinking = _strict_unescape(lines[6], THINKING, 7)
    _expect_line(lines, 7, MARKERS[TRAVERSAL], TRAVERSAL)
    traversal = tuple(_parse_entry(line, number) for number, line in enumerate(lines[8:], start=9))
    try:
        meta_tasks = tuple(_meta_task(m) for m in raw["meta_tasks"])
    except ValueError as err:
        raise CoTParseError(SUMMARY, str(err)) from None
    try:
        return MetaCoT(meta_tasks, raw["task"], raw["targets"], raw["understanding"], thinking, traversal)
    except ValueError as err:
        raise CoTParseError(SUMMARY, str(err)) from None


def _expect_line(lines: Sequence[str], index: int, expected: str, section: str) -> None:
    got = lines[index] if index < len(lines) else None
    if got != expected:
        found = "the end of the text" if got is None else repr(got[:80])
        raise CoTParseError(section, f"line {index + 1}: expected {expected!r}, found {found}")


def _strict_unescape(text: str, section: str, number: int) -> str:
    try:
        return _unescape(text, strict=True)
    except ValueError as err:
        raise CoTParseError(section, f"line {number}: {err}") from None


def _parse_key_line(lines: Sequence[str], index: int, name: str, key: str) -> Any:
    line = lines[index] if index < len(lines) else ""
    if line == key and name != "task":
        return ()
    if not line.startswith(key + " "):
        raise CoTParseError(SUMMARY, f"line {index + 1}: expected a line starting {key + ' '!r}, found {line[:80]!r}")
    value = line[len(key) + 1 :]
    if name == "task":
        return _strict_unescape(value, SUMMARY, index + 1)
    pieces = _split_unescaped(value, ";")
    items = [pieces[0]]
    for piece in pieces[1:]:
        if not piece.startswith(" "):
            raise CoTParseError(SUMMARY, f"line {index + 1}: list items are separated by '; ', found {value[:80]!r}")
        items.append(piece[1:])
    if any(not item for item in items):
        raise CoTParseError(SUMMARY, f"line {index + 1}: empty item in {key} {value[:80]!r}")
    return tuple(_strict_unescape(item, SUMMARY, index + 1) for item in items)


def _parse_entry(line: str, number: int) -> TargetEntry:
    if not line.startswith("- "):
        raise CoTParseError(
            TRAVERSAL, f"line {number}: expected '- NAME: changed, HOW' or '- NAME: kept', found {line[:80]!r}"
        )
    pieces = _split_unescaped(line[2:], ":")
    rest = ":".join(pieces[1:])
    if len(pieces) < 2 or not rest.startswith(" "):
        raise CoTParseError(TRAVERSAL, f"line {number}: expected 'NAME: STATUS' after '- ', found {line[:80]!r}")
    name = _strict_unescape(pieces[0], TRAVERSAL, number)
    status, sep, how = rest[1:].partition(", ")
    if status not in ("changed", "kept") or (sep and not how):
        raise CoTParseError(
            TRAVERSAL, f"line {number}: status must be 'changed, HOW', 'kept' or 'kept, HOW', found {rest[1:80]!r}"
        )
    try:
        return TargetEntry(name, status == "changed", _strict_unescape(how, TRAVERSAL, number))
    except ValueError as err:
        raise CoTParseError(TRAVERSAL, f"line {number}: {err}") from None


# ----------------------------------------------------------------------------------------------- lenient parsing
_HEADER = re.compile(r"^[\s#*]*(meta[- ]?task summary|task summary|summary|task thinking|thinking|target traversal|"
                     r"traversal)[\s*:]*$", re.IGNORECASE)
_HEADER_SECTION = {"meta-task summary": SUMMARY, "metatask summary": SUMMARY, "meta task summary": SUMMARY,
                   "task summary": SUMMARY, "summary": SUMMARY, "task thinking": THINKING, "thinking": THINKING,
                   "target traversal": TRAVERSAL, "traversal": TRAVERSAL}
_SUMMARY_KEYS = {"metatasks": "meta_tasks", "metatask": "meta_tasks", "task": "task", "targets": "targets",
                 "target": "targets", "understanding": "understanding"}
_STATUS = re.compile(r"^\s*(changed|kept|unchanged)\b\s*[,;:\-]?\s*(.*)$", re.IGNORECASE | re.DOTALL)


def _squash(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


_META_BY_SQUASHED = {_squash(m.value): m for m in MetaTask}


def parse_lenient(text: str) -> LenientResult:
    """Recover a Meta-CoT from model output and list everything that could not be read.

    Accepts what :func:`parse` accepts with no problems; beyond that it tolerates text before the first section,
    headers without ``###`` or in other case, CRLF, sections out of order, extra spaces, meta-task names in other
    case or spelling (``position change``), ``unchanged`` for ``kept``, and unknown escapes. ``cot`` is None when
    no meta-task or no task could be read; otherwise unreadable parts are dropped and named in ``problems``.
    """
    try:
        return LenientResult(parse(text), [])
    except CoTParseError:
        pass
    problems: list[str] = []
    sections = _split_sections(text.replace("\r\n", "\n"), problems)
    summary = _lenient_summary(sections.get(SUMMARY, []), problems)
    thinking = "\n".join(_unescape(line, strict=False) for line in sections.get(THINKING, [])).strip()
    traversal = _lenient_traversal(sections.get(TRAVERSAL, []), problems)
    if not summary["meta_tasks"]:
        problems.append(f"{SUMMARY}: no known meta-task found")
    if not summary["task"]:
        problems.append(f"{SUMMARY}: no task found")
    if not summary["meta_tasks"] or not summary["task"]:
        return LenientResult(None, problems)
    cot = MetaCoT(summary["meta_tasks"], summary["task"], summary["targets"], summary["understanding"], thinking,
                  traversal)
    return LenientResult(cot, problems)


def _split_sections(text: str, problems: list[str]) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: str | None = None
    preamble = False
    for line in text.split("\n"):
        match = _HEADER.match(line)
        if match:
            current = _HEADER_SECTION[re.sub(r"\s+", " ", match.group(1).lower())]
            if current in sections:
                problems.append(f"{current}: section appears more than once; the later copy is ignored")
                current = "ignored"
            sections.setdefault(current, [])
            continue
        if current is None:
            preamble = preamble or bool(line.strip())
            continue
        if line.strip() or current == THINKING:
            sections[current].append(line)
    sections.pop("ignored", None)
    if preamble:
        problems.append("text before the first section was ignored")
    for name in (SUMMARY, THINKING, TRAVERSAL):
        if name not in sections:
            problems.append(f"{name}: section missing")
    return sections


def _lenient_summary(lines: list[str], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"meta_tasks": (), "task": "", "targets": (), "understanding": ()}
    for line in lines:
        key, sep, value = line.partition(":")
        name = _SUMMARY_KEYS.get(_squash(key))
        if not sep or name is None:
            problems.append(f"{SUMMARY}: cannot read line {line.strip()[:80]!r}")
            continue
        if name == "task":
            out["task"] = _unescape(value.strip(), strict=False)
            continue
        items = [_unescape(i.strip(), strict=False) for i in _split_unescaped(value, ";")]
        items = [i for i in items if i]
        if name == "meta_tasks":
            known = [_META_BY_SQUASHED.get(_squash(i)) for i in items]
            problems += [f"{SUMMARY}: unknown meta-task {i!r}" for i, m in zip(items, known) if m is None]
            out[name] = tuple(m for m in known if m is not None)
        else:
            out[name] = tuple(items)
    return out


def _lenient_traversal(lines: list[str], problems: list[str]) -> tuple[TargetEntry, ...]:
    entries = []
    for line in lines:
        body = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])?\s*", "", line)
        pieces = _split_unescaped(body, ":")
        status = _STATUS.match(":".join(pieces[1:])) if len(pieces) > 1 else None
        name = _unescape(pieces[0], strict=False).strip()
        if status is None or not name:
            problems.append(f"{TRAVERSAL}: cannot read line {line.strip()[:80]!r}")
            continue
        changed = status.group(1).lower() == "changed"
        how = _unescape(status.group(2), strict=False).strip()
        if changed and not how:
            problems.append(f"{TRAVERSAL}: {name!r} is marked changed but does not say how; entry dropped")
            continue
        entries.append(TargetEntry(name, changed, how))
    return tuple(entries)


# ----------------------------------------------------------------------------------------------------- dict form
_DICT_KEYS = ("meta_tasks", "task", "targets", "understanding", "thinking", "traversal")


def to_dict(cot: MetaCoT) -> dict[str, Any]:
    """JSON-ready dict of a Meta-CoT (meta-tasks by name, traversal as a list of dicts)."""
    return {
        "meta_tasks": [m.value for m in cot.meta_tasks],
        "task": cot.task,
        "targets": list(cot.targets),
        "understanding": list(cot.understanding),
        "thinking": cot.thinking,
        "traversal": [{"name": e.name, "changed": e.changed, "how": e.how} for e in cot.traversal],
    }


def from_dict(data: Any) -> MetaCoT:
    """Inverse of :func:`to_dict`; strict about keys and types.

    Raises:
        CoTParseError: ``section`` is the offending field (e.g. ``cot.traversal[2]``); the message says what to fix.
    """
    if not isinstance(data, dict):
        raise CoTParseError("cot", f"expected an object with keys {', '.join(_DICT_KEYS)}, got {type(data).__name__}")
    missing = [k for k in _DICT_KEYS if k not in data]
    extra = sorted(set(data) - set(_DICT_KEYS))
    if missing or extra:
        raise CoTParseError("cot", f"missing keys {missing}, unknown keys {extra}; expected {list(_DICT_KEYS)}")
    for key in ("meta_tasks", "targets", "understanding", "traversal"):
        if not isinstance(data[key], list):
            raise CoTParseError(f"cot.{key}", f"must be a list, got {type(data[key]).__name__}")
    entries = []
    for index, item in enumerate(data["traversal"]):
        where = f"cot.traversal[{index}]"
        if not isinstance(item, dict) or set(item) != {"name", "changed", "how"}:
            raise CoTParseError(where, f"must be an object with keys name, changed, how; got {item!r:.80}")
        try:
            entries.append(TargetEntry(item["name"], item["changed"], item["how"]))
        except ValueError as err:
            raise CoTParseError(where, str(err)) from None
    try:
        return MetaCoT(data["meta_tasks"], data["task"], data["targets"], data["understanding"], data["thinking"],
                       entries)
    except ValueError as err:
        raise CoTParseError("cot", str(err)) from None


# ------------------------------------------------------------------------------------------------- token budget
def cot_token_lengths(records: Iterable[Any], tokenizer: Any | None) -> list[int]:
    """Token counts of rendered Meta-CoTs.

    Args:
        records: MetaCoT objects, objects with a ``cot`` attribute (edit records) or already rendered strings.
        tokenizer: a Hugging Face tokenizer (counted without special tokens), or None for a whitespace-word proxy
            (about 1.3-2x fewer than BPE tokens on this text: say so when reporting proxy numbers).

    Returns:
        One length per record, in order.
    """
    lengths = []
    for record in records:
        cot = getattr(record, "cot", record)
        text = cot if isinstance(cot, str) else render(cot)
        if tokenizer is None:
            lengths.append(len(text.split()))
        else:
            lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max of a list of lengths (empty list -> ValueError)."""
    if not lengths:
        raise ValueError("length_summary needs at least one length")
    ordered = sorted(lengths)

    def pct(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {"n": len(ordered), "min": float(ordered[0]), "mean": round(statistics.fmean(ordered), 1),
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": float(ordered[-1])}
