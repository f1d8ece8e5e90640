"""Demo samples to label without any model: synthetic edits whose "edited" image is the ground truth degraded.

Each degradation of :data:`rewards.simulated.DEGRADATIONS` (untouched source, blank, noise, half done, blurred, ...)
is paired with every edit category, so judge scores and (simulated or human) labels spread over the whole 0-10 range.
The quickstart calibrates its judge on them; ``metacot reward label`` serves them to people.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_recipes.synth import make_edit_sample
from metacot.cot import to_dict
from metacot.scenes import render_scene
from rewards.simulated import DEGRADATIONS


def write_demo_samples(out_dir: str | Path, n: int, resolution: int = 32, seed: int = 0) -> Path:
    """Write ``n`` demo samples (synthetic edits, degraded ground truth as the "edited" image) for labelling.

    Sample ``i`` is synthetic edit ``i`` of ``data_recipes.synth`` with degradation
    ``(i + i // len(DEGRADATIONS)) % len(DEGRADATIONS)`` (the next one that applies, when an edit keeps no
    object), so every pairing of edit category and degradation occurs. Fields: those of an edit record plus
    ``edited_image`` and ``degradation``.

    Returns:
        The samples file ``out_dir/samples.jsonl`` (images under ``out_dir/images``).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    names = list(DEGRADATIONS)
    lines = []
    for i in range(n):
        scene, edit = make_edit_sample(seed, i, resolution)
        src, tgt = render_scene(scene), render_scene(edit.after)
        rng = random.Random(f"demo:{seed}:{i}")
        first = i + i // len(names)  # not i alone: edit categories also cycle with i, and must not pair up
        for k in range(len(names)):
            name = names[(first + k) % len(names)]
            edited = DEGRADATIONS[name](src, tgt, scene, edit.after, rng)
            if edited is not None:
                break
        sid = f"d{i:05d}"
        for suffix, image in (("src", src), ("tgt", tgt), ("out", edited)):
            image.save(out_dir / "images" / f"{sid}_{suffix}.png", format="PNG")
        lines.append({"id": sid, "source_image": f"images/{sid}_src.png", "edited_image": f"images/{sid}_out.png",
                      "target_image": f"images/{sid}_tgt.png", "instruction": edit.instruction,
                      "cot": to_dict(edit.cot), "category": edit.category, "scene_before": scene,
                      "scene_after": edit.after, "degradation": name})
    path = out_dir / "samples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
