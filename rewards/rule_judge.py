"""A rule-based CoT-Editing Consistency judge for synthetic flat-colour scenes (no VLM needed).

``CECRuleJudge`` is the reward of the tiny runs: it checks whether the edited image shows what the Meta-CoT says,
object by object, using the scene descriptions of the synthetic recipe (``extras["scene_before"]``,
``extras["scene_after"]``, dicts as in :mod:`metacot.cot.schema`). Scale (0, 10). Deterministic.

How it scores one sample:

1. **Parse the edited image into objects.** Every pixel gets the nearest colour of the synthetic palette (object
   colours, backgrounds, text ink), or "unknown" when none is within :data:`COLOR_TOLERANCE` (RGB distance).
   Colours are unique within a scene, so the largest connected component of one object colour (with what of that
   colour lies inside its bounding box) is one detected object: its area, centroid, bounding box and shape fits
   (IoU with each shape's template drawn into that box). It counts as absent when smaller than
   :data:`MIN_AREA_FRACTION` of the image, or when it is a fringe (no pixel whose four neighbours share its
   colour, and sparse in its box): the seams that blur leaves between two colours can land near a third one.
2. **Build the scene the Meta-CoT implies.** Each traversal entry names an object ("the red circle"): its colour
   word finds the object in ``scene_before`` (or, for an added object, in ``scene_after``). An entry marked *kept*
   expects the object exactly as before; an entry marked *changed* expects the object's state in ``scene_after``
   (the exact form of the stated change; absent there = removed). Objects of ``scene_before`` the traversal does
   not mention are expected kept. Without a Meta-CoT (``cots[i] is None``) the traversal is read off the scenes.
3. **Score every item in [0, 1]** against the detected objects (``c`` centroid, ``A`` area, ``s`` the expected
   object's longer box side):

   - kept object: mean of position ``max(0, 1 - |c - c_exp| / s)``, size ``min(A, A_exp) / max(A, A_exp)``,
     shape (fit of the expected shape / best fit) and, for labelled objects, text
     ``max(0, 1 - ink pixels wrong in its box / ink pixels expected)`` (ink = darker than
     :data:`INK_LUMA_SHARE` of the object colour's luminance, best alignment within one pixel); 0 when absent.
     When its colour is absent but an otherwise unexplained colour covers its place (IoU >= 0.5), it was
     recoloured: half of what it scores in that colour.
   - changed object: *progress* on each attribute the change touches, from the before state (0) to the stated
     one (1): colour (new colour present, and ``1 - min(1, A_old / A_before)`` with ``A_old`` the old colour's
     pixels on the object's former or new place), position ``clip(1 - |c - c_exp| / |c_before - c_exp|)``, size
     ``clip(1 - |ln(A / A_exp)| / |ln(A_before / A_exp)|)``, shape ``clip((fit_new - fit_old) / (the same on the
     exact render))``, text ``clip(1 - ink wrong / ink differing between the old and the stated label)``;
     item = mean progress x mean of the kept-object scores of the attributes it keeps.
   - added object: as a kept object, against its stated state. Removed object: the share of its former pixels
     that now show what the expected scene has there (usually background).
   - an entry naming an object neither scene has: 1 if an object of that colour and shape is present, 0.5 if
     the colour only, else 0. An entry marked changed whose object the ground truth leaves unchanged (we do not
     know how): 1 - its kept-object score.
   - every other detected object colour nothing explains (not expected, not a removed or recoloured object's
     old colour): one kept item scoring 0 (over-editing).
   - background ``bg = min(1, share of pixels in the expected background colour / share in the expected
     scene)``; a target item when the edit changes the background.
4. **Combine:** ``score = 10 * mean(target items) * mean(kept items) * bg`` (a mean over no items is 1; ``bg``
   is 1 here when the background is a target). The product makes every part necessary: the unedited source
   scores 0 on any real edit (no progress), a blank canvas scores 0 whenever an object should remain, a correct
   edit that wrecks the rest scores low, the ground-truth target scores 10.

``judge.stats`` counts scored samples, ``none_no_scene`` (samples without scene descriptions: returns None),
``none_unparsed_cot`` (the sample's CoT is text, a model-written Meta-CoT that did not parse: there is no plan to
check the edit against, and reading the plan off the scenes would judge against the dataset's reasoning instead of
the one the generator followed, so it returns None), ``no_cot_used_scenes``, ``unmatched_entries``,
``unmentioned_objects`` and ``unexpected_objects``.
Cost on one CPU core: about 8-15 ms per sample at 64 px (more for noise images, whose colours scatter: the
connected components are a pure-Python search, so this is meant for the recipe's small renders); single-object
renders are cached (a GRPO group shares its scenes), and large batches are split over worker processes.

What it leaves out: reading text (labels are compared as ink patterns, not characters), overlapping objects,
anything but the synthetic palette (real photographs need the VLM judge, rewards.cec), and judging the Meta-CoT
itself against the instruction (a wrong plan carried out faithfully scores high: that is what consistency means).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import re
import weakref
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from metacot.cot.schema import BACKGROUNDS, COLORS, INK, SHAPES
from metacot.scenes import render_scene
from rewards.contract import RewardBatch

COLOR_TOLERANCE = 64.0
MIN_AREA_FRACTION = 0.003
# Palette order: object colours, backgrounds, ink. Labels index into it; -1 = unknown.
_NAMES = [*COLORS, *(f"background:{k}" for k in BACKGROUNDS), "ink"]
_RGB = np.array([*COLORS.values(), *BACKGROUNDS.values(), INK], dtype=np.float64)
_OBJECT_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_LUMA = np.array([0.299, 0.587, 0.114])
# A pixel inside an object's box is ink when darker than this share of the object colour's luminance: a blurred
# one-pixel stroke keeps well under it, the object and the background stay above.
INK_LUMA_SHARE = 0.75


@dataclass
class Blob:
    """An object as seen in an image: the pixels of one colour."""

    mask: np.ndarray  # (H, W) bool
    area: int
    centroid: np.ndarray  # (2,) x, y
    side: int  # longer side of its bounding box


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The mask within the bounding box of its largest 8-connected component (breadth-first search).

    Colours are unique in a scene, so one object is one component; stray pixels of its colour elsewhere (blends
    at other objects' edges) are not part of it.
    """
    todo = set(zip(*np.nonzero(mask)))
    best: list[tuple[int, int]] = []
    while todo:
        start = todo.pop()
        component, frontier = [start], [start]
        while frontier:
            y, x = frontier.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    nb = (y + dy, x + dx)
                    if nb in todo:
                        todo.remove(nb)
                        component.append(nb)
                        frontier.append(nb)
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        # Pieces inside its bounding box belong to it (the object colour inside the loops of an "8" label).
        out[min(ys):max(ys) + 1, min(xs):max(xs) + 1] = mask[min(ys):max(ys) + 1, min(xs):max(xs) + 1]
    return out


def _blob(mask: np.ndarray) -> Blob | None:
    area = int(mask.sum())
    if area == 0:
        return None
    ys, xs = np.nonzero(mask)
    side = int(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    return Blob(mask, area, np.array([xs.mean(), ys.mean()]), side)


def _core(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours share their label (outside the image counts as shared).

    An object a few pixels wide has a core; the one-pixel fringes that blur or resampling leave between two
    colours, whose blend can land near a third palette colour, have none.
    """
    padded = np.pad(mask, 1, constant_values=True)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) index into the palette (object colours, backgrounds, ink), -1 where none is near."""
    # Flat renders hold a handful of distinct colours: label each distinct colour once.
    packed = image.astype(np.int64).reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])
    colors, inverse = np.unique(packed, return_inverse=True)
    rgb = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], axis=-1).astype(np.float64)
    dist = np.sqrt(((rgb[:, None, :] - _RGB[None]) ** 2).sum(-1))
    labels = dist.argmin(axis=-1)
    labels[dist.min(axis=-1) > COLOR_TOLERANCE] = -1
    return labels[inverse.reshape(-1)].reshape(image.shape[:2])


def _color_mask(obj: dict[str, Any], width: int, height: int, rgb: Sequence[int]) -> np.ndarray:
    """Pixels of colour ``rgb`` where the renderer draws ``obj`` alone on white (read-only, shared: do not write)."""
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in obj.items()))
    return _rendered_mask(key, width, height, tuple(rgb))


@functools.lru_cache(maxsize=4096)
def _rendered_mask(obj: tuple, width: int, height: int, rgb: tuple[int, int, int]) -> np.ndarray:
    # Cached: the samples of a GRPO group share their scenes; rendering was half of the judge's time.
    one = {k: list(v) if isinstance(v, tuple) else v for k, v in obj}
    img = np.asarray(render_scene({"width": width, "height": height, "background": "white", "objects": [one]}))
    mask = (img[..., 0] == rgb[0]) & (img[..., 1] == rgb[1]) & (img[..., 2] == rgb[2])
    mask.flags.writeable = False
    return mask


def _object_mask(obj: dict[str, Any], width: int, height: int, shape: str | None = None,
                 box: Sequence[int] | None = None) -> np.ndarray:
    """Pixels of ``obj``'s colour when drawn alone by the recipe's renderer (optionally as another shape / box)."""
    one = dict(obj, shape=shape or obj["shape"], box=list(box if box is not None else obj["box"]))
    if shape is not None:
        one.pop("text", None)
    return _color_mask(one, width, height, COLORS[obj["color"]])


def _ink_mask(obj: dict[str, Any], width: int, height: int) -> np.ndarray:
    """Pixels of the object's text label (ink) when drawn alone; all False when it has none."""
    if not obj.get("text"):
        return np.zeros((height, width), dtype=bool)
    return _color_mask(obj, width, height, INK)


def shape_fits(blob: Blob, width: int, height: int) -> dict[str, float]:
    """IoU of the blob with each shape's template drawn into the blob's bounding box."""
    ys, xs = np.nonzero(blob.mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    crop = blob.mask[y0:y1, x0:x1]
    fits = {}
    for shape in SHAPES:  # drawn where the blob is (the renderer rounds half to even: not shift-invariant)
        box = [x0, y0, x1, y1]
        template = _object_mask({"color": "red", "shape": shape, "box": box}, x1, y1, shape=shape, box=box)
        template = template[y0:y1, x0:x1]
        fits[shape] = float((template & crop).sum() / max(1, (template | crop).sum()))
    return fits


def classify_shape(blob: Blob, width: int, height: int) -> str:
    """The shape whose template, drawn into the blob's bounding box, overlaps the blob best (first on ties)."""
    fits = shape_fits(blob, width, height)
    return max(SHAPES, key=lambda s: (fits[s], -SHAPES.index(s)))


def parse_name(name: str) -> tuple[str | None, str | None]:
    """The palette colour and shape words in an object's name ("the red circle" -> ("red", "circle"))."""
    words = re.findall(r"[a-z]+", name.lower())
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return color, shape


class _Sample:
    """One edited image parsed against one pair of scenes."""

    def __init__(self, edited: Image.Image, before: dict[str, Any], after: dict[str, Any]) -> None:
        self.w, self.h = int(before["width"]), int(before["height"])
        if edited.size != (self.w, self.h):
            # Nearest keeps palette colours pure; a blend would land between two palette entries.
            edited = edited.resize((self.w, self.h), Image.Resampling.NEAREST)
        rgb = np.asarray(edited.convert("RGB"), dtype=np.float64)
        self.labels = label_pixels(rgb)
        self.luma = rgb @ _LUMA
        self.min_area = max(2, round(MIN_AREA_FRACTION * self.w * self.h))
        self.before, self.after = before, after
        self._fits: dict[str, dict[str, float]] = {}
        self._detected: dict[str, Blob | None] = {}
        self._expected: dict[str, Blob | None] = {}
        self.expected_labels = self.labels  # replaced by set_expected() before any item is scored

    def area(self, color: str) -> int:
        return int((self.labels == _OBJECT_COLOR_INDEX[color]).sum())

    def detect(self, color: str) -> Blob | None:
        """The object of this colour: its largest connected component, unless too small or a mere fringe."""
        if color not in self._detected:
            mask = self.labels == _OBJECT_COLOR_INDEX[color]
            blob = _blob(largest_component(mask)) if mask.sum() >= self.min_area else None
            # A fringe (no core, sparse in its box) is not an object; a tiny object of a few pixels is dense.
            if blob is not None and (blob.area < self.min_area
                                     or (not _core(blob.mask).any() and blob.area < 0.4 * blob.side ** 2)):
                blob = None
            self._detected[color] = blob
        return self._detected[color]

    def fits(self, color: str, blob: Blob) -> dict[str, float]:
        if color not in self._fits:
            self._fits[color] = shape_fits(blob, self.w, self.h)
        return self._fits[color]

    def shape_of(self, color: str, blob: Blob) -> str:
        fits = self.fits(color, blob)
        return max(SHAPES, key=lambda s: (fits[s], -SHAPES.index(s)))

    def expected(self, obj: dict[str, Any]) -> Blob | None:
        """``obj`` as the renderer draws it (cached: scoring asks for the same objects many times)."""
        key = repr(sorted(obj.items()))
        if key not in self._expected:
            self._expected[key] = _blob(_object_mask(obj, self.w, self.h))
        return self._expected[key]

    def text(self, obj: dict[str, Any], before: dict[str, Any] | None = None) -> float:
        """Agreement of the ink inside ``obj``'s box with its label: ``1 - wrong / ink pixels`` (kept), or progress
        ``1 - wrong / (pixels where before's and obj's ink differ)`` when ``before`` is given."""
        x0, y0, x1, y1 = (max(0, v) for v in obj["box"])
        want = _ink_mask(obj, self.w, self.h)[y0:y1, x0:x1]

        def mismatch(ink: np.ndarray) -> int:
            # The best alignment within one pixel: a label drawn one pixel off still reads the same.
            ink = np.pad(ink, 1)
            return min(int((want ^ ink[y0 + 1 + dy:y1 + 1 + dy, x0 + 1 + dx:x1 + 1 + dx]).sum())
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1))

        wrong = mismatch(self.luma < INK_LUMA_SHARE * float(np.array(COLORS[obj["color"]]) @ _LUMA))
        if before is None:
            return max(0.0, 1.0 - wrong / max(1, int(want.sum())))
        ref = mismatch(_ink_mask(before, self.w, self.h))
        return float(np.clip(1.0 - wrong / max(1, ref), 0.0, 1.0))

    # -- item scores ------------------------------------------------------------------------------------------
    def keep_parts(self, obj: dict[str, Any]) -> dict[str, float]:
        """Position, size, shape (and label) agreement of the detected object of ``obj``'s colour with ``obj``."""
        blob, exp = self.detect(obj["color"]), self.expected(obj)
        if blob is None or exp is None:
            return {"position": 0.0, "size": 0.0, "shape": 0.0}
        fits = self.fits(obj["color"], blob)
        parts = {
            "position": max(0.0, 1.0 - float(np.linalg.norm(blob.centroid - exp.centroid)) / exp.side),
            "size": min(blob.area, exp.area) / max(blob.area, exp.area),
            # Soft: a blurred small star may fit a diamond about as well; a kept square drawn round still loses.
            "shape": fits[obj["shape"]] / max(1e-9, max(fits.values())),
        }
        if obj.get("text"):
            parts["text"] = self.text(obj)
        return parts

    def kept(self, obj: dict[str, Any]) -> float:
        return float(np.mean(list(self.keep_parts(obj).values())))

    def kept_or_recolored(self, obj: dict[str, Any], spare: list[str]) -> tuple[float, str | None]:
        """A kept object's score; when its colour is gone but an unexplained colour sits in its place (IoU >= 0.5),
        that is the object recoloured: half its geometry score, and that colour is not counted again as an
        unexpected object. Returns (score, the colour used or None)."""
        if self.detect(obj["color"]) is not None or not spare:
            return self.kept(obj), None
        exp = self.expected(obj)
        for color in spare:
            blob = self.detect(color)
            if exp is None or blob is None:
                continue
            if (blob.mask & exp.mask).sum() >= 0.5 * (blob.mask | exp.mask).sum():
                return 0.5 * self.kept(dict(obj, color=color)), color
        return 0.0, None

    def removed(self, obj: dict[str, Any]) -> float:
        """Share of the object's former pixels that now show what the expected scene has there."""
        exp = self.expected(obj)
        if exp is None:
            return 1.0
        return float((self.labels[exp.mask] == self.expected_labels[exp.mask]).mean())

    def changed(self, b: dict[str, Any], e: dict[str, Any]) -> float:
        """Progress from ``b`` to ``e`` on the attributes that differ, times how well the others are kept."""
        bb, eb = self.expected(b), self.expected(e)
        if eb is None:  # the stated state is entirely outside the view: as good as removed
            return self.removed(b)
        touched: dict[str, float] = {}
        blob = self.detect(e["color"])
        if blob is None:
            return 0.0
        if b["color"] != e["color"]:
            touched["color"] = 1.0
            if bb is not None:  # only the old colour left on its former or new place counts (not another object's)
                old = (self.labels == _OBJECT_COLOR_INDEX[b["color"]]) & (bb.mask | eb.mask)
                touched["color"] = 1.0 - min(1.0, old.sum() / bb.area)
        if bb is not None and np.linalg.norm(bb.centroid - eb.centroid) > 0.5:
            d0 = float(np.linalg.norm(bb.centroid - eb.centroid))
            touched["position"] = float(np.clip(1 - np.linalg.norm(blob.centroid - eb.centroid) / d0, 0, 1))
        if bb is not None and abs(bb.area - eb.area) > 0.1 * max(bb.area, eb.area):
            d0 = abs(math.log(bb.area / eb.area))
            touched["size"] = float(np.clip(1 - abs(math.log(blob.area / eb.area)) / d0, 0, 1))
        if b["shape"] != e["shape"]:
            touched["shape"] = self.shape_progress(blob, e, b["shape"], eb)
        if b.get("text") != e.get("text"):
            touched["text"] = self.text(e, before=b)
        if not touched:  # nothing measurable differs (cannot happen for scenes that differ)
            return 0.0
        keep = {k: v for k, v in self.keep_parts(e).items() if k not in touched}
        return float(np.mean(list(touched.values()))) * (float(np.mean(list(keep.values()))) if keep else 1.0)

    def shape_progress(self, blob: Blob, e: dict[str, Any], old: str, eb: Blob) -> float:
        """How much better the blob fits the new shape than the old one, relative to the exact render:
        ``clip((fit_new - fit_old) / (exact_new - exact_old), 0, 1)`` (the old shape drawn scores 0)."""
        got, exact = self.fits(e["color"], blob), shape_fits(eb, self.w, self.h)
        span = exact[e["shape"]] - exact[old]
        if span <= 0:  # tiny objects where the two shapes render alike: fall back to the best fit
            return float(self.shape_of(e["color"], blob) == e["shape"])
        return float(np.clip((got[e["shape"]] - got[old]) / span, 0.0, 1.0))

    def claim(self, color: str | None, shape: str | None) -> float:
        """An object named by colour and shape that neither scene has: 1 present as named, 0.5 colour only."""
        if color is None or (blob := self.detect(color)) is None:
            return 0.0
        return 1.0 if shape is None or self.shape_of(color, blob) == shape else 0.5

    def set_expected(self, expected_objects: list[dict[str, Any]]) -> None:
        """Render the scene the Meta-CoT implies (the after background, the expected objects) as palette labels."""
        scene = {"width": self.w, "height": self.h, "background": self.after["background"],
                 "objects": expected_objects}
        self.expected_labels = label_pixels(np.asarray(render_scene(scene)))

    def background(self) -> float:
        bg = _NAMES.index(f"background:{self.after['background']}")
        expected_share = float((self.expected_labels == bg).mean())
        share = float((self.labels == bg).mean())
        return min(1.0, share / expected_share) if expected_share > 0 else 1.0


def _traversal_from_scenes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, bool]]:
    after_by_id = {o["id"]: o for o in after["objects"]}
    before_ids = {o["id"] for o in before["objects"]}
    entries = [(f"the {o['color']} {o['shape']}", after_by_id.get(o["id"]) != o) for o in before["objects"]]
    entries += [(f"the {o['color']} {o['shape']}", True) for o in after["objects"] if o["id"] not in before_ids]
    return entries


class CECRuleJudge:
    """Rule-based CEC reward on synthetic scenes, scale (0, 10); the formula is in the module docstring.

    Needs ``extras["scene_before"]`` and ``extras["scene_after"]``; returns None for samples whose scenes are None
    (``stats["none_no_scene"]``) and for samples whose CoT is unparsed text (``stats["none_unparsed_cot"]``).
    Deterministic: no randomness anywhere.

    Scoring is pure-Python-heavy (GIL-bound: threads do not run it in parallel), so a batch of at least
    ``2 * workers`` samples is split over ``workers`` processes, started with the judge and kept for its lifetime
    (spawned: safe beside CUDA). ``workers=None`` takes up to 8 of the machine's cores, leaving one;
    0 or 1 scores in the calling process. Scores and ``stats`` are the same either way.
    """

    scale = (0.0, 10.0)

    def __init__(self, workers: int | None = None) -> None:
        self.workers = min(8, (os.cpu_count() or 1) - 1) if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:  # start the workers now: a spawned process imports for seconds, while the run sets up
            for _ in range(self.workers):
                self._process_pool().submit(int)
        self.stats: dict[str, int] = {k: 0 for k in ("scored", "none_no_scene", "none_unparsed_cot",
                                                     "no_cot_used_scenes",
                                                     "unmatched_entries", "unmentioned_objects",
                                                     "unexpected_objects")}

    def __call__(self, batch: RewardBatch) -> list[float | None]:
        missing = [k for k in ("scene_before", "scene_after") if k not in batch.extras]
        if missing:
            raise ValueError(f"CECRuleJudge needs extras {missing} (scene descriptions of the synthetic recipe); "
                             f"use it with `metacot data synth` data, or use the VLM judge (cec_vlm) otherwise")
        todo: list[tuple[int, Image.Image, dict[str, Any], dict[str, Any], list[tuple[str, bool]]]] = []
        scores: list[float | None] = [None] * len(batch)
        for i in range(len(batch)):
            before, after = batch.extras["scene_before"][i], batch.extras["scene_after"][i]
            if before is None or after is None:
                self.stats["none_no_scene"] += 1
                continue
            if isinstance(batch.cots[i], str):
                self.stats["none_unparsed_cot"] += 1
                continue
            todo.append((i, batch.edited_images[i], before, after, self._entries(before, after, batch.cots[i])))
        if self.workers > 1 and len(todo) >= 2 * self.workers:
            size = -(-len(todo) // self.workers)  # contiguous: a group's samples share scenes (render cache)
            chunks = [todo[k:k + size] for k in range(0, len(todo), size)]
            args = [[(np.asarray(img.convert("RGB")), b, a, e) for _, img, b, a, e in chunk] for chunk in chunks]
            for chunk, (values, stats) in zip(chunks, self._process_pool().map(_score_in_worker, args)):
                for (i, *_), value in zip(chunk, values):
                    scores[i] = value
                for k, v in stats.items():
                    self.stats[k] += v
            return scores
        for i, img, before, after, entries in todo:
            scores[i] = self._score(img, before, after, entries)["score"]
        return scores

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (they also stop when the judge is garbage-collected or the program exits)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}

    def score_sample(self, edited: Image.Image, before: dict[str, Any], after: dict[str, Any],
                     cot: Any = None) -> dict[str, Any]:
        """Score one sample; returns ``{"score", "targets": [(name, item)], "kept": [(name, item)], "background"}``."""
        return self._score(edited, before, after, self._entries(before, after, cot))

    def _entries(self, before: Any, after: Any, cot: Any) -> list[tuple[str, bool]]:
        """The traversal as (object name, changed): the Meta-CoT's, or read off the scenes without one."""
        for name, scene in (("scene_before", before), ("scene_after", after)):
            if not isinstance(scene, dict) or "objects" not in scene:
                raise ValueError(f"{name} must be a scene dict with 'objects' (metacot.cot.schema), got "
                                 f"{type(scene).__name__}")
        if cot is None:
            self.stats["no_cot_used_scenes"] += 1
            return _traversal_from_scenes(before, after)
        return [(t.name, bool(t.changed)) for t in cot.traversal]

    def _score(self, edited: Image.Image, before: dict[str, Any], after: dict[str, Any],
               entries: list[tuple[str, bool]]) -> dict[str, Any]:
        sample = _Sample(edited, before, after)
        plan = self._plan(before, after, entries)
        sample.set_expected([item[4] for item in plan if item[4] is not None])
        explained = {c for item in plan for c in item[3] if c}
        spare = [c for c in COLORS if c not in explained and sample.detect(c) is not None]
        targets: list[tuple[str, float]] = []
        kept: list[tuple[str, float]] = []
        for role, name, how, _, _ in plan:
            if role == "keep-object":
                value, used = sample.kept_or_recolored(how, spare)
                spare = [c for c in spare if c != used]
                kept.append((name, value))
            else:
                (targets if role == "target" else kept).append((name, how(sample)))
        self.stats["unexpected_objects"] += len(spare)
        kept += [(f"unexpected {color} object", 0.0) for color in spare]
        background = ("background", sample.background())
        bg_changed = after["background"] != before["background"]
        if bg_changed:
            targets.append(background)
        target_mean = float(np.mean([v for _, v in targets])) if targets else 1.0
        kept_mean = float(np.mean([v for _, v in kept])) if kept else 1.0
        score = 10.0 * target_mean * kept_mean * (1.0 if bg_changed else background[1])
        self.stats["scored"] += 1
        return {"score": score, "targets": targets, "kept": kept, "background": background[1]}

    def _plan(self, before: dict[str, Any], after: dict[str, Any], entries: list[tuple[str, bool]]) -> list[tuple]:
        """What to check: ``(role, name, how, colours it explains, expected object)`` per item.

        ``role`` is "target", "keep" or "keep-object" (a kept object of the scene: may be found recoloured);
        ``how`` is a function of the parsed sample (or, for "keep-object", the object dict).
        """
        before_by_color = {o["color"]: o for o in before["objects"]}
        after_by_id = {o["id"]: o for o in after["objects"]}
        before_ids = {o["id"] for o in before["objects"]}
        added_by_color = {o["color"]: o for o in after["objects"] if o["id"] not in before_ids}
        plan: list[tuple] = []
        mentioned: set[str] = set()
        for name, changed in entries:
            color, shape = parse_name(name)
            b = before_by_color.get(color) if color else None
            if b is not None:
                mentioned.add(b["id"])
            if b is not None and not changed:
                plan.append(("keep-object", name, b, (color,), b))
            elif b is not None:
                e = after_by_id.get(b["id"])
                if e is None:
                    plan.append(("target", name, lambda smp, b=b: smp.removed(b), (color,), None))
                elif e == b:  # the Meta-CoT says changed, the ground truth does not say how: any visible change
                    plan.append(("target", name, lambda smp, b=b: 1.0 - smp.kept(b), (color,), None))
                else:
                    plan.append(("target", name, lambda smp, b=b, e=e: smp.changed(b, e), (color, e["color"]), e))
            elif changed and color in added_by_color:
                e = added_by_color[color]
                plan.append(("target", name, lambda smp, e=e: smp.kept(e), (color,), e))
            else:
                self.stats["unmatched_entries"] += 1
                plan.append(("target" if changed else "keep", name,
                             lambda smp, c=color, s=shape: smp.claim(c, s), (color,), None))
        for obj in before["objects"]:
            if obj["id"] not in mentioned:
                self.stats["unmentioned_objects"] += 1
                plan.append(("keep-object", f"the {obj['color']} {obj['shape']} (not in the Meta-CoT)", obj,
                             (obj["color"],), obj))
        return plan


def _score_in_worker(items: list[tuple[np.ndarray, dict[str, Any], dict[str, Any], list[tuple[str, bool]]]],
                     ) -> tuple[list[float], dict[str, int]]:
    """Score ``(RGB array, scene_before, scene_after, traversal entries)`` items in a worker process; returns the
    scores and the counts this adds to ``CECRuleJudge.stats``."""
    judge = CECRuleJudge(workers=0)
    scores = [judge._score(Image.fromarray(img), before, after, entries)["score"]
              for img, before, after, entries in items]
    return scores, judge.stats
