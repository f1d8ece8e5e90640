"""Simulated annotators: their pixel measure, their noise, their labels file, and the demo calibration in which the
rule judge passes while a constant and an inverted judge fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_recipes.demo_samples import write_demo_samples
from data_recipes.synth import make_edit_sample
from metacot.scenes import render_scene
from rewards.calibration import calibrate_main, find_passing_calibration, score_with_reward
from rewards.labeling import LabelError, load_labels
from rewards.rule_judge import CECRuleJudge
from rewards.simulated import DEGRADATIONS, pixel_agreement, simulate_labels, simulate_scores


def test_pixel_agreement_bounds_and_order() -> None:
    scene, edit = make_edit_sample(0, 0, 32)  # an "add" edit
    src, tgt = render_scene(scene), render_scene(edit.after)
    assert pixel_agreement(src, tgt, tgt) == {"change": 1.0, "keep": 1.0, "score": 10.0}
    assert pixel_agreement(src, src, tgt)["change"] == 0.0 and pixel_agreement(src, src, tgt)["score"] == 0.0
    blank = Image.new("RGB", src.size, src.getpixel((0, 0)))
    assert pixel_agreement(src, blank, tgt)["keep"] == 0.0  # every object that should stay is gone
    halves = DEGRADATIONS["half_done"](src, tgt, scene, edit.after, None)
    assert 0.0 <= pixel_agreement(src, halves, tgt)["score"] <= 10.0
    # Upscaled outputs are compared at the target's size.
    assert pixel_agreement(src, tgt.resize((64, 64), Image.Resampling.NEAREST), tgt)["score"] > 9.0
    with pytest.raises(ValueError, match="differ in size"):
        pixel_agreement(src.resize((16, 16)), tgt, tgt)


def test_simulated_scores_are_seeded_integers_with_annotator_bias() -> None:
    truth = [0.0, 2.5, 5.0, 7.5, 10.0] * 40
    a = simulate_scores(truth, n_annotators=3, seed=1)
    assert a == simulate_scores(truth, n_annotators=3, seed=1) and a != simulate_scores(truth, 3, seed=2)
    assert all(isinstance(v, int) and 0 <= v <= 10 for row in a for v in row)
    mean_error = [sum(row[k] - t for row, t in zip(a, truth)) / len(truth) for k in range(3)]
    assert max(mean_error) - min(mean_error) > 0.1  # annotators differ by a persistent bias, not only noise


def test_simulated_labels_file(tmp_path: Path) -> None:
    samples = write_demo_samples(tmp_path / "demo", 12, resolution=32, seed=0)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    seen = {r["degradation"] for r in rows}
    assert seen <= set(DEGRADATIONS) and len(seen) >= 9  # the extra_* ones fall through when an edit keeps nothing
    out = tmp_path / "labels" / "labels.jsonl"
    labels = simulate_labels(samples, out, n_annotators=2, seed=0)
    assert len(labels) == 24 and all(r["simulated"] is True for r in labels)
    items = load_labels(out)
    assert len(items) == 12 and all(it.simulated and set(it.scores) == {"sim-1", "sim-2"} for it in items.values())
    assert Path(items["d00000"].fields["target_image"]).is_file()  # paths were rewritten relative to the labels
    with pytest.raises(LabelError, match="exists"):
        simulate_labels(samples, out)
    no_target = tmp_path / "nt.jsonl"
    no_target.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "target_image"}) + "\n"
                                 for r in rows[:2]).replace('"images/', '"demo/images/'))
    with pytest.raises(LabelError, match="target_image"):
        simulate_labels(no_target, tmp_path / "x.jsonl")


def test_rule_judge_calibrates_against_simulated_annotators_and_broken_judges_fail(tmp_path: Path) -> None:
    samples = write_demo_samples(tmp_path / "demo", 66, resolution=64, seed=0)
    simulate_labels(samples, tmp_path / "labels.jsonl", n_annotators=3, seed=0)
    items = load_labels(tmp_path / "labels.jsonl")
    judge = CECRuleJudge()
    rule = score_with_reward(list(items.values()), judge)
    assert judge.stats["scored"] == 66 and all(v is not None for v in rule.values())
    rows = [{"id": k, "score": v, "prompt": "rule"} for k, v in rule.items()]
    rows += [{"id": k, "score": 5.0, "prompt": "constant"} for k in rule]
    rows += [{"id": k, "score": 10.0 - v, "prompt": "inverted"} for k, v in rule.items()]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "calib"
    code = calibrate_main(["--labels", str(tmp_path / "labels.jsonl"), "--scores", str(scores), "--out", str(out),
                           "--judge-model", "cec_rule"])
    report = json.loads((out / "calibration.json").read_text())
    by = {v["prompt"]: v for v in report["variants"]}
    assert code == 0 and report["best_prompt"] == "rule" and report["simulated"] is True
    assert by["rule"]["passed"] and by["rule"]["pearson_r"] > 0.85 and by["rule"]["mae"] < 1.5
    assert not by["constant"]["passed"] and by["constant"]["pearson_r"] is None
    assert not by["inverted"]["passed"] and by["inverted"]["pearson_r"] < -0.85
    assert report["annotator_agreement"]["n_annotators"] == 3
    # Only the rule judge alone, inverted: the whole calibration fails with exit code 1.
    inverted = tmp_path / "inverted.jsonl"
    inverted.write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt"] == "inverted"))
    assert calibrate_main(["--labels", str(tmp_path / "labels.jsonl"), "--scores", str(inverted), "--out",
                           str(tmp_path / "calib_bad"), "--judge-model", "cec_rule"]) == 1
    assert find_passing_calibration(out, "cec_rule", "rule", allow_simulated=True)["passed"]
