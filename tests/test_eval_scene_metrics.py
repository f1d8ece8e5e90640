"""The paper's evaluation columns (metacot.eval.scene_metrics) on real synthetic renders, and their aggregation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from data_recipes.synth import make_edit_sample
from data_recipes.synth_edits import Edit
from metacot.scenes import clone, find, render_scene
from metacot.cot import MetaCoT, TargetEntry, render
from metacot.eval.metrics import baseline_image
from metacot.eval.runner import aggregate, format_paper_table
from metacot.eval.scene_metrics import COT_MEASURES, bootstrap_ci, cot_accuracy, instruction_consistency

RES = 32


def sample(category: str, start: int = 0) -> tuple[dict, Edit]:
    """The first synthetic sample (seed 0) of ``category`` at or after index ``start``."""
    for index in range(start, start + 400):
        scene, edit = make_edit_sample(0, index, RES)
        if edit.category == category:
            return scene, edit
    raise AssertionError(f"no {category} sample")


def score(edited: Image.Image, scene: dict, edit: Edit) -> dict:
    return instruction_consistency(edited, render_scene(scene), render_scene(edit.after), scene, edit.after,
                                   whole_view=edit.category in ("zoom", "pan"))


CATEGORIES = ("add", "remove", "replace", "recolour", "resize", "relabel", "move", "swap", "count", "zoom", "pan")


@pytest.mark.parametrize("category", CATEGORIES)
def test_perfect_edit_and_copy(category: str) -> None:
    scene, edit = sample(category)
    perfect = score(render_scene(edit.after), scene, edit)
    assert perfect == {"ins": 1.0, "con": 1.0, "con_bg": 1.0, "nat": 1.0, "art": 1.0}
    copy = score(render_scene(scene), scene, edit)
    assert copy["ins"] == 0.0 and copy["con"] == 1.0 and copy["con_bg"] == 1.0
    assert copy["nat"] <= 1.0 and copy["art"] == 1.0  # the source holds only palette colours


def test_identity_edit_copy_follows_the_instruction() -> None:
    scene, _ = sample("add")
    same = Edit("identity", clone(scene), None, "Keep it.", {}, (), "kept")  # type: ignore[arg-type]
    assert score(render_scene(scene), scene, same)["ins"] == 1.0
    blank = Image.new("RGB", (RES, RES), (0, 0, 0))
    assert score(blank, scene, same)["ins"] == 0.0


def wrong_object(scene: dict, edit: Edit) -> Image.Image:
    """The recolour applied to another object than the instruction's."""
    (target_id,) = edit.targets
    other = next(o for o in scene["objects"] if o["id"] != target_id)
    wrong = clone(scene)
    find(wrong, other["id"])["color"] = find(edit.after, target_id)["color"]
    return render_scene(wrong)


def test_edit_of_the_wrong_object() -> None:
    scene, edit = sample("recolour")
    result = score(wrong_object(scene, edit), scene, edit)
    assert result["ins"] == 0.0 and result["con"] == 0.0
    assert result["nat"] < 1.0  # the right colours, but on the wrong object: the old colour's share is wrong


def test_removal_of_a_kept_object_breaks_consistency() -> None:
    scene, edit = sample("move")
    kept = next(o for o in scene["objects"] if o["id"] not in edit.targets)
    broken = clone(edit.after)
    broken["objects"] = [o for o in broken["objects"] if o["id"] != kept["id"]]
    result = score(render_scene(broken), scene, edit)
    assert result["ins"] == 1.0 and result["con"] == 0.0 and result["nat"] < 1.0


def test_noise_lowers_art_and_nat() -> None:
    scene, edit = sample("remove")
    target = np.asarray(render_scene(edit.after)).astype(np.int16)
    rng = np.random.default_rng(0)
    noisy = np.clip(target + rng.normal(0, 80, target.shape), 0, 255).astype(np.uint8)
    result = score(Image.fromarray(noisy), scene, edit)
    assert result["art"] < 0.8 and result["nat"] < 0.8


def test_without_scenes_every_column_is_none() -> None:
    img = Image.new("RGB", (RES, RES))
    assert set(instruction_consistency(img, img, img, None, None).values()) == {None}


@pytest.mark.slow
def test_tiny_vae_round_trip_of_the_target_passes(tiny_models) -> None:
    """The tolerance is meant to pass what a perfect model could output through its VAE, and fail copies."""
    import torch

    from metacot.models.loading import load_editing_model
    from metacot.models.sampler import decode_latents, encode_latents

    model = load_editing_model(tiny_models.pipeline, device="cpu", dtype=torch.float32)
    cases = [sample(c, start) for c in CATEGORIES if c != "relabel" for start in (0, 60)]
    targets = [render_scene(e.after) for _, e in cases]
    sources = [render_scene(s) for s, _ in cases]
    with torch.no_grad():
        recon = decode_latents(model, encode_latents(model, targets + sources), RES, RES)
    on_target = [score(r, s, e) for r, (s, e) in zip(recon[:len(cases)], cases)]
    on_source = [score(r, s, e) for r, (s, e) in zip(recon[len(cases):], cases)]
    assert all(r["ins"] == 1.0 and r["con"] == 1.0 for r in on_target), on_target
    assert all(r["ins"] == 0.0 and r["con"] == 1.0 for r in on_source), on_source
    assert np.mean([r["art"] for r in on_target]) < 1.0  # blur leaves off-palette blends: Art sees it


# ---------------------------------------------------------------------------------------------------- CoT accuracy
def truth() -> MetaCoT:
    return sample("recolour")[1].cot


def test_cot_accuracy_of_the_ground_truth() -> None:
    cot = truth()
    assert cot_accuracy(render(cot), cot) == dict.fromkeys(COT_MEASURES, 1.0)
    # Formatting the lenient parser forgives (no ### markers, other case) still counts as exact content.
    loose = render(cot).replace("### ", "").replace("Meta-tasks: Replace", "meta-tasks: replace")
    assert cot_accuracy(loose, cot) == dict.fromkeys(COT_MEASURES, 1.0)


def test_cot_accuracy_counts_each_mistake() -> None:
    cot = truth()
    wrong_meta = dataclasses.replace(cot, meta_tasks=("Add",))
    got = cot_accuracy(render(wrong_meta), cot)
    assert got == {"cot_parsed": 1.0, "cot_meta_tasks": 0.0, "cot_targets": 1.0, "cot_traversal": 1.0,
                   "cot_acc": 0.0, "cot_exact": 0.0}
    wrong_target = dataclasses.replace(cot, targets=("the purple unicorn",))
    got = cot_accuracy(render(wrong_target), cot)
    assert (got["cot_meta_tasks"], got["cot_targets"], got["cot_traversal"], got["cot_acc"]) == (1.0, 0.0, 1.0, 0.0)
    missing = dataclasses.replace(cot, traversal=cot.traversal[:-1])
    got = cot_accuracy(render(missing), cot)
    assert (got["cot_meta_tasks"], got["cot_targets"], got["cot_traversal"], got["cot_exact"]) == (1.0, 1.0, 0.0, 0.0)
    flipped = dataclasses.replace(cot, traversal=tuple(
        TargetEntry(e.name, False, "") if e.changed else e for e in cot.traversal))
    assert cot_accuracy(render(flipped), cot)["cot_traversal"] == 0.0
    reworded = dataclasses.replace(cot, thinking="Something else.", traversal=tuple(
        TargetEntry(e.name.upper(), e.changed, e.how + " indeed" if e.how else "") for e in reversed(cot.traversal)))
    got = cot_accuracy(render(reworded), cot)
    assert got["cot_acc"] == 1.0 and got["cot_exact"] == 0.0  # names normalised, order and wording free


@pytest.mark.parametrize("text", [None, "", "I would paint it blue.", "### Target traversal\n- x: kept"])
def test_unparsable_cot_scores_zero(text: str | None) -> None:
    assert cot_accuracy(text, truth()) == dict.fromkeys(COT_MEASURES, 0.0)


# ------------------------------------------------------------------------------------------------------ intervals
def test_bootstrap_interval_contains_the_mean_and_shrinks() -> None:
    rng = np.random.default_rng(1)
    small = list(rng.integers(0, 2, 20).astype(float))
    large = list(rng.integers(0, 2, 2000).astype(float))
    for values in (small, large):
        lo, hi = bootstrap_ci(values, seed=0)
        assert lo <= np.mean(values) <= hi and lo < hi
    assert np.subtract(*bootstrap_ci(large, 0))[()] > np.subtract(*bootstrap_ci(small, 0))[()]  # (lo - hi) < 0
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci([None, float("nan")], 0) == (None, None)
    assert bootstrap_ci([1.0, 1.0, 1.0], 0) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------------- aggregation
def eval_samples() -> list:
    """Eval samples of a few real synthetic records (a stand-in record carries the scenes and the CoT)."""
    from metacot.eval.runner import EvalSample

    out = []
    for category in ("recolour", "remove", "zoom"):
        scene, edit = sample(category)
        rec = type("Rec", (), {"scene_before": scene, "scene_after": edit.after, "cot": edit.cot})()
        s = EvalSample(category, render_scene(scene), render_scene(edit.after), edit.instruction, render(edit.cot),
                       tuple(m.value for m in edit.cot.meta_tasks), category, rec)
        out.append(s)
    return out


def test_score_rows_aggregate_and_paper_table(tmp_path) -> None:
    from metacot.eval.runner import _score_rows

    ss = eval_samples()
    model = _score_rows("model", ss, [s.target for s in ss], None, tmp_path / "images",
                        cots=[ss[0].cot_text, "garbage", None])
    copy = _score_rows("copy", ss, [baseline_image("copy", s.source, s.target) for s in ss], None,
                       tmp_path / "images")
    assert [r["ins"] for r in model] == [1.0, 1.0, 1.0] and [r["ins"] for r in copy] == [0.0, 0.0, 0.0]
    assert [r["cot_acc"] for r in model] == [1.0, 0.0, 0.0] and model[1]["cot_text"] == "garbage"
    assert "cot_acc" not in copy[0]
    results = aggregate(model + copy)
    ci = results["methods"]["model"]["overall"]["ci"]
    assert ci["cot_acc"]["n"] == 3 and ci["cot_acc"]["mean"] == pytest.approx(1 / 3)
    assert ci["cot_acc"]["lo"] <= 1 / 3 <= ci["cot_acc"]["hi"]
    assert results["methods"]["copy"]["overall"]["ci"]["con"] == {"n": 3, "mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert results["methods"]["copy"]["overall"]["ci"]["cot_acc"]["n"] == 0
    assert results["methods"]["model"]["meta_task"]["Camera Motion"]["ci"]["ins"]["n"] == 1
    table = format_paper_table(results)
    lines = table.splitlines()
    assert "| Ins | Con | Nat | Art | CoT acc |" in lines[2]
    copy_line = next(line for line in lines if line.startswith("| copy |"))
    assert copy_line.split("|")[3].strip() == "0.000 [0.00, 0.00]" and copy_line.split("|")[7].strip() == "-"
    model_line = next(line for line in lines if line.startswith("| model |"))
    assert model_line.split("|")[3].strip() == "1.000 [1.00, 1.00]"
    header = next(line for line in lines if line.startswith("| meta-task |")).split("|")
    camera = next(line for line in lines if line.startswith("| Camera Motion |")).split("|")
    assert camera[header.index(" model ")].strip() == "1.000 [1.00, 1.00]"
    assert camera[header.index(" copy ")].strip() == "0.000 [0.00, 0.00]"
    assert any(line.startswith("| recolour | ") for line in lines)


def test_eval_cli_baselines_on_a_synthetic_dataset(tmp_path, capsys) -> None:
    """`metacot eval --baselines-only` on real synth records: copy keeps everything and follows nothing."""
    import json

    from data_recipes.synth import generate
    from metacot.eval.cli import main

    generate(tmp_path / "data", n=22, seed=0, resolution=RES)
    assert main(["--data", str(tmp_path / "data" / "train.jsonl"), "--out", str(tmp_path / "eval"),
                 "--baselines-only"]) == 0
    printed = capsys.readouterr().out
    assert "| method | n | Ins | Con | Nat | Art | CoT acc |" in printed
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    copy = results["methods"]["copy"]["overall"]["ci"]
    assert copy["ins"]["mean"] == 0.0 and copy["con"]["mean"] == 1.0 and copy["ins"]["n"] == 20
    erase = results["methods"]["erase"]["category"]["remove"]["ci"]["ins"]
    assert erase["mean"] == 1.0  # erasing is the right answer to a removal
    assert "Ins per meta-task" in (tmp_path / "eval" / "table.md").read_text()
