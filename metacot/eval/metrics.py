"""Edit-quality measures against ground truth, and the two baselines every result is shown beside.

All measures compare RGB images as float arrays in [0, 1]:

- ``sim``: ``1 - mean |edited - target|`` over all pixels and channels.
- ``sim_changed``: the same, restricted to the pixels the ground-truth edit changed (``source != target``); this is
  where an edit succeeds or fails. NaN when the edit changed nothing.
- ``sim_kept``: restricted to the pixels the edit must keep (``source == target``): over-editing shows here.
- ``psnr``: peak signal-to-noise ratio against the target, in dB (capped at 60 for identical images).

Baselines: ``copy`` returns the source unchanged (perfect ``sim_kept``, poor ``sim_changed``); ``erase`` paints the
edited region (the ground-truth changed pixels, grown to their bounding boxes) with the background colour. Beating
``copy`` alone proves little; beating ``erase`` shows the model puts the right content where the edit happens.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

BASELINES = ("copy", "erase")


def to_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64) / 255.0


def changed_mask(source: Image.Image, target: Image.Image) -> np.ndarray:
    """[H, W] bool: pixels the ground-truth edit changed."""
    t = to_array(target)
    s = to_array(source, (t.shape[1], t.shape[0]))
    return np.abs(s - t).max(axis=2) > 1e-6


def edit_scores(edited: Image.Image, source: Image.Image, target: Image.Image) -> dict[str, float]:
    """``sim``, ``sim_changed``, ``sim_kept`` and ``psnr`` of ``edited`` against ``target`` (module docstring)."""
    t = to_array(target)
    e = to_array(edited, (t.shape[1], t.shape[0]))
    err = np.abs(e - t).mean(axis=2)
    mask = changed_mask(source, target)
    mse = float(((e - t) ** 2).mean())
    return {
        "sim": float(1 - err.mean()),
        "sim_changed": float(1 - err[mask].mean()) if mask.any() else math.nan,
        "sim_kept": float(1 - err[~mask].mean()) if (~mask).any() else math.nan,
        "psnr": 60.0 if mse <= 1e-12 else min(60.0, 10 * math.log10(1.0 / mse)),
    }


def changed_boxes(scene_before: dict | None, scene_after: dict | None) -> list[list[int]] | None:
    """Boxes (before and after) of every object the edit added, removed, moved or altered; None without scenes."""
    if not scene_before or not scene_after:
        return None
    before = {o["id"]: o for o in scene_before["objects"]}
    after = {o["id"]: o for o in scene_after["objects"]}
    boxes = []
    for oid in before.keys() | after.keys():
        b, a = before.get(oid), after.get(oid)
        if b != a:
            boxes += [o["box"] for o in (b, a) if o is not None]
    return boxes


def baseline_image(name: str, source: Image.Image, target: Image.Image, *, scene_before: dict | None = None,
                   scene_after: dict | None = None) -> Image.Image:
    """The ``copy`` or ``erase`` baseline's output for one sample.

    ``erase`` paints the edited region with the background colour: the boxes of the objects the edit touched when
    the scenes are known, else the tight box of the ground-truth changed pixels. Camera motions touch everything,
    so there ``erase`` blanks the whole view.
    """
    src = source.convert("RGB").resize(target.size)
    if name == "copy":
        return src
    if name != "erase":
        raise ValueError(f"unknown baseline {name!r}; use one of {BASELINES}")
    arr = np.asarray(src).copy()
    colours, counts = np.unique(arr.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]  # the plain background is the most common colour of a scene
    boxes = changed_boxes(scene_before, scene_after)
    if boxes is None:
        mask = changed_mask(source, target)
        ys, xs = np.nonzero(mask)
        boxes = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]] if mask.any() else []
    for x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = background
    return Image.fromarray(arr)
