"""Simulated annotators: 0-10 labels derived from the ground-truth target image, for demos and tests only.

They stand in for people where none are at hand (the tiny quickstart, the calibration tests), so they must not be
the judge under test plus noise: that would calibrate a judge against itself. They measure something else, at the
pixel level, against the ground-truth target image ``T`` (the rule judge never looks at it; it parses objects):

- both images are first seen as an annotator's eye sees them: a Gaussian blur of :data:`EYE_BLUR_PX` pixels, so
  grain, a slightly soft edge or a one-pixel offset cost little;
- a pixel is *wrong* in ``X`` when its L1 distance to ``T`` (mean over channels, in [0, 1]) exceeds
  :data:`PIXEL_TOLERANCE`; the changed region ``R`` is where ``S`` itself is wrong, ``U`` the rest;
- ``change = 1 - share of R wrong in X``: how much of the needed change happened (1 when ``R`` is empty);
- ``keep = clip(1 - share of U wrong in X / max(share of U wrong in E, KEEP_FLOOR), 0, 1)`` where ``E`` is
  ``T``'s background colour everywhere: wiping out everything that should stay counts as 0;
- true score ``10 * sqrt(change * keep)`` (a geometric mean, like VIEScore's overall: lenient on partial work);
- each annotator ``a`` adds a bias ``b_a ~ N(0, bias_sd)`` fixed per annotator and noise ``N(0, noise_sd)`` per
  label, then rounds to an integer in 0..10, as a person on the labelling page would.

Every label line carries ``simulated: true``; calibration reports carry it on, and the Flow-GRPO gate refuses
simulated calibrations unless told otherwise.

:data:`DEGRADATIONS` are the typical ways an edit goes wrong (untouched source, blank, noise, half done, blurred,
grainy, shifted, faint, an extra object removed or recoloured, ...); :func:`data_recipes.demo_samples.write_demo_samples`
applies them to synthetic edits to make a samples file to label without any model, whose judge scores and
simulated labels spread over the whole 0-10 range.

What this leaves out: any model of human disagreement beyond independent noise, and samples without a
ground-truth target (they raise).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from rewards.labeling import IMAGE_FIELDS, LabelError, load_samples

PIXEL_TOLERANCE = 0.1  # 25 levels of 255: palette colours differ by more; grain and faint tints by less
EYE_BLUR_PX = 1.0
KEEP_FLOOR = 0.02  # so that an unchanged region of plain background is not divided by zero


def pixel_agreement(source: Image.Image, edited: Image.Image, target: Image.Image) -> dict[str, float]:
    """``change``, ``keep`` and the true score ``score`` (0-10) of one edit; formulas in the module docstring.

    The edited image is resized (bilinear) to the target's size when they differ; the source must match it.
    """
    if source.size != target.size:
        raise ValueError(f"source {source.size} and target {target.size} images differ in size")
    if edited.size != target.size:
        edited = edited.convert("RGB").resize(target.size, Image.Resampling.BILINEAR)
    t, s, x = _eye(target), _eye(source), _eye(edited)
    colors, counts = np.unique(np.asarray(target.convert("RGB")).reshape(-1, 3), axis=0, return_counts=True)
    empty = _eye(Image.new("RGB", target.size, tuple(int(v) for v in colors[counts.argmax()])))
    changed = _l1(s, t) > PIXEL_TOLERANCE
    wrong = _l1(x, t) > PIXEL_TOLERANCE
    change = 1.0 - float(wrong[changed].mean()) if changed.any() else 1.0
    keep = 1.0
    if not changed.all():
        floor = max(float((_l1(empty, t) > PIXEL_TOLERANCE)[~changed].mean()), KEEP_FLOOR)
        keep = float(np.clip(1.0 - wrong[~changed].mean() / floor, 0.0, 1.0))
    return {"change": change, "keep": keep, "score": 10.0 * math.sqrt(change * keep)}


def _eye(image: Image.Image) -> np.ndarray:
    """The image as an annotator sees it: a Gaussian blur of radius :data:`EYE_BLUR_PX`, as floats in [0, 1].

    Grain, a slightly soft edge or a one-pixel fringe then cost little, while a wrong colour or a missing or
    misplaced object of a few pixels still shows.
    """
    blurred = image.convert("RGB").filter(ImageFilter.GaussianBlur(EYE_BLUR_PX))
    return np.asarray(blurred, dtype=np.float64) / 255.0


def _l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel L1 distance averaged over the three channels, in [0, 1]."""
    return np.abs(a - b).mean(-1)


def simulate_scores(true_scores: Sequence[float], n_annotators: int = 3, seed: int = 0, noise_sd: float = 0.8,
                    bias_sd: float = 0.5) -> list[list[int]]:
    """Per-sample integer scores of ``n_annotators`` noisy annotators (one list per sample, one entry each)."""
    rng = np.random.default_rng(seed)
    bias = rng.normal(0.0, bias_sd, size=n_annotators)
    noisy = np.asarray(true_scores, dtype=np.float64)[:, None] + bias[None] + rng.normal(
        0.0, noise_sd, size=(len(true_scores), n_annotators))
    return np.clip(np.rint(noisy), 0, 10).astype(int).tolist()


def simulate_labels(samples_path: str | Path, out_path: str | Path, n_annotators: int = 3,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Label every sample of a samples file with simulated annotators and write the labels file.

    Args:
        samples_path: samples JSONL (format in :mod:`rewards.labeling`); each sample needs ``target_image``.
        out_path: labels JSONL to write (one line per sample and annotator, ``annotator`` = ``sim-1`` ...,
            ``simulated: true``); refused if it exists.
        n_annotators: number of simulated annotators.
        seed: seeds the annotators' biases and noise.

    Returns:
        The label rows written.

    Raises:
        LabelError: a sample has no target image, or ``out_path`` exists.
    """
    out_path = Path(out_path)
    if out_path.exists():
        raise LabelError(f"{out_path} exists; simulated labels are never appended to a labels file")
    samples = load_samples(samples_path)
    missing = [s["id"] for s in samples if not s.get("target_image")]
    if missing:
        raise LabelError(f"simulated annotators need a ground-truth 'target_image'; missing for ids {missing[:5]}")
    truth = []
    for s in samples:
        with Image.open(s["source_image"]) as src, Image.open(s["edited_image"]) as out, \
                Image.open(s["target_image"]) as tgt:
            truth.append(pixel_agreement(src, out, tgt)["score"])
    rows = []
    for sample, scores in zip(samples, simulate_scores(truth, n_annotators, seed)):
        fields = dict(sample)
        for key in IMAGE_FIELDS:
            if isinstance(fields.get(key), str):
                fields[key] = os.path.relpath(fields[key], out_path.resolve().parent)
        for k, score in enumerate(scores):
            rows.append({**fields, "human_score": score, "annotator": f"sim-{k + 1}", "simulated": True})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# -- demo samples -------------------------------------------------------------------------------------------------
def _drop_or_recolor_kept(scene: dict[str, Any], after: dict[str, Any], recolor: bool) -> Image.Image | None:
    """The target with one object the edit keeps removed (or recoloured): an over-edit. None if nothing is kept."""
    from metacot.scenes import free_colors, render_scene

    kept = [o for o in after["objects"] if o in scene["objects"]]
    if not kept:
        return None
    wrong = copy.deepcopy(after)
    victim = next(o for o in wrong["objects"] if o["id"] == kept[-1]["id"])
    if recolor:
        victim["color"] = free_colors(wrong)[-1]
    else:
        wrong["objects"].remove(victim)
    return render_scene(wrong)


def _halves(src: Image.Image, tgt: Image.Image) -> Image.Image:
    out = np.asarray(tgt).copy()
    out[:, src.width // 2:] = np.asarray(src)[:, src.width // 2:]
    return Image.fromarray(out)


def _grain(tgt: Image.Image, rng: random.Random) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (tgt.height, tgt.width, 3))
    return Image.fromarray(np.clip(np.asarray(tgt, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


Degrade = Callable[[Image.Image, Image.Image, dict[str, Any], dict[str, Any], random.Random], "Image.Image | None"]
DEGRADATIONS: dict[str, Degrade] = {
    "perfect": lambda src, tgt, sb, sa, rng: tgt,
    "unedited": lambda src, tgt, sb, sa, rng: src,
    "blank": lambda src, tgt, sb, sa, rng: Image.new("RGB", src.size, src.getpixel((0, 0))),
    "noise": lambda src, tgt, sb, sa, rng: Image.fromarray(
        np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (src.height, src.width, 3), dtype=np.uint8)),
    "half_done": lambda src, tgt, sb, sa, rng: _halves(src, tgt),
    "blurred": lambda src, tgt, sb, sa, rng: tgt.filter(ImageFilter.GaussianBlur(0.7)),
    "grainy": lambda src, tgt, sb, sa, rng: _grain(tgt, rng),
    "shifted": lambda src, tgt, sb, sa, rng: Image.fromarray(np.roll(np.asarray(tgt), 1, axis=1)),
    "faint": lambda src, tgt, sb, sa, rng: Image.blend(src, tgt, 0.25),
    "extra_removed": lambda src, tgt, sb, sa, rng: _drop_or_recolor_kept(sb, sa, recolor=False),
    "extra_recolored": lambda src, tgt, sb, sa, rng: _drop_or_recolor_kept(sb, sa, recolor=True),
}
