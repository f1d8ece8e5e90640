"""The overfit set: 8 edits of a synthetic dataset (7 categories and one identity edit) + 8 understanding samples.

A model that cannot memorise these cannot learn anything bigger; the overfit test (``tests/test_overfit.py``) and the
learning curves (``benchmarks/learning_curves.py``) train on it and then *sample* through the inference path, so "the
loss falls" is never mistaken for "the edits work".

The identity edit is a recolour to the colour the object already has: target = source, the Meta-CoT names the
Replace meta-task and the object, and its traversal marks every object unchanged. It catches a generator that
repaints or blurs what it should keep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metacot.cot.schema import EditRecord, UnderstandingRecord, load_records, write_records

OVERFIT_EDITS = 8


def identity_edit(record: EditRecord) -> EditRecord:
    """A recolour record turned into the identity edit described in the module docstring."""
    if record.category != "recolour" or record.cot is None or record.scene_before is None:
        raise ValueError(f"{record.id}: the identity edit is built from an annotated recolour record")
    name = record.cot.targets[0]  # "the purple star"
    colour = name.split()[1]
    cot = dataclasses.replace(
        record.cot,
        thinking=f"{name[0].upper()}{name[1:]} is already {colour}, so nothing changes; every object stays the same.",
        traversal=tuple(dataclasses.replace(e, changed=False, how="") for e in record.cot.traversal))
    return dataclasses.replace(record, id=f"{record.id}_identity", instruction=f"Recolour {name} {colour}.",
                               target_image=record.source_image, scene_after=record.scene_before, cot=cot)


def write_overfit_set(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/train.jsonl`` from a ``metacot data synth`` folder's training split; returns its path.

    Raises:
        ValueError: the split has too few single edits of distinct categories (generate more samples).
    """
    records = load_records(Path(data_dir) / "train.jsonl")
    singles = [r for r in records if isinstance(r, EditRecord) and r.chain_id is None]
    picked: list[EditRecord] = []
    for r in singles:
        if r.category not in {p.category for p in picked} and len(picked) < OVERFIT_EDITS - 1:
            picked.append(r)
    recolour = next((r for r in singles if r.category == "recolour" and r not in picked), None)
    und = [r for r in records if isinstance(r, UnderstandingRecord)][:OVERFIT_EDITS]
    if len(picked) < OVERFIT_EDITS - 1 or recolour is None or len(und) < OVERFIT_EDITS:
        raise ValueError(f"{data_dir}: need {OVERFIT_EDITS - 1} single edits of distinct categories, two recolours "
                         f"and {OVERFIT_EDITS} understanding samples in the training split; generate more samples")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "train.jsonl", [*picked, identity_edit(recolour), *und])
    return out / "train.jsonl"
