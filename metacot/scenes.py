"""Synthetic scenes: random flat-colour objects on a plain background, their placement, naming and rendering.

A scene is the JSON-ready dict of :mod:`metacot.cot.schema` (``width``, ``height``, ``background``, ``objects``);
every object dict has ``id``, ``shape``, ``color``, ``size`` and ``box = [x0, y0, x1, y1]`` (pixels, x1/y1
exclusive) and optionally ``text``. Rendering is exact and deterministic: no anti-aliasing, every shape's pixels
fill its box tightly (the mask's bounding box *is* the box), boxes never overlap and keep a gap of at least
:func:`min_gap` pixels, colours are unique within a scene. That is what lets a colour-segmentation judge parse a
render back into objects, and lets tests check that an edit changed exactly the pixels the Meta-CoT names.

Text labels use a built-in 3x5 pixel font (digits and a few capitals, drawn in :data:`INK`) so OCR questions exist
even at 32 px; a label is only placed where it fits inside its object with a one-pixel margin.

Deliberately left out: overlapping or occluded objects, textures, gradients, lighting, a world larger than the
view (camera motion never reveals new objects).
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

from metacot.cot.schema import BACKGROUNDS, COLORS, INK, SHAPES, SIZES

Box = list[int]
Scene = dict[str, Any]
Obj = dict[str, Any]

SIZE_FRACTIONS: dict[str, float] = {"small": 0.19, "medium": 0.25, "large": 0.31}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
# Edits may add objects to a full scene (count changes, chains) up to this many.
MAX_OBJECTS_AFTER_EDIT = 6
LABEL_SHAPES = ("square", "circle")
LABEL_PROBABILITY = 0.5

# Polygon vertices in unit box coordinates; stretched to touch all four box edges when drawn.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.0, 1.0), (0.5, 0.0), (1.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "star": [  # five points, inner radius 0.45 of the outer one, normalised to the unit box
        (0.5, 0.0), (0.6391, 0.3515), (1.0, 0.382), (0.725, 0.6297), (0.809, 1.0),
        (0.5, 0.8015), (0.191, 1.0), (0.275, 0.6297), (0.0, 0.382), (0.3609, 0.3515),
    ],
}

# 3x5 glyphs, rows top to bottom. Only characters that stay unambiguous at this size.
_FONT_ROWS: dict[str, str] = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# ..# ..#", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.",
    "C": "### #.. #.. #.. ###", "E": "### #.. ### #.. ###", "F": "### #.. ### #.. #..",
    "H": "#.# #.# ### #.# #.#", "K": "#.# ##. #.. ##. #.#", "L": "#.. #.. #.. #.. ###",
    "P": "### #.# ### #.. #..", "U": "#.# #.# #.# #.# ###", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.",
}
LABEL_ALPHABET = "".join(_FONT_ROWS)

REGIONS: dict[str, tuple[int, int]] = {
    "top-left": (0, 0), "top": (1, 0), "top-right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom-left": (0, 2), "bottom": (1, 2), "bottom-right": (2, 2),
}
_REGION_PHRASES: dict[str, str] = {
    "top-left": "in the top-left corner", "top": "at the top", "top-right": "in the top-right corner",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom-left": "in the bottom-left corner", "bottom": "at the bottom",
    "bottom-right": "in the bottom-right corner",
}

_REGION_DESTINATIONS: dict[str, str] = {
    "top-left": "to the top-left corner", "top": "to the top", "top-right": "to the top-right corner",
    "left": "to the left side", "centre": "to the centre", "right": "to the right side",
    "bottom-left": "to the bottom-left corner", "bottom": "to the bottom",
    "bottom-right": "to the bottom-right corner",
}
BESIDE: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def min_gap(resolution: int) -> int:
    """Smallest gap in pixels between two boxes, so connected components stay apart."""
    return max(1, resolution // 32)


def side_for(size: str, resolution: int) -> int:
    """Box side in pixels of an object of named ``size`` at ``resolution``."""
    return max(3, round(resolution * SIZE_FRACTIONS[size]))


def label_scale(resolution: int) -> int:
    """Pixel scale of the 3x5 font: 1 up to 127 px, then grows with the resolution."""
    return max(1, resolution // 64)


def name_of(obj: Obj) -> str:
    """How instructions and Meta-CoTs refer to an object; unique because colours are unique in a scene."""
    return f"the {obj['color']} {obj['shape']}"


def describe(obj: Obj, with_size: bool = True) -> str:
    """Indefinite description of an object, e.g. ``"a small red star"``."""
    words = f"{obj['size']} {obj['color']} {obj['shape']}" if with_size else f"{obj['color']} {obj['shape']}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def box_center(box: Box) -> tuple[float, float]:
    """Centre of a box in pixel coordinates."""
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def region_of(box: Box, resolution: int) -> str:
    """Name of the 3x3 grid cell holding the box centre."""
    cx, cy = box_center(box)
    col, row = min(2, int(cx * 3 // resolution)), min(2, int(cy * 3 // resolution))
    return next(name for name, cell in REGIONS.items() if cell == (col, row))


def region_phrase(region: str) -> str:
    """Words for where something is, e.g. ``"in the top-left corner"``."""
    return _REGION_PHRASES[region]


def region_destination(region: str) -> str:
    """Words for where something goes, e.g. ``"to the top-left corner"``."""
    return _REGION_DESTINATIONS[region]


def boxes_apart(a: Box, b: Box, gap: int) -> bool:
    """True when boxes ``a`` and ``b`` are separated by at least ``gap`` pixels along x or y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def box_fits(scene: Scene, box: Box, ignore: tuple[str, ...] = ()) -> bool:
    """True when ``box`` lies inside the view and keeps the gap to every object not in ``ignore``."""
    w, h = scene["width"], scene["height"]
    if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h or box[2] - box[0] < 3 or box[3] - box[1] < 3:
        return False
    gap = min_gap(w)
    return all(boxes_apart(box, o["box"], gap) for o in scene["objects"] if o["id"] not in ignore)


def box_at(center: tuple[float, float], side_w: int, side_h: int | None = None) -> Box:
    """Box of the given sides centred (to the pixel) on ``center``."""
    side_h = side_w if side_h is None else side_h
    x0, y0 = round(center[0] - side_w / 2), round(center[1] - side_h / 2)
    return [x0, y0, x0 + side_w, y0 + side_h]


def place(
    rng: random.Random,
    scene: Scene,
    size: int | tuple[int, int],
    region: str | None = None,
    ignore: tuple[str, ...] = (),
    tries: int = 40,
) -> Box | None:
    """Sample a free box of ``size`` pixels (a side, or (w, h)), its centre inside ``region`` when given.

    Returns:
        The box, or None when ``tries`` random candidates all collide (the caller picks another edit).
    """
    width, height = (size, size) if isinstance(size, int) else size
    if width > scene["width"] or height > scene["height"]:
        return None
    res = scene["width"]
    for _ in range(tries):
        if region is None:
            x0, y0 = rng.randint(0, res - width), rng.randint(0, scene["height"] - height)
        else:  # sample the centre inside the region's grid cell, then keep the box inside the view
            col, row = REGIONS[region]
            cx, cy = rng.uniform(col * res / 3, (col + 1) * res / 3), rng.uniform(row * res / 3, (row + 1) * res / 3)
            x0 = min(max(0, round(cx - width / 2)), res - width)
            y0 = min(max(0, round(cy - height / 2)), scene["height"] - height)
        box = [x0, y0, x0 + width, y0 + height]
        if region is not None and region_of(box, scene["width"]) != region:
            continue
        if box_fits(scene, box, ignore):
            return box
    return None


def place_beside(
    rng: random.Random, scene: Scene, anchor: Box, size: tuple[int, int], direction: str, ignore: tuple[str, ...] = ()
) -> Box | None:
    """A free box of ``size`` (w, h) strictly ``direction`` (a key of :data:`BESIDE`) of ``anchor``, roughly aligned.

    Returns:
        The box, or None when there is no room on that side.
    """
    width, height = size
    gap = min_gap(scene["width"])
    acx, acy = box_center(anchor)
    for _ in range(20):
        slack = rng.randint(0, max(1, min(width, height) // 2))
        if direction in ("left", "right"):
            y0 = round(acy - height / 2) + rng.randint(-(height // 3), height // 3)
            x0 = anchor[0] - gap - slack - width if direction == "left" else anchor[2] + gap + slack
        else:
            x0 = round(acx - width / 2) + rng.randint(-(width // 3), width // 3)
            y0 = anchor[1] - gap - slack - height if direction == "above" else anchor[3] + gap + slack
        box = [x0, y0, x0 + width, y0 + height]
        if box_fits(scene, box, ignore):
            return box
    return None


def label_fits(shape: str, box: Box, text: str, resolution: int) -> bool:
    """True when ``text`` fits inside the shape with a one-pixel margin (squares: the box, circles: inscribed)."""
    if shape not in LABEL_SHAPES or not text:
        return False
    scale = label_scale(resolution)
    text_w, text_h = (4 * len(text) - 1) * scale, 5 * scale
    inner_w, inner_h = box[2] - box[0], box[3] - box[1]
    if shape == "circle":  # the square inscribed in the ellipse
        inner_w, inner_h = int(inner_w / 1.4142), int(inner_h / 1.4142)
    return text_w + 2 <= inner_w and text_h + 2 <= inner_h


def random_label(rng: random.Random, shape: str, box: Box, resolution: int) -> str | None:
    """A 1-2 character label that fits the object, or None when even one character does not."""
    for length in rng.sample([1, 2], 2):
        text = "".join(rng.choice(LABEL_ALPHABET) for _ in range(length))
        if label_fits(shape, box, text, resolution):
            return text
    return None


def random_scene(rng: random.Random, resolution: int) -> Scene:
    """A scene of 2-5 objects with unique colours, random shapes, sizes and non-overlapping positions."""
    while True:
        scene: Scene = {
            "width": resolution,
            "height": resolution,
            "background": rng.choice(list(BACKGROUNDS)),
            "objects": [],
        }
        colors = rng.sample(list(COLORS), MAX_OBJECTS)
        for index in range(rng.randint(MIN_OBJECTS, MAX_OBJECTS)):
            obj = new_object(rng, scene, f"o{index + 1}", colors[index])
            if obj is not None:
                scene["objects"].append(obj)
        if len(scene["objects"]) >= MIN_OBJECTS:
            return scene


def new_object(
    rng: random.Random, scene: Scene, obj_id: str, color: str, region: str | None = None, shape: str | None = None
) -> Obj | None:
    """A random object placed in a free spot of ``scene`` (smaller sizes tried when crowded); None if no room."""
    shape = shape or rng.choice(SHAPES)
    sizes = list(SIZES)
    start = rng.randrange(len(sizes))
    for size in reversed(sizes[: start + 1]):  # the drawn size first, then smaller ones
        box = place(rng, scene, side_for(size, scene["width"]), region)
        if box is None:
            continue
        obj: Obj = {"id": obj_id, "shape": shape, "color": color, "size": size, "box": box}
        if shape in LABEL_SHAPES and rng.random() < LABEL_PROBABILITY:
            text = random_label(rng, shape, box, scene["width"])
            if text is not None:
                obj["text"] = text
        return obj
    return None


def free_colors(scene: Scene) -> list[str]:
    """Palette colours no object in ``scene`` uses, in palette order."""
    used = {o["color"] for o in scene["objects"]}
    return [c for c in COLORS if c not in used]


def next_id(scene: Scene, taken: set[str] = frozenset()) -> str:
    """A fresh object id ``oN`` not used in ``scene`` nor in ``taken``."""
    used = {o["id"] for o in scene["objects"]} | set(taken)
    index = 1
    while f"o{index}" in used:
        index += 1
    return f"o{index}"


def clone(scene: Scene) -> Scene:
    """Deep copy of a scene (edits never mutate their input); 10x faster than ``copy.deepcopy`` here."""
    return {**scene, "objects": [{**o, "box": list(o["box"])} for o in scene["objects"]]}


def find(scene: Scene, obj_id: str) -> Obj:
    """The object with ``obj_id``; KeyError names the id when it is missing."""
    for obj in scene["objects"]:
        if obj["id"] == obj_id:
            return obj
    raise KeyError(f"scene has no object {obj_id!r}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene exactly: flat colours, no anti-aliasing, each shape touching all four edges of its box."""
    image = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        _draw_shape(draw, obj["shape"], obj["box"], COLORS[obj["color"]])
        if obj.get("text"):
            _draw_text(draw, obj["box"], obj["text"], label_scale(scene["width"]))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL boxes are inclusive
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    else:
        points = [(round(x0 + u * (x1 - x0)), round(y0 + v * (y1 - y0))) for u, v in _POLYGONS[shape]]
        draw.polygon(points, fill=rgb)


def _draw_text(draw: ImageDraw.ImageDraw, box: Box, text: str, scale: int) -> None:
    text_w, text_h = (4 * len(text) - 1) * scale, 5 * scale
    left = box[0] + (box[2] - box[0] - text_w) // 2
    top = box[1] + (box[3] - box[1] - text_h) // 2
    for index, char in enumerate(text):
        for row, bits in enumerate(_FONT_ROWS[char].split()):
            for col, bit in enumerate(bits):
                if bit == "#":
                    x, y = left + (4 * index + col) * scale, top + row * scale
                    draw.rectangle([x, y, x + scale - 1, y + scale - 1], fill=INK)


MIN_RESOLUTION = 16  # scene images alone: 2-5 objects fit


def sample_scene_images(n: int, resolution: int, seed: int) -> list[Image.Image]:
    """Render ``n`` random scenes as the synthetic data recipe draws them (e.g. to train a tiny VAE).

    Args:
        n: number of images.
        resolution: side in pixels (square images).
        seed: same seed, same images.

    Returns:
        ``n`` RGB images of ``resolution`` x ``resolution``.

    Raises:
        ValueError: ``n`` is negative or ``resolution`` is below 16 (objects would not fit).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION} pixels so 2-5 objects fit, got {resolution}")
    return [render_scene(random_scene(random.Random(f"scene-images:{seed}:{i}"), resolution)) for i in range(n)]
