"""Synthetic physical hypothetical edits: exact physics on boxes, valid records, Meta-CoTs that match the scenes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_recipes.cli import main
from data_recipes.hypothetical import (
    drop_object,
    generate_hypothetical,
    landing,
    make_hypothetical,
    read_rewrite,
    resting_on,
    support_removal,
)
from metacot.scenes import name_of, render_scene
from metacot.cot import MetaTask
from metacot.cot.schema import EditRecord, load_records, validate_scene


@pytest.fixture(scope="module")
def hyp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hyp") / "d"
    generate_hypothetical(out, 60, seed=3)
    return out


def all_records(folder: Path) -> list[EditRecord]:
    return [r for s in ("train", "val", "test") for r in load_records(folder / f"{s}.jsonl")]  # type: ignore[misc]


def test_records_are_valid_and_every_object_rests(hyp: Path) -> None:
    records = all_records(hyp)
    assert len(records) == 60 and {r.split for r in records} == {"train", "val", "test"}
    counts = json.loads((hyp / "manifest.json").read_text())["counts"]["categories"]
    assert counts == {"physical-drop": 20, "physical-support": 40}
    for record in records:
        for scene in (record.scene_before, record.scene_after):
            assert validate_scene(scene) == []
            assert all(resting_on(o, scene) is not False for o in scene["objects"]), (record.id, scene)
        with Image.open(record.target_image) as image:  # the target image is the after scene, pixel for pixel
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(render_scene(record.scene_after)))


def test_support_removal_physics_and_cot(hyp: Path) -> None:
    for record in (r for r in all_records(hyp) if r.category == "physical-support"):
        before = {o["id"]: o for o in record.scene_before["objects"]}
        after = {o["id"]: o for o in record.scene_after["objects"]}
        (removed,) = set(before) - set(after)
        assert before[removed]["shape"] == "square"
        moved = [i for i in after if after[i]["box"] != before[i]["box"]]
        drops = {after[i]["box"][1] - before[i]["box"][1] for i in moved}
        assert moved and len(drops) == 1 and drops.pop() > 0  # one rigid stack falls straight down
        assert all(after[i]["box"][0] == before[i]["box"][0] for i in moved)
        assert record.meta_tasks == (MetaTask.REMOVE,) + (MetaTask.POSITION_CHANGE,) * len(moved)
        lowest = max(moved, key=lambda i: after[i]["box"][3])
        support = resting_on(after[lowest], record.scene_after)
        where = "the ground" if support is None else name_of(support)
        entries = {e.name: e for e in record.cot.traversal}
        assert entries[name_of(before[lowest])].how == f"falls straight down and comes to rest on {where}"
        assert entries[name_of(before[removed])].how == "removed"
        assert {n for n, e in entries.items() if e.changed} == {name_of(before[i]) for i in [removed, *moved]}
        assert name_of(before[removed]) in record.instruction and "remove" not in record.instruction.lower()[:6]


def test_drop_adds_one_object_resting_on_a_square(hyp: Path) -> None:
    for record in (r for r in all_records(hyp) if r.category == "physical-drop"):
        before_ids = {o["id"] for o in record.scene_before["objects"]}
        (new,) = [o for o in record.scene_after["objects"] if o["id"] not in before_ids]
        support = resting_on(new, record.scene_after)
        assert isinstance(support, dict) and support["shape"] == "square"
        assert record.meta_tasks == (MetaTask.ADD,)
        assert record.cot.traversal[-1].name == name_of(new) and record.cot.traversal[-1].changed
        assert name_of(support) in record.instruction  # "dropped above the X square"
        assert all(o in record.scene_after["objects"] for o in record.scene_before["objects"])


def test_landing_rule() -> None:
    objects = [{"box": [0, 20, 10, 32]}, {"box": [12, 10, 20, 32]}]
    assert landing([2, 0, 8, 5], objects, 32) == (20, objects[0])
    assert landing([8, 0, 14, 5], objects, 32) == (10, objects[1])  # spans both: the higher one stops it
    assert landing([22, 0, 30, 5], objects, 32) == (32, None)


def test_hypothetical_edits_agree_with_the_rule_judge(hyp: Path) -> None:
    from rewards.contract import RewardBatch
    from rewards.rule_judge import CECRuleJudge

    records = all_records(hyp)[:24]
    sources = [Image.open(r.source_image).convert("RGB") for r in records]
    targets = [Image.open(r.target_image).convert("RGB") for r in records]
    extras = {"scene_before": [r.scene_before for r in records], "scene_after": [r.scene_after for r in records]}
    judge = CECRuleJudge()
    exact = judge(RewardBatch(sources, targets, [r.instruction for r in records], [r.cot for r in records], extras))
    unedited = judge(RewardBatch(sources, sources, [r.instruction for r in records], [r.cot for r in records],
                                 extras))
    assert min(exact) == 10.0 and max(unedited) < 5.0  # type: ignore[type-var]


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = generate_hypothetical(tmp_path / "a", 12, seed=1)
    b = generate_hypothetical(tmp_path / "b", 12, seed=1)
    c = generate_hypothetical(tmp_path / "c", 12, seed=2)
    assert a["content_sha256"] == b["content_sha256"] != c["content_sha256"]
    assert make_hypothetical(1, 5, 32).instruction == make_hypothetical(1, 5, 32).instruction


def test_edit_functions_refuse_impossible_scenes() -> None:
    flat = {"width": 32, "height": 32, "background": "white",
            "objects": [{"id": "o1", "shape": "circle", "color": "red", "size": "small", "box": [2, 26, 8, 32]}]}
    assert support_removal(random.Random(0), flat) is None  # nothing is held up
    assert drop_object(random.Random(0), flat) is None  # would land on a round top


def test_read_rewrite() -> None:
    assert read_rewrite('{"kind": "causal", "instruction": "What  if it\\nrained?"}', "stop") == (
        ("causal", "What if it rained?"), "")
    assert read_rewrite('{"kind": "magic", "instruction": "x"}', "stop")[1].startswith("invalid rewrite")
    assert read_rewrite('{"kind": "cau', "length")[1].startswith("cut at max_tokens")


def test_cli_synth_hypothetical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth-hypothetical", "--out", str(tmp_path / "h"), "--n", "6", "--seed", "0"]) == 0
    assert "physical-support" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "h" / "train.jsonl")]) == 0
    assert main(["synth-hypothetical", "--out", str(tmp_path / "x"), "--n", "6", "--seed", "0",
                 "--resolution", "24"]) == 2
    assert "--resolution >= 32" in capsys.readouterr().err
