"""The rule-based CEC judge on real synthetic edits: ground truth ~10, unedited / blank / random low, partial edits
in between, consistency with the Meta-CoT (not with the ground truth), the reward contract and determinism."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from PIL import Image

from data_recipes.synth import make_edit_sample
from data_recipes.synth_edits import CATEGORIES
from metacot.scenes import render_scene
from metacot.cot.schema import COLORS
from rewards.contract import RewardBatch, build_reward
from rewards.rule_judge import CECRuleJudge, classify_shape, largest_component, parse_name


def _sample(category: str, resolution: int = 32, start: int = 0) -> tuple[dict, object]:
    """The first synthetic edit of ``category`` at or after index ``start`` (categories cycle with the index)."""
    index = start + (CATEGORIES.index(category) - start) % len(CATEGORIES)
    return make_edit_sample(0, index, resolution)


@pytest.mark.parametrize("resolution", [32, 64])
def test_truth_scores_10_and_unedited_blank_random_score_low(resolution: int) -> None:
    judge = CECRuleJudge()
    rng = np.random.default_rng(0)
    blank_scores = []
    for category in CATEGORIES:
        scene, edit = _sample(category, resolution)
        src, tgt = render_scene(scene), render_scene(edit.after)
        blank = Image.new("RGB", src.size, src.getpixel((0, 0)))
        noise = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
        assert judge.score_sample(tgt, scene, edit.after, edit.cot)["score"] == pytest.approx(10.0, abs=0.05), category
        assert judge.score_sample(src, scene, edit.after, edit.cot)["score"] < 0.5, category
        assert judge.score_sample(noise, scene, edit.after, edit.cot)["score"] < 1.0, category
        blank_scores.append(judge.score_sample(blank, scene, edit.after, edit.cot)["score"])
    # A blank canvas is right only about objects that had to go (a pan pushing one out of view): low, never high.
    assert max(blank_scores) < 4.0 and float(np.mean(blank_scores)) < 1.0
    assert judge.stats["scored"] == 4 * len(CATEGORIES)


def test_partial_and_over_edits_score_in_between() -> None:
    judge = CECRuleJudge()
    scene, edit = _sample("move", 64)
    target_id = next(o["id"] for o in scene["objects"] if o not in edit.after["objects"])
    halfway = copy.deepcopy(edit.after)
    b0 = next(o["box"] for o in scene["objects"] if o["id"] == target_id)
    obj = next(o for o in halfway["objects"] if o["id"] == target_id)
    obj["box"] = [round((a + b) / 2) for a, b in zip(b0, obj["box"])]
    half = judge.score_sample(render_scene(halfway), scene, edit.after, edit.cot)["score"]
    assert 2.0 < half < 8.0
    # The edit done, but one object that should stay is gone: over-editing costs a kept item.
    over = copy.deepcopy(edit.after)
    over["objects"] = [o for o in over["objects"] if o["id"] == target_id] + [
        o for o in over["objects"] if o["id"] != target_id][1:]
    over_score = judge.score_sample(render_scene(over), scene, edit.after, edit.cot)
    assert 0.0 <= over_score["score"] < 7.5
    assert min(v for _, v in over_score["kept"]) == 0.0


def test_scores_follow_the_meta_cot_not_the_ground_truth() -> None:
    judge = CECRuleJudge()
    scene, edit = _sample("recolour", 32)
    tgt, src = render_scene(edit.after), render_scene(scene)
    # A Meta-CoT claiming every object is kept: the unedited source is now the consistent image.
    keep_all = dataclasses.replace(edit.cot, traversal=tuple(
        dataclasses.replace(e, changed=False, how="") for e in edit.cot.traversal))
    assert judge.score_sample(src, scene, edit.after, keep_all)["score"] == pytest.approx(10.0, abs=0.05)
    assert judge.score_sample(tgt, scene, edit.after, keep_all)["score"] < 9.0
    # An entry naming an object no scene has counts as unmatched and scores by presence (absent: 0).
    unused = next(c for c in COLORS if all(o["color"] != c for o in scene["objects"] + edit.after["objects"]))
    ghost = dataclasses.replace(edit.cot, traversal=edit.cot.traversal + (
        dataclasses.replace(edit.cot.traversal[0], name=f"the {unused} star", changed=True, how="appears"),))
    before = judge.stats["unmatched_entries"]
    scored = judge.score_sample(tgt, scene, edit.after, ghost)
    assert judge.stats["unmatched_entries"] == before + 1
    assert scored["targets"][-1] == (f"the {unused} star", 0.0)
    assert scored["score"] == pytest.approx(5.0, abs=0.05)  # targets: the recolour (1.0) and the ghost (0.0)


def test_reward_contract_none_stats_sizes_and_determinism() -> None:
    scene, edit = _sample("add", 32)
    tgt = render_scene(edit.after)
    big = tgt.resize((64, 64), Image.Resampling.NEAREST)  # model outputs at another size are resampled back
    batch = RewardBatch([render_scene(scene)] * 3, [tgt, big, tgt], ["i"] * 3, [edit.cot, None, edit.cot],
                        extras={"scene_before": [scene, scene, None], "scene_after": [edit.after, edit.after, None]})
    judge = build_reward("cec_rule")
    assert isinstance(judge, CECRuleJudge) and judge.scale == (0.0, 10.0)
    first = judge(batch)
    assert first[0] == pytest.approx(10.0, abs=0.05) and first[1] == pytest.approx(10.0, abs=0.05)
    assert first[2] is None
    assert judge.stats["none_no_scene"] == 1 and judge.stats["no_cot_used_scenes"] == 1
    assert CECRuleJudge()(batch) == first  # deterministic, no state carried between calls but the counters
    with pytest.raises(ValueError, match="needs extras"):
        judge(RewardBatch([tgt], [tgt], ["i"], [None]))


def test_parsing_helpers() -> None:
    assert parse_name("the Red circle") == ("red", "circle")
    assert parse_name("the object that was moved") == (None, None)
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:6, 1:6] = True  # the object
    mask[9, 9] = mask[10, 10] = True  # two stray pixels of its colour elsewhere
    assert largest_component(mask).sum() == 25
    scene = {"width": 32, "height": 32, "background": "white",
             "objects": [{"id": "o1", "shape": "star", "color": "red", "size": "large", "box": [4, 4, 24, 24]}]}
    from rewards.rule_judge import _Sample

    blob = _Sample(render_scene(scene), scene, scene).detect("red")
    assert classify_shape(blob, 32, 32) == "star"


def test_worker_processes_give_the_in_process_scores_and_stats() -> None:
    """A batch split over worker processes (off the GIL) scores and counts exactly as one process does."""
    rng = np.random.default_rng(0)
    samples = [_sample(category, 32, start=i) for i, category in enumerate(CATEGORIES * 2)]
    edited = [render_scene(e.after) if i % 3 else Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
              for i, (_, e) in enumerate(samples)]
    batch = RewardBatch(edited, edited, ["i"] * len(samples), [None if i % 4 == 0 else e.cot for i, (_, e) in
                                                               enumerate(samples)],
                        extras={"scene_before": [s for s, _ in samples[:-1]] + [None],
                                "scene_after": [e.after for _, e in samples]})
    alone = CECRuleJudge(workers=0)
    pooled = CECRuleJudge(workers=2)
    try:
        assert pooled(batch) == alone(batch)
        assert pooled._pool is not None, "the batch was scored in worker processes"
        assert pooled.stats == alone.stats and alone.stats["scored"] == len(samples) - 1
    finally:
        pooled.close()
