"""JSONL record schema: round trip, and a loader that reports every problem as file:line."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
from fixtures_data import tiny_dataset  # noqa: F401  (session fixture; conftest may also register it)
from PIL import Image

from metacot.cot.schema import DataError, EditRecord, UnderstandingRecord, load_records, validate_scene, write_records


def test_write_then_load_round_trips(tiny_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    records = load_records(tiny_dataset / "val.jsonl")
    assert {type(r) for r in records} == {EditRecord, UnderstandingRecord}
    assert all(os.path.isabs(r.image if isinstance(r, UnderstandingRecord) else r.source_image) for r in records)
    out = tmp_path / "nested" / "copy.jsonl"
    out.parent.mkdir()
    write_records(out, records)
    assert load_records(out) == records
    first = json.loads(out.read_text().splitlines()[0])
    assert first["type"] == "edit" and first["source_image"].startswith("../")  # written relative to its folder
    write_records(tmp_path / "again.jsonl", load_records(out))
    write_records(tmp_path / "twice.jsonl", load_records(out))
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "twice.jsonl").read_bytes()


def _lines(tiny_dataset: Path, folder: Path) -> list[dict]:  # noqa: F811
    """Raw JSON of a valid edit and understanding record, with their images copied next to ``folder``."""
    raw = [json.loads(line) for line in (tiny_dataset / "test.jsonl").read_text().splitlines()]
    edit = next(r for r in raw if r["type"] == "edit" and r["chain_id"] is None)
    question = next(r for r in raw if r["type"] == "understanding")
    (folder / "images").mkdir()
    for rel in {edit["source_image"], edit["target_image"], question["image"]}:
        shutil.copy(tiny_dataset / rel, folder / rel)
    return [edit, question]


def test_loader_lists_every_problem_with_file_and_line(tiny_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    edit, question = _lines(tiny_dataset, tmp_path)

    def variant(**changes: object) -> dict:
        record = copy.deepcopy(edit)
        record.update(changes)
        return record

    bad_cot = copy.deepcopy(edit["cot"])
    bad_cot["traversal"][0]["changed"] = "yes"
    bad_scene = copy.deepcopy(edit["scene_before"])
    bad_scene["objects"][1]["box"] = list(bad_scene["objects"][0]["box"])
    bad_scene["background"] = "teal"
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "big.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines = [
        json.dumps(edit),                                                         # 1 fine
        "{not json",                                                              # 2
        json.dumps({"type": "caption", "id": "x"}),                               # 3
        json.dumps({k: v for k, v in edit.items() if k != "cot"} | {"id": "m"}),  # 4
        json.dumps(variant(id="a", cot=bad_cot)),                                 # 5
        json.dumps(variant(id="b", meta_tasks=["Add"])),                          # 6
        json.dumps(variant(id="c", scene_before=bad_scene)),                      # 7
        json.dumps(question | {"kind": "caption"}),                               # 8
        json.dumps(variant()),                                                    # 9 duplicate id
        json.dumps(variant(id="d", source_image="images/missing.png")),           # 10
        json.dumps(variant(id="e", target_image="images/broken.png")),            # 11
        json.dumps(variant(id="f", target_image="images/big.png")),               # 12
        json.dumps(variant(id="g", source_image=str(tmp_path / edit["source_image"]))),  # 13
        json.dumps(variant(id="h", chain_id="c1")),                               # 14
        "",                                                                       # 15
        json.dumps(question),                                                     # 16 fine
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    problems = info.value.problems
    by_line = {int(p.split(":")[1]) for p in problems}
    assert all(p.startswith(f"{path}:") for p in problems)
    assert by_line == set(range(2, 16)), problems
    expected = {
        3: "type must be 'edit' or 'understanding'", 4: "missing field 'cot'", 5: "cot.traversal[0]",
        6: "differs from cot.meta_tasks", 7: "scene_before.background: 'teal'", 8: "kind: 'caption'",
        9: "already used on line 1", 10: "missing.png does not exist", 11: "broken.png is unreadable",
        12: "image is 64x64 but its scene is 32x32", 13: "is absolute", 14: "set both", 15: "not valid JSON",
    }
    for number, text in expected.items():
        assert any(p.startswith(f"{path}:{number}: ") and text in p for p in problems), (number, problems)
    assert any("scene_before.objects[1].box: overlaps objects[0]" in p for p in problems)
    assert str(path) in str(info.value) and f"{len(problems)} problem(s)" in str(info.value)

    with pytest.raises(DataError) as info:
        load_records(path, check_images=False)
    assert {int(p.split(":")[1]) for p in info.value.problems} == set(range(2, 16)) - {10, 11, 12}


def test_long_problem_lists_are_shortened_in_the_message(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_text("x\n" * 150)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert len(info.value.problems) == 150
    assert "... and 50 more" in str(info.value)


def test_validate_scene_names_fields() -> None:
    scene = {"width": 32, "height": 32, "background": "white",
             "objects": [{"id": "o1", "shape": "blob", "color": "red", "size": "small", "box": [0, 0, 40, 5], "z": 1}]}
    assert validate_scene(scene) == ["scene.objects[0]: unknown field 'z' (allowed: box, color, id, shape, size, text)"]
    del scene["objects"][0]["z"]
    assert validate_scene(scene) == [
        "scene.objects[0].shape: 'blob' is not one of square, circle, triangle, diamond, star",
        "scene.objects[0].box: [0, 0, 40, 5] must satisfy 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32",
    ]
    assert validate_scene([]) == ["scene: expected an object, got list"]
