"""Understanding questions with exact answers about a synthetic scene: grounding, counting, OCR, spatial relations.

These train the "understanding" element of the Meta-CoT triplet (localization, counting, text and spatial
recognition), asked about the same images the edits start from. Answers are short and canonical: boxes as
``[x0, y0, x1, y1]`` in pixels (x1/y1 exclusive), counts as digits, labels verbatim, relations as ``yes``/``no``.

Deliberately left out: free-form captions and multi-hop questions.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from metacot.scenes import Scene, name_of
from metacot.cot.schema import SHAPES, UNDERSTANDING_KINDS

_RELATIONS = {
    "left": ("Is {a} to the left of {b}?", lambda a, b: a[2] <= b[0], lambda a, b: b[2] <= a[0]),
    "right": ("Is {a} to the right of {b}?", lambda a, b: b[2] <= a[0], lambda a, b: a[2] <= b[0]),
    "above": ("Is {a} above {b}?", lambda a, b: a[3] <= b[1], lambda a, b: b[3] <= a[1]),
    "below": ("Is {a} below {b}?", lambda a, b: b[3] <= a[1], lambda a, b: a[3] <= b[1]),
}


def _grounding(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    obj = rng.choice(scene["objects"])
    question = rng.choice([
        "Where is {t}? Answer with its box [x0, y0, x1, y1] in pixels.",
        "Give the bounding box of {t} as [x0, y0, x1, y1] in pixels.",
        "Locate {t} and reply with [x0, y0, x1, y1].",
    ]).format(t=name_of(obj))
    return question, "[{}, {}, {}, {}]".format(*obj["box"])


def _counting(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    if rng.random() < 0.25:
        return rng.choice(["How many objects are in the image?", "How many shapes can you see?"]), str(
            len(scene["objects"]))
    present = sorted({o["shape"] for o in scene["objects"]})
    shape = rng.choice(present) if rng.random() < 0.8 else rng.choice(SHAPES)
    count = sum(o["shape"] == shape for o in scene["objects"])
    question = rng.choice(["How many {s}s are there?", "Count the {s}s in the image."]).format(s=shape)
    return question, str(count)


def _ocr(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    labelled = [o for o in scene["objects"] if "text" in o]
    if not labelled:
        return None
    obj = rng.choice(labelled)
    question = rng.choice(["What does the label on {t} say?", "Read the text written on {t}."]).format(t=name_of(obj))
    return question, obj["text"]


def _spatial(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    options = []
    for a in scene["objects"]:
        for b in scene["objects"]:
            for template, holds, opposite in _RELATIONS.values():
                if a is not b and (holds(a["box"], b["box"]) or opposite(a["box"], b["box"])):
                    options.append((a, b, template, holds))
    if not options:
        return None
    a, b, template, holds = rng.choice(options)  # only pairs whose relation is clear-cut either way
    return template.format(a=name_of(a), b=name_of(b)), "yes" if holds(a["box"], b["box"]) else "no"


QUESTIONS: dict[str, Callable[[random.Random, Scene], tuple[str, str] | None]] = {
    "grounding": _grounding,
    "counting": _counting,
    "ocr": _ocr,
    "spatial": _spatial,
}


def make_question(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str, str]:
    """A (kind, question, answer) triple, of ``kind`` when the scene allows it, else the next kind that fits.

    Raises:
        ValueError: ``kind`` is unknown, or no kind fits (impossible for scenes with at least one object).
    """
    if kind not in QUESTIONS:
        raise ValueError(f"unknown understanding kind {kind!r}; choose one of {', '.join(QUESTIONS)}")
    start = UNDERSTANDING_KINDS.index(kind)
    for offset in range(len(UNDERSTANDING_KINDS)):
        name = UNDERSTANDING_KINDS[(start + offset) % len(UNDERSTANDING_KINDS)]
        result = QUESTIONS[name](rng, scene)
        if result is not None:
            return name, result[0], result[1]
    raise ValueError("no understanding question fits an empty scene")
