"""Hypothetical instructions (ReasonBrain-style): the instruction states a cause and leaves the edit implicit.

Two recipes:

- **Synthetic, physical, exact** (``metacot data synth-hypothetical --out DIR --n N --seed S``): scenes of the
  synthetic recipe where every object rests on the ground (the image's bottom edge) or on a square beneath it.
  ``physical-support``: "What would happen if the red square were suddenly taken away?" -> the red square is
  removed and everything it held falls straight down, as one rigid stack, until it rests on the object below or on
  the ground (Remove + one Position Change per falling object). ``physical-drop``: "Suppose someone drops a small
  blue circle from high above the green square." -> the circle is added where it comes to rest (Add). Falls are
  computed exactly on the boxes (an object lands on the highest object whose columns of pixels it shares), so the
  target image, the scenes and the Meta-CoT are ground truth; the Meta-CoT's thinking spells out the implied
  meta-tasks. Built on :mod:`metacot.scenes`'s public functions (rendering, naming, sizes) without
  touching the synthetic generator. Output layout as ``metacot data synth`` (``DIR/{train,val,test}.jsonl``,
  ``DIR/images``, ``DIR/manifest.json``), atomic and byte-identical for equal seeds.
- **Real data, rewritten** (``metacot data hypothetical --in DATASET --out DIR --server URL``): the served VLM sees
  the source and target images and the explicit instruction and rewrites it into a hypothetical one of a kind it
  picks (physical, temporal, causal, story), as bounded JSON (structured outputs, prompt
  ``prompts/hypothetical_v1.txt``). The record keeps its images, id and CoT; ``instruction`` becomes the
  hypothetical one and ``category`` ``hypothetical-<kind>``. Resumable and crash-safe like ``metacot data
  annotate`` (same output folder machinery: ``failed.jsonl`` with reasons, ``manifest.json``).

Deliberately left out: temporal, causal and story kinds for synthetic scenes (flat shapes have no time or story
with exact ground truth), friction, toppling and bouncing (objects fall straight and stay upright).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_recipes.annotate import (
    Outcome,
    ask_json,
    load_prompt_file,
    parse_json_reply,
    prompt_content,
    request_image,
    run_samples,
    schema_sha,
)
from data_recipes.importers import read_dataset
from data_recipes.synth import content_hash, split_of
from metacot.scenes import Obj, Scene, describe, min_gap, name_of, render_scene, side_for
from metacot.cot.format import MetaCoT, MetaTask, TargetEntry
from metacot.cot.schema import BACKGROUNDS, COLORS, SHAPES, SIZES, SPLITS, EditRecord, Record, write_records
from metacot.run import atomic_dir
from rewards.client import ChatClient, Deadline, RequestRefused

RECIPE_VERSION = 1
MIN_RESOLUTION = 32  # a three-object stack and a drop above it need room
MAX_OBJECTS = 5
CATEGORIES = ("physical-support", "physical-drop")
UNDERSTANDING = ("physical reasoning", "support relations", "localization")
HYPOTHETICAL_KINDS = ("physical", "temporal", "causal", "story")
HYPOTHETICAL_PROMPT = "hypothetical_v1"
MAX_INSTRUCTION = 240
_SUPPORT_TEMPLATES = (
    "What would happen if {s} were suddenly taken away?",
    "Imagine {s} is pulled out from under {top}.",
    "Suppose {s} vanished into thin air.",
    "What if someone removed {s}, the one holding up {top}?",
)
_DROP_TEMPLATES = (
    "What if {new} fell straight down from the sky, right above {t}?",
    "Suppose someone drops {new} from high above {t}.",
    "Imagine {new} is let go at the top of the picture, directly above {t}.",
)


@dataclass
class HypotheticalEdit:
    """A synthetic hypothetical edit: scenes before/after, the instruction, its exact Meta-CoT and category."""

    before: Scene
    after: Scene
    instruction: str
    cot: MetaCoT
    category: str


# ------------------------------------------------------------------------------------------------------ physics
def x_overlap(a: list[int], b: list[int]) -> bool:
    """Whether two boxes share a column of pixels."""
    return a[0] < b[2] and b[0] < a[2]


def landing(box: list[int], others: list[Obj], height: int) -> tuple[int, Obj | None]:
    """Where a box falling straight down stops: (the y of the surface it rests on, the object or None = ground).

    The surface is the top of the highest object below the box that shares a column of pixels with it.
    """
    below = [o for o in others if x_overlap(box, o["box"]) and o["box"][1] >= box[3]]
    if not below:
        return height, None
    support = min(below, key=lambda o: o["box"][1])
    return support["box"][1], support


def resting_on(obj: Obj, scene: Scene) -> Obj | None | bool:
    """What ``obj`` rests on: the object directly beneath it, None for the ground, False when it floats."""
    if obj["box"][3] == scene["height"]:
        return None
    for other in scene["objects"]:
        if other is not obj and other["box"][1] == obj["box"][3] and x_overlap(obj["box"], other["box"]):
            return other
    return False


def physical_scene(rng: random.Random, resolution: int) -> Scene:
    """A scene of 2-3 columns standing on the ground; one column is a stack of 2-3 (squares under any shape).

    Every object's horizontal span contains its column's centre line, so whatever falls in a column lands on the
    object below it. Columns keep a :func:`metacot.scenes.min_gap` apart.
    """
    while True:
        heights = [rng.choice((2, 3))] + [rng.choice((1, 1, 2)) for _ in range(rng.randint(1, 2))]
        rng.shuffle(heights)
        if sum(heights) > MAX_OBJECTS:
            continue
        colors = rng.sample(list(COLORS), sum(heights))
        columns = [[_column_object(rng, resolution, top=level == h - 1) for level in range(h)] for h in heights]
        widths = [max(side for _, side in col) for col in columns]
        room = resolution - sum(widths) - min_gap(resolution) * (len(columns) - 1)
        stacked = [sum(side for _, side in col) for col in columns]
        if room < 0 or max(stacked) > resolution - side_for("small", resolution):  # keep headroom for a drop
            continue
        return _lay_out(rng, resolution, columns, widths, room, colors)


def _column_object(rng: random.Random, resolution: int, top: bool) -> tuple[dict[str, str], int]:
    size = rng.choice(SIZES)
    return {"shape": rng.choice(SHAPES) if top else "square", "size": size}, side_for(size, resolution)


def _lay_out(rng: random.Random, resolution: int, columns: list[list[tuple[dict[str, str], int]]],
             widths: list[int], room: int, colors: list[str]) -> Scene:
    cuts = sorted(rng.randint(0, room) for _ in range(len(columns)))  # free space before each column
    scene: Scene = {"width": resolution, "height": resolution, "background": rng.choice(list(BACKGROUNDS)),
                    "objects": []}
    left, spent = 0, 0
    for col, width, cut in zip(columns, widths, cuts, strict=True):
        left += cut - spent
        spent = cut
        centre = left + width // 2
        floor = resolution
        for spec, side in col:
            # jitter the object sideways but keep the column's centre line inside its span
            x0 = min(max(left, centre - side // 2 + rng.randint(-(side // 4), side // 4)), left + width - side)
            x0 = min(max(x0, centre - side + 1), centre)
            obj = {"id": f"o{len(scene['objects']) + 1}", **spec, "color": colors[len(scene["objects"])],
                   "box": [x0, floor - side, x0 + side, floor]}
            scene["objects"].append(obj)
            floor -= side
        left += width + min_gap(resolution)
    return scene


# ------------------------------------------------------------------------------------------------------ edits
def support_removal(rng: random.Random, scene: Scene) -> HypotheticalEdit | None:
    """Remove a square that holds something up; what it held falls as one stack. None if nothing is held."""
    held = {id(s): o for o in scene["objects"] if isinstance(s := resting_on(o, scene), dict)}
    supports = [o for o in scene["objects"] if id(o) in held]
    if not supports:
        return None
    removed = rng.choice(supports)
    group = _above(removed, scene)
    rest = [o for o in scene["objects"] if o is not removed and o not in group]
    drop = min(landing(g["box"], rest, scene["height"])[0] - g["box"][3] for g in group)
    after = {**scene, "objects": []}
    for obj in scene["objects"]:
        if obj is removed:
            continue
        moved = obj in group
        box = obj["box"]
        after["objects"].append({**obj, "box": [box[0], box[1] + drop, box[2], box[3] + drop] if moved else list(box)})
    lowest = max(group, key=lambda g: g["box"][3])
    rests_on = landing(lowest["box"], rest, scene["height"])[1]
    where = "the ground" if rests_on is None else name_of(rests_on)
    hows = {lowest["id"]: f"falls straight down and comes to rest on {where}"}
    for g in group:
        if g is not lowest:
            below = resting_on(g, scene)
            hows[g["id"]] = f"falls together with {name_of(below)} and stays on it"  # type: ignore[arg-type]
    hows[removed["id"]] = "removed"
    names = [name_of(g) for g in sorted(group, key=lambda g: -g["box"][3])]
    thinking = (f"The instruction states a cause, not an edit. {_cap(name_of(removed))} holds up {_join(names)}; "
                f"once it is gone nothing supports {'it' if len(names) == 1 else 'them'}, so gravity pulls "
                f"{'it' if len(names) == 1 else 'them'} straight down until {names[0]} rests on {where}. So the edit "
                f"is a Remove of {name_of(removed)} and a Position Change of {_join(names)}; nothing else moves.")
    meta = (MetaTask.REMOVE,) + (MetaTask.POSITION_CHANGE,) * len(group)
    cot = _cot(meta, "remove a support and let what it held fall", (name_of(removed), *names), thinking,
               scene, after, hows)
    template = rng.choice(_SUPPORT_TEMPLATES)
    instruction = template.format(s=name_of(removed), top=name_of(held[id(removed)]))
    return HypotheticalEdit(scene, after, instruction, cot, "physical-support")


def _above(obj: Obj, scene: Scene) -> list[Obj]:
    """The objects resting, directly or through others, on ``obj``."""
    out: list[Obj] = []
    frontier = [obj]
    while frontier:
        base = frontier.pop()
        on = [o for o in scene["objects"] if resting_on(o, scene) is base]
        out += on
        frontier += on
    return out


def drop_object(rng: random.Random, scene: Scene) -> HypotheticalEdit | None:
    """Drop a new object from above a column's top object; None unless it lands on that object's flat top (a square)."""
    tops = [o for o in scene["objects"] if not any(resting_on(p, scene) is o for p in scene["objects"])]
    target = rng.choice(tops)
    free = [c for c in COLORS if c not in {o["color"] for o in scene["objects"]}]
    size = rng.choice(SIZES)
    side = side_for(size, scene["width"])
    centre = (target["box"][0] + target["box"][2]) // 2
    x0 = min(max(0, centre - side // 2), scene["width"] - side)
    top_y, support = landing([x0, 0, x0 + side, 0], scene["objects"], scene["height"])
    if support is not target or target["shape"] != "square" or top_y - side < 0:
        return None  # it would hit a neighbour first, roll off a round or pointed top, or not fit above
    new = {"id": f"o{len(scene['objects']) + 1}", "shape": rng.choice(SHAPES), "color": rng.choice(free),
           "size": size, "box": [x0, top_y - side, x0 + side, top_y]}
    after = {**scene, "objects": [*scene["objects"], new]}
    thinking = (f"The instruction states a cause: {describe(new)} is dropped above {name_of(target)}. It falls "
                f"straight down until it meets the top of {name_of(target)} and rests there. So the edit is an Add "
                f"of {name_of(new)} on top of {name_of(target)}; nothing else moves.")
    cot = _cot((MetaTask.ADD,), "add a falling object where it comes to rest", (name_of(new),), thinking, scene,
               after, {new["id"]: f"added, resting on {name_of(target)}"})
    instruction = rng.choice(_DROP_TEMPLATES).format(new=describe(new), t=name_of(target))
    return HypotheticalEdit(scene, after, instruction, cot, "physical-drop")


def _cot(meta: tuple[MetaTask, ...], task: str, targets: tuple[str, ...], thinking: str, before: Scene,
         after: Scene, hows: dict[str, str]) -> MetaCoT:
    """Meta-CoT whose traversal lists ``before``'s objects in order, then added ones (as the synthetic recipe)."""
    ids = [o["id"] for o in before["objects"]]
    objects = {o["id"]: o for o in before["objects"]} | {o["id"]: o for o in after["objects"]}
    ids += [o["id"] for o in after["objects"] if o["id"] not in ids]
    traversal = tuple(TargetEntry(name_of(objects[i]), i in hows, hows.get(i, "")) for i in ids)
    return MetaCoT(meta, task, targets, UNDERSTANDING, thinking, traversal)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def make_hypothetical(seed: int, index: int, resolution: int) -> HypotheticalEdit:
    """Sample ``index``: ``physical-support`` for two of every three, else ``physical-drop``; deterministic.

    Raises:
        RuntimeError: no scene allowed the edit in 200 tries (raise the resolution).
    """
    rng = random.Random(f"hypothetical:{seed}:{index}")
    make = drop_object if index % 3 == 2 else support_removal
    for _ in range(200):
        edit = make(rng, physical_scene(rng, resolution))
        if edit is not None:
            return edit
    raise RuntimeError(f"no scene at {resolution} px allowed a {make.__name__} edit in 200 tries; raise --resolution")


def generate_hypothetical(out: str | Path, n: int, seed: int, resolution: int = 32,
                          overwrite: bool = False) -> dict[str, Any]:
    """Write ``n`` synthetic physical hypothetical edits to ``out`` and return the manifest.

    Raises:
        ValueError: ``n`` < 0 or ``resolution`` below :data:`MIN_RESOLUTION`.
        metacot.run.RunError: ``out`` exists and ``overwrite`` is False.
    """
    if n < 0 or resolution < MIN_RESOLUTION:
        raise ValueError(f"need --n >= 0 and --resolution >= {MIN_RESOLUTION}; got {n}, {resolution}")
    with atomic_dir(Path(out), overwrite=overwrite, meta={"recipe": "synth-hypothetical"}) as tmp:
        (tmp / "images").mkdir()
        by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
        for i in range(n):
            edit = make_hypothetical(seed, i, resolution)
            src, tgt = f"images/h{i:06d}_src.png", f"images/h{i:06d}_tgt.png"
            render_scene(edit.before).save(tmp / src, format="PNG", compress_level=6)
            render_scene(edit.after).save(tmp / tgt, format="PNG", compress_level=6)
            split = split_of(i, n)
            by_split[split].append(EditRecord(f"h{i:06d}", src, edit.instruction, tgt, edit.cot, edit.category,
                                              edit.cot.meta_tasks, edit.before, edit.after, None, None, split))
        for split, records in by_split.items():
            write_records(tmp / f"{split}.jsonl", records)
        edits = [r for rs in by_split.values() for r in rs]
        manifest = {"recipe": "synth-hypothetical", "version": RECIPE_VERSION, "seed": seed,
                    "settings": {"n": n, "resolution": resolution},
                    "counts": {"splits": {s: len(r) for s, r in by_split.items()},
                               "categories": dict(sorted(Counter(r.category for r in edits).items())),
                               "meta_tasks": dict(sorted(Counter(m.value for r in edits
                                                                 for m in r.meta_tasks).items()))},
                    "content_sha256": content_hash(tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------------------ rewriting
def rewrite_schema() -> dict[str, Any]:
    """Bounded JSON schema of a rewritten instruction: its kind and text."""
    return {"type": "object", "additionalProperties": False, "required": ["kind", "instruction"],
            "properties": {"kind": {"enum": list(HYPOTHETICAL_KINDS)},
                           "instruction": {"type": "string", "minLength": 8, "maxLength": MAX_INSTRUCTION}}}


def read_rewrite(text: str, finish_reason: str | None) -> tuple[tuple[str, str] | None, str]:
    """A reply -> (kind, instruction), or (None, reason)."""
    data, reason = parse_json_reply(text, finish_reason)
    if reason:
        return None, reason
    if not (isinstance(data, dict) and data.get("kind") in HYPOTHETICAL_KINDS
            and isinstance(data.get("instruction"), str) and data["instruction"].strip()):
        return None, f"invalid rewrite: expected {{kind: one of {HYPOTHETICAL_KINDS}, instruction: text}}"
    return (data["kind"], " ".join(data["instruction"].split())), ""


class Rewriter:
    """Per-sample work of ``metacot data hypothetical``: one explicit instruction -> one hypothetical one."""

    def __init__(self, client: ChatClient, max_tokens: int) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.prompt = load_prompt_file(HYPOTHETICAL_PROMPT, ("source_image", "target_image"), ("instruction",))
        self.schema = rewrite_schema()

    def settings(self) -> dict[str, Any]:
        return {"recipe": "hypothetical", "model": self.client.model, "prompt": self.prompt.id,
                "schema": schema_sha(self.schema)}

    def __call__(self, record: EditRecord, deadline: Deadline) -> Outcome:
        try:
            images = {"source_image": request_image(record.source_image),
                      "target_image": request_image(record.target_image)}
        except OSError as err:
            return Outcome.failed(record.id, "rewrite", f"unreadable image: {err}")
        content = prompt_content(self.prompt, images, {"instruction": record.instruction})
        try:
            value, reasons, raw = ask_json(self.client, [{"role": "user", "content": content}], self.schema,
                                           self.max_tokens, deadline, _distinct(record.instruction))
        except RequestRefused as err:
            return Outcome.failed(record.id, "rewrite", f"refused: {err}")
        if value is None:
            return Outcome.failed(record.id, "rewrite", reasons[-1], raw, reasons)
        kind, instruction = value
        return Outcome(record.id, "kept", dataclasses.replace(record, instruction=instruction,
                                                               category=f"hypothetical-{kind}"))


def _distinct(original: str) -> Callable[[str, str | None], tuple[Any, str]]:
    """A reply reader that also refuses a rewrite equal to the original instruction."""
    def read(text: str, finish_reason: str | None) -> tuple[Any, str]:
        value, reason = read_rewrite(text, finish_reason)
        if value is not None and value[1].casefold() == " ".join(original.split()).casefold():
            return None, "unchanged: the rewrite repeats the explicit instruction"
        return value, reason
    return read


def rewrite_hypothetical(source: str | Path, out: str | Path, server: str, model: str | None = None,
                         workers: int = 8, limit: int | None = None, max_tokens: int = 256,
                         progress: bool = False, log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Rewrite the edit records of ``source`` into hypothetical instructions in ``out`` (resumable).

    Returns:
        (the run summary, the manifest), as :func:`data_recipes.annotate.annotate`.

    Raises:
        DataError, ServerUnavailable, JudgeError: as :func:`data_recipes.annotate.annotate`.
    """
    if workers < 1 or max_tokens < 1 or (limit is not None and limit < 0):
        raise ValueError(f"need --workers >= 1, --max-tokens >= 1, --limit >= 0; got {workers}, {max_tokens}, {limit}")
    records = read_dataset(source, out)
    with ChatClient(server, model, concurrency=workers, timeout_s=300.0, total_timeout_s=3600.0) as client:
        rewriter = Rewriter(client, max_tokens)
        settings = {**rewriter.settings(), "input": str(Path(source).resolve())}
        return run_samples(records, out, rewriter, settings, client, select=lambda r: isinstance(r, EditRecord),
                           keep_others=False, limit=limit, progress=progress, log=log)
