"""Simple built-in rewards, usable before any judge exists (and as controls in learning tests).

- :func:`brightness`: mean luminance of the edited image, scale (0, 1). Trivially hackable (all-white images win):
  it exists to test that the RL loop moves a reward, and to show what reward hacking looks like.
- :func:`target_similarity`: agreement with the ground-truth target image, scale (0, 1); None for samples without a
  target. This is a measurement against ground truth, so it also serves as a held-out metric beside a judge.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rewards.contract import RewardBatch


def _as_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64) / 255.0


def brightness(batch: RewardBatch) -> list[float | None]:
    """Mean luminance (ITU-R 601 weights) of each edited image, in [0, 1]."""
    weights = np.array([0.299, 0.587, 0.114])
    return [float((_as_array(img) @ weights).mean()) for img in batch.edited_images]


brightness.scale = (0.0, 1.0)  # type: ignore[attr-defined]


def target_similarity(batch: RewardBatch) -> list[float | None]:
    """``1 - mean |edited - target|`` over pixels and channels, in [0, 1]; None where no target image exists.

    The edited image is resized to the target's size when they differ (bilinear).
    """
    targets = batch.extras.get("target_images")
    if targets is None:
        raise ValueError("target_similarity needs extras['target_images'] (ground-truth targets) in the batch")
    scores: list[float | None] = []
    for edited, target in zip(batch.edited_images, targets):
        if target is None:
            scores.append(None)
            continue
        t = _as_array(target)
        e = _as_array(edited, size=(t.shape[1], t.shape[0]))
        scores.append(float(1.0 - np.abs(e - t).mean()))
    return scores


target_similarity.scale = (0.0, 1.0)  # type: ignore[attr-defined]
