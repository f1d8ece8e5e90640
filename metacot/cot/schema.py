"""JSONL data records for editing and understanding samples, with a loader that reports every problem at once.

One JSON object per line; ``type`` says which record it is. Image paths are relative to the JSONL file's folder
(:func:`load_records` returns them resolved to absolute paths; :func:`write_records` writes them relative again).

Edit record (one edit, one step of an edit chain, or a whole chain)::

    {"type": "edit", "id": "e000017", "source_image": "images/e000017_src.png", "instruction": "Make the red
     circle blue.", "target_image": "images/e000017_tgt.png", "cot": {...metacot.cot.to_dict...},
     "category": "recolour", "meta_tasks": ["Replace"], "scene_before": SCENE | null, "scene_after": SCENE | null,
     "chain_id": null | "c00003", "chain_step": null | 0..L, "split": "train" | "val" | "test"}

``meta_tasks`` repeats ``cot.meta_tasks`` (so data can be filtered without reading CoTs) and must equal it.
``cot`` may be null for a record not annotated yet (imported data); its ``meta_tasks`` is then ``[]``. Stage 1 refuses
such records unless it trains the no-CoT baseline; ``metacot data annotate`` fills them in.
Chains: steps 1..L edit the image of step k-1 into step k; ``chain_step`` 0 is the whole chain (source = first
image, target = last image, one composite instruction). ``chain_id`` and ``chain_step`` are both null or both set.

Understanding record (the "understanding" element of the triplet, mixed into SFT)::

    {"type": "understanding", "id": "u000017", "image": "images/e000017_src.png", "question": "How many circles
     are there?", "answer": "2", "kind": "grounding" | "counting" | "ocr" | "spatial", "split": "train"}

Scene (exact ground truth of a synthetic image)::

    {"width": 64, "height": 64, "background": "white", "objects": [{"id": "o1", "shape": "circle",
     "color": "red", "size": "small", "box": [x0, y0, x1, y1], "text": "7A"}]}

``box`` is in pixels with x1/y1 exclusive and is the tight bounding box of the object's pixels; ``text`` (a label
drawn in :data:`INK` inside the object) is optional. Colours come from :data:`COLORS` and are unique within a
scene, boxes never overlap, so a judge can segment a flat render by colour and read the objects back. In an edit's
Meta-CoT the target traversal lists ``scene_before``'s objects in order, then the objects the edit adds.

Deliberately left out: loading into torch datasets (the trainers do that), images embedded in the JSONL, and any
tolerance for bad lines: a file with one bad record is refused whole, with every problem listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from metacot.cot.format import CoTParseError, MetaCoT, MetaTask, from_dict, to_dict

# Object colours: far apart in RGB so a colour-segmentation judge can parse flat renders back at 32 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 30),
    "green": (40, 160, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 70, 210),
    "purple": (140, 60, 180),
    "pink": (240, 120, 190),
    "brown": (120, 70, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (190, 190, 190),
    "beige": (238, 228, 200),
}
INK: tuple[int, int, int] = (0, 0, 0)  # text labels; neither an object nor a background colour
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "star")
SIZES: tuple[str, ...] = ("small", "medium", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")
UNDERSTANDING_KINDS: tuple[str, ...] = ("grounding", "counting", "ocr", "spatial")
MAX_LISTED_PROBLEMS = 100


class DataError(ValueError):
    """A data file has problems. ``problems`` lists every one as ``file:line: problem``."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{path}: {len(problems)} problem(s); fix them and reload:\n" + "\n".join(shown) + more)
        self.problems = problems


@dataclass(frozen=True)
class EditRecord:
    """One editing sample (see the module docstring for the JSON form and the meaning of each field)."""

    id: str
    source_image: str
    instruction: str
    target_image: str
    cot: MetaCoT | None  # None: not annotated yet (imported data; `metacot data annotate` writes it)
    category: str
    meta_tasks: tuple[MetaTask, ...]
    scene_before: dict[str, Any] | None
    scene_after: dict[str, Any] | None
    chain_id: str | None
    chain_step: int | None
    split: str


@dataclass(frozen=True)
class UnderstandingRecord:
    """One visual question with its exact answer (kind in :data:`UNDERSTANDING_KINDS`)."""

    id: str
    image: str
    question: str
    answer: str
    kind: str
    split: str


Record = EditRecord | UnderstandingRecord
_FIELDS = {
    "edit": tuple(f.name for f in dataclasses.fields(EditRecord)),
    "understanding": tuple(f.name for f in dataclasses.fields(UnderstandingRecord)),
}
_IMAGE_FIELDS = {"edit": ("source_image", "target_image"), "understanding": ("image",)}


# ------------------------------------------------------------------------------------------------------- scenes
def validate_scene(scene: Any, where: str = "scene") -> list[str]:
    """All problems of a scene dict (empty list when valid); each names the field, e.g. ``scene.objects[1].box``."""
    if not isinstance(scene, dict):
        return [f"{where}: expected an object, got {type(scene).__name__}"]
    problems = _key_problems(scene, {"width", "height", "background", "objects"}, set(), where)
    if problems:
        return problems
    width, height = scene["width"], scene["height"]
    for key in ("width", "height"):
        if not _is_int(scene[key]) or scene[key] <= 0:
            problems.append(f"{where}.{key}: must be a positive integer, got {scene[key]!r}")
    if not isinstance(scene["objects"], list):
        problems.append(f"{where}.objects: must be a list")
    if problems:  # objects cannot be checked without a valid frame
        return problems
    if scene["background"] not in BACKGROUNDS:
        problems.append(f"{where}.background: {scene['background']!r} is not one of {', '.join(BACKGROUNDS)}")
    seen_ids, seen_colors, boxes = set(), set(), []
    for index, obj in enumerate(scene["objects"]):
        here = f"{where}.objects[{index}]"
        obj_problems = _object_problems(obj, here, width, height)
        problems += obj_problems
        if obj_problems:
            continue
        for key, seen in (("id", seen_ids), ("color", seen_colors)):
            if obj[key] in seen:
                problems.append(f"{here}.{key}: {obj[key]!r} repeats (ids and colours are unique within a scene)")
            seen.add(obj[key])
        for other_index, other in boxes:
            if _overlap(obj["box"], other):
                problems.append(f"{here}.box: overlaps objects[{other_index}] (objects must not overlap)")
        boxes.append((index, obj["box"]))
    return problems


def _object_problems(obj: Any, where: str, width: int, height: int) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    problems = _key_problems(obj, {"id", "shape", "color", "size", "box"}, {"text"}, where)
    if problems:
        return problems
    for key, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", SIZES)):
        if obj[key] not in allowed:
            problems.append(f"{where}.{key}: {obj[key]!r} is not one of {', '.join(allowed)}")
    if not isinstance(obj["id"], str) or not obj["id"]:
        problems.append(f"{where}.id: must be a non-empty string")
    if "text" in obj and (not isinstance(obj["text"], str) or not obj["text"]):
        problems.append(f"{where}.text: must be a non-empty string when present")
    box = obj["box"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box)):
        problems.append(f"{where}.box: must be [x0, y0, x1, y1] integers, got {box!r}")
    elif not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        problems.append(f"{where}.box: {box} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    return problems


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key_problems(data: dict[str, Any], required: set[str], optional: set[str], where: str) -> list[str]:
    missing = sorted(required - set(data))
    unknown = sorted(set(data) - required - optional)
    problems = [f"{where}: missing field {k!r}" for k in missing]
    return problems + [f"{where}: unknown field {k!r} (allowed: {', '.join(sorted(required | optional))})"
                       for k in unknown]


# ------------------------------------------------------------------------------------------------------ records
def record_to_json(record: Record, base: Path | None = None) -> dict[str, Any]:
    """JSON-ready dict of a record, with ``type`` first; image paths made relative to ``base`` when absolute."""
    kind = "edit" if isinstance(record, EditRecord) else "understanding"
    out: dict[str, Any] = {"type": kind}
    for name in _FIELDS[kind]:
        value = getattr(record, name)
        if name == "cot":
            value = None if value is None else to_dict(value)
        elif name == "meta_tasks":
            value = [m.value for m in value]
        elif name in _IMAGE_FIELDS[kind] and base is not None and os.path.isabs(value):
            value = Path(os.path.relpath(value, base)).as_posix()
        out[name] = value
    return out


def record_from_json(data: Any, base: Path | None = None) -> tuple[Record | None, list[str]]:
    """Validate one decoded JSON line; return (record or None, problems). Image paths resolved against ``base``."""
    if not isinstance(data, dict):
        return None, [f"expected a JSON object, got {type(data).__name__}"]
    kind = data.get("type")
    if kind not in _FIELDS:
        return None, [f"type must be 'edit' or 'understanding', got {kind!r}"]
    problems = _key_problems(data, set(_FIELDS[kind]) | {"type"}, set(), "record")
    if problems:
        return None, problems
    values = {name: data[name] for name in _FIELDS[kind]}
    problems += _common_problems(values, kind)
    if kind == "edit":
        problems += _edit_problems(values)
    elif values["kind"] not in UNDERSTANDING_KINDS:
        problems.append(f"kind: {values['kind']!r} is not one of {', '.join(UNDERSTANDING_KINDS)}")
    if problems:
        return None, problems
    for name in _IMAGE_FIELDS[kind]:
        values[name] = str((base / values[name]).resolve()) if base is not None else values[name]
    return (EditRecord(**values) if kind == "edit" else UnderstandingRecord(**values)), []


def _common_problems(values: dict[str, Any], kind: str) -> list[str]:
    problems = []
    text_fields = ("id", "instruction", "category") if kind == "edit" else ("id", "question", "answer")
    for name in text_fields + _IMAGE_FIELDS[kind]:
        if not isinstance(values[name], str) or not values[name]:
            problems.append(f"{name}: must be a non-empty string, got {values[name]!r:.60}")
    for name in _IMAGE_FIELDS[kind]:
        if isinstance(values[name], str) and os.path.isabs(values[name]):
            problems.append(f"{name}: {values[name]!r} is absolute; write paths relative to the JSONL's folder")
    if values["split"] not in SPLITS:
        problems.append(f"split: {values['split']!r} is not one of {', '.join(SPLITS)}")
    return problems


def _edit_problems(values: dict[str, Any]) -> list[str]:
    problems = []
    if values["cot"] is not None:
        try:
            values["cot"] = from_dict(values["cot"])
        except CoTParseError as err:
            problems.append(str(err))
    meta = values["meta_tasks"]
    try:
        values["meta_tasks"] = tuple(MetaTask(m) for m in meta) if isinstance(meta, list) else None
    except ValueError:
        values["meta_tasks"] = None
    if values["meta_tasks"] is None:
        problems.append(f"meta_tasks: must be a list of {', '.join(m.value for m in MetaTask)}, got {meta!r:.80}")
    elif isinstance(values["cot"], MetaCoT) and values["meta_tasks"] != values["cot"].meta_tasks:
        problems.append(f"meta_tasks: {meta} differs from cot.meta_tasks; they must be equal")
    elif values["cot"] is None and values["meta_tasks"]:
        problems.append(f"meta_tasks: {meta} given without a cot; leave it [] until the record is annotated")
    for name in ("scene_before", "scene_after"):
        if values[name] is not None:
            problems += validate_scene(values[name], name)
    chain_id, step = values["chain_id"], values["chain_step"]
    if (chain_id is None) != (step is None):
        problems.append("chain_id and chain_step: set both (a chain sample) or neither")
    elif chain_id is not None and (not isinstance(chain_id, str) or not chain_id or not _is_int(step) or step < 0):
        problems.append(f"chain_id/chain_step: need a non-empty string and an integer >= 0, got {chain_id!r}/{step!r}")
    return problems


def _image_problems(record: Record, checked: dict[str, tuple[int, int] | str]) -> list[str]:
    """Missing or unreadable image files, and images whose size differs from their scene."""
    if isinstance(record, EditRecord):
        pairs = [("source_image", record.scene_before), ("target_image", record.scene_after)]
    else:
        pairs = [("image", None)]
    problems = []
    for name, scene in pairs:
        path = getattr(record, name)
        if path not in checked:
            checked[path] = _image_size(Path(path))
        size = checked[path]
        if isinstance(size, str):
            problems.append(f"{name}: {size}")
        elif scene is not None and size != (scene["width"], scene["height"]):
            problems.append(f"{name}: image is {size[0]}x{size[1]} but its scene is {scene['width']}x{scene['height']}")
    return problems


def _image_size(path: Path) -> tuple[int, int] | str:
    if not path.is_file():
        return f"image file {path} does not exist"
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure and checksums without decoding all pixels
            return image.size
    except Exception as err:  # PIL raises many types for corrupt files; all mean "unreadable"
        return f"image file {path} is unreadable ({type(err).__name__}: {err})"


def load_records(path: str | Path, *, check_images: bool = True) -> list[Record]:
    """Read and validate a JSONL file of edit/understanding records.

    Args:
        path: the JSONL file; image paths inside are relative to its folder.
        check_images: also check every image file exists, decodes and matches its scene's size.

    Returns:
        The records in file order, image paths resolved to absolute paths.

    Raises:
        DataError: anything is wrong; ``problems`` lists every problem as ``file:line: problem`` (the whole file is
            refused: no record is dropped silently).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    base = path.resolve().parent
    records: list[Record] = []
    problems: list[str] = []
    seen_ids: dict[str, int] = {}
    checked: dict[str, tuple[int, int] | str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
                continue
            record, line_problems = record_from_json(data, base)
            if record is not None and check_images:
                line_problems = _image_problems(record, checked)
            if record is not None and record.id in seen_ids:
                line_problems.append(f"id {record.id!r} already used on line {seen_ids[record.id]}")
            elif record is not None:
                seen_ids[record.id] = number
            problems += [f"{where}: {p}" for p in line_problems]
            if record is not None:
                records.append(record)
    if problems:
        raise DataError(path, problems)
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write records as JSONL (written to a temporary file, then renamed into place).

    Absolute image paths are written relative to the file's folder; relative ones are written as given.
    Output is byte-identical for equal records (fixed key order, no timestamps).
    """
    path = Path(path)
    base = path.resolve().parent
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record_to_json(record, base), ensure_ascii=False, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
