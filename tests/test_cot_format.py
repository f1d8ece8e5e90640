"""Meta-CoT text format: strict round trip on adversarial records, error sections, lenient recovery, dict form."""

from __future__ import annotations

import random

import pytest

from metacot.cot import (
    CoTParseError,
    MetaCoT,
    MetaTask,
    TargetEntry,
    cot_token_lengths,
    from_dict,
    length_summary,
    parse,
    parse_lenient,
    render,
    to_dict,
)
from metacot.cot.format import MARKERS, SUMMARY, THINKING, TRAVERSAL

# Everything the format treats specially, plus ordinary text and the markers themselves.
_PIECES = ["\\", "\\n", "\n", "\r", "\r\n", "#", "###", ";", "; ", ":", ": ", ",", ", ", " ", "- ", "kept",
           "changed", "changed, ", "Task: ", "Meta-tasks:", "\u2028", "é", "red circle", "x"]
_PIECES += list(MARKERS.values()) + [m + "\n" for m in MARKERS.values()]


def _text(rng: random.Random, allow_empty: bool) -> str:
    text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 6)))
    return text if text or allow_empty else "x" + text


def random_cot(rng: random.Random) -> MetaCoT:
    """A valid MetaCoT whose free text is full of markers, separators, backslashes and newlines."""
    meta = [rng.choice(list(MetaTask)) for _ in range(rng.randint(1, 3))]
    entries = []
    for _ in range(rng.randint(0, 5)):
        changed = rng.random() < 0.5
        entries.append(TargetEntry(_text(rng, False), changed, _text(rng, not changed)))
    return MetaCoT(
        meta_tasks=tuple(meta),
        task=_text(rng, False),
        targets=tuple(_text(rng, False) for _ in range(rng.randint(0, 3))),
        understanding=tuple(_text(rng, False) for _ in range(rng.randint(0, 3))),
        thinking=_text(rng, True),
        traversal=tuple(entries),
    )


EXAMPLE = MetaCoT(
    meta_tasks=(MetaTask.REPLACE,),
    task="recolour",
    targets=("the red circle",),
    understanding=("localization", "color recognition"),
    thinking="Recolouring replaces one attribute: the red circle turns blue.",
    traversal=(TargetEntry("the red circle", True, "becomes blue"), TargetEntry("the blue square", False, "")),
)


def test_render_example_is_readable() -> None:
    text = render(EXAMPLE)
    assert text.splitlines() == [
        "### Meta-task summary",
        "Meta-tasks: Replace",
        "Task: recolour",
        "Targets: the red circle",
        "Understanding: localization; color recognition",
        "### Task thinking",
        "Recolouring replaces one attribute: the red circle turns blue.",
        "### Target traversal",
        "- the red circle: changed, becomes blue",
        "- the blue square: kept",
    ]


def test_round_trip_on_adversarial_records() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        cot = random_cot(rng)
        text = render(cot)
        assert parse(text) == cot, text
        assert parse(text + "\n") == cot
        assert parse_lenient(text) == parse_lenient(text)  # deterministic
        assert parse_lenient(text).cot == cot and parse_lenient(text).problems == []
        assert from_dict(to_dict(cot)) == cot


def test_markers_in_free_text_never_start_a_line() -> None:
    cot = MetaCoT((MetaTask.ADD,), "### Task thinking", ("a; b",), (), "### Target traversal\n- x: kept", ())
    lines = render(cot).split("\n")
    assert [line for line in lines if line in MARKERS.values()] == list(MARKERS.values())
    assert len(lines) == 8
    assert parse(render(cot)).targets == ("a; b",)


def test_list_items_and_names_keep_surrounding_spaces() -> None:
    cot = MetaCoT((MetaTask.ADD,), " t ", (" a", "b ", " "), ("u",), " ", (TargetEntry(" n: x ", False, " h"),))
    assert parse(render(cot)) == cot


def test_lists_accept_lists_and_names() -> None:
    cot = MetaCoT(["Add", MetaTask.REMOVE], "t", ["x"], [], "", [])
    assert cot.meta_tasks == (MetaTask.ADD, MetaTask.REMOVE) and cot.targets == ("x",)


@pytest.mark.parametrize(
    ("mutate", "section"),
    [
        (lambda t: t.replace("### Meta-task summary", "## Meta-task summary"), SUMMARY),
        (lambda t: t.replace("Meta-tasks: Replace", "Meta-tasks: Recolour"), SUMMARY),
        (lambda t: t.replace("Meta-tasks: Replace", "Meta-tasks:"), SUMMARY),
        (lambda t: t.replace("Task: recolour", "Task:"), SUMMARY),
        (lambda t: t.replace("localization; color", "localization;color"), SUMMARY),
        (lambda t: t.replace("localization; color", "localization; ; color"), SUMMARY),
        (lambda t: t.replace("### Task thinking\n", ""), THINKING),
        (lambda t: t.replace("turns blue.", "turns \\q blue."), THINKING),
        (lambda t: t.replace("### Target traversal", "### Traversal"), TRAVERSAL),
        (lambda t: t.replace(": changed, becomes blue", ": changed"), TRAVERSAL),
        (lambda t: t.replace(": kept", ": unchanged"), TRAVERSAL),
        (lambda t: t.replace(": kept", ": kept, "), TRAVERSAL),
        (lambda t: t.replace("- the blue", "the blue"), TRAVERSAL),
        (lambda t: t + "\n\n", TRAVERSAL),
        (lambda t: t.split("### Task thinking")[0], THINKING),
    ],
)
def test_malformed_text_names_the_section(mutate, section: str) -> None:
    text = mutate(render(EXAMPLE))
    assert text != render(EXAMPLE)
    with pytest.raises(CoTParseError) as info:
        parse(text)
    assert info.value.section == section
    assert str(info.value).startswith(section)


def test_lenient_recovers_model_output() -> None:
    text = (
        "Sure! Here is my reasoning.\r\n"
        "**Meta-task summary**\r\n"
        "meta tasks: replace; Teleport; position change\n"
        "task: recolour\n"
        "Targets: the red circle\n"
        "## target traversal\n"
        "* the red circle: Changed - becomes blue\n"
        "1. the blue square: unchanged\n"
        "the green star changed\n"
        "- the pink star: changed\n"
    )
    result = parse_lenient(text)
    assert result.cot is not None
    assert result.cot.meta_tasks == (MetaTask.REPLACE, MetaTask.POSITION_CHANGE)
    assert result.cot.task == "recolour" and result.cot.targets == ("the red circle",)
    assert result.cot.thinking == ""
    assert result.cot.traversal == (
        TargetEntry("the red circle", True, "becomes blue"),
        TargetEntry("the blue square", False, ""),
    )
    joined = "\n".join(result.problems)
    for expected in ("text before the first section", "unknown meta-task 'Teleport'", "task thinking: section missing",
                     "cannot read line 'the green star changed'", "'the pink star' is marked changed"):
        assert expected in joined, joined
    assert len(result.problems) == 5


def test_lenient_gives_up_without_meta_tasks() -> None:
    result = parse_lenient("I will make the circle blue.")
    assert result.cot is None
    assert any("no known meta-task" in p for p in result.problems)
    assert any("target traversal: section missing" in p for p in result.problems)


def test_lenient_reports_duplicate_sections_and_keeps_the_first() -> None:
    text = render(EXAMPLE) + "\n### Task thinking\nsecond thoughts"
    result = parse_lenient(text)
    assert result.cot is not None and result.cot.thinking == EXAMPLE.thinking
    assert result.problems == ["task thinking: section appears more than once; the later copy is ignored"]


@pytest.mark.parametrize(
    ("data", "section"),
    [
        ([], "cot"),
        ({**to_dict(EXAMPLE), "extra": 1}, "cot"),
        ({k: v for k, v in to_dict(EXAMPLE).items() if k != "task"}, "cot"),
        ({**to_dict(EXAMPLE), "targets": "the red circle"}, "cot.targets"),
        ({**to_dict(EXAMPLE), "meta_tasks": ["Recolour"]}, "cot"),
        ({**to_dict(EXAMPLE), "traversal": [{"name": "x", "changed": "yes", "how": ""}]}, "cot.traversal[0]"),
        ({**to_dict(EXAMPLE), "traversal": [{"name": "x", "changed": True, "how": ""}]}, "cot.traversal[0]"),
        ({**to_dict(EXAMPLE), "traversal": [{"name": "x", "changed": False}]}, "cot.traversal[0]"),
    ],
)
def test_from_dict_names_the_field(data, section: str) -> None:
    with pytest.raises(CoTParseError) as info:
        from_dict(data)
    assert info.value.section == section


def test_invalid_records_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one meta-task"):
        MetaCoT((), "t", (), (), "", ())
    with pytest.raises(ValueError, match="unknown meta-task 'Recolour'"):
        MetaCoT(("Recolour",), "t", (), (), "", ())
    with pytest.raises(ValueError, match="must say how"):
        TargetEntry("x", True, "")
    with pytest.raises(ValueError, match="non-empty strings"):
        MetaCoT(("Add",), "t", ("",), (), "", ())


def test_token_lengths_with_proxy_and_tokenizer() -> None:
    class CharTokenizer:
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) for c in text]}

    assert cot_token_lengths([EXAMPLE], None) == [len(render(EXAMPLE).split())]
    assert cot_token_lengths([EXAMPLE, "a b"], CharTokenizer()) == [len(render(EXAMPLE)), 3]
    summary = length_summary([5, 1, 3])
    assert (summary["min"], summary["p50"], summary["max"], summary["mean"]) == (1.0, 3.0, 5.0, 3.0)
