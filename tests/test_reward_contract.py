"""The reward contract: resolution by name / dotted path, weighted combination, None handling."""

from __future__ import annotations

import pytest
from PIL import Image

from rewards.contract import RewardBatch, WeightedReward, build_reward, build_weighted_reward
from rewards.simple import brightness, target_similarity


def _batch(values: list[int]) -> RewardBatch:
    imgs = [Image.new("RGB", (4, 4), (v, v, v)) for v in values]
    return RewardBatch(imgs, imgs, ["i"] * len(values), [None] * len(values),
                       extras={"target_images": [Image.new("RGB", (4, 4), (255, 255, 255))] * len(values)})


def test_brightness_and_target_similarity_values() -> None:
    b = _batch([0, 255, 51])
    assert brightness(b) == pytest.approx([0.0, 1.0, 0.2])
    assert target_similarity(b) == pytest.approx([0.0, 1.0, 0.2])


def test_resolution_by_name_and_path() -> None:
    assert build_reward("brightness") is brightness
    assert build_reward("rewards.simple:target_similarity") is target_similarity
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("no_such_reward")
    with pytest.raises(ValueError, match="takes no options"):
        build_reward("brightness", scale=2)


def test_weighted_sum_and_none_propagation() -> None:
    def half_none(batch: RewardBatch) -> list[float | None]:
        return [None if i % 2 else 1.0 for i in range(len(batch))]

    reward = WeightedReward({"b": (brightness, 2.0), "h": (half_none, 0.5)})
    total, parts = reward.score(_batch([255, 255, 0]))
    assert total[1] is None
    assert total[0] == pytest.approx(2.5) and total[2] == pytest.approx(0.5)
    assert parts["h"] == [1.0, None, 1.0]


def test_weighted_from_config_and_bad_length() -> None:
    reward = build_weighted_reward({"brightness": {"weight": 1.0}, "t": {"fn": "target_similarity", "weight": 0.0}})
    assert reward(_batch([255])) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="returned 0 scores"):
        WeightedReward({"x": (lambda b: [], 1.0)})(_batch([1]))


def test_batch_length_mismatch_is_refused() -> None:
    img = Image.new("RGB", (2, 2))
    with pytest.raises(ValueError, match="must all have 2 entries"):
        RewardBatch([img], [img, img], ["a", "b"], [None, None])


def test_reward_options_are_checked_against_the_real_signature_before_building() -> None:
    """A typo in rewards.* names the key and the accepted options, without contacting any judge (nothing is built)."""
    from rewards.contract import RewardSpecError, check_reward_specs

    with pytest.raises(RewardSpecError, match=r"^rewards\.judge\.timout_s: not an option of 'cec_vlm' "
                                              r"\(rewards\.cec:CECJudge\); it accepts url, model, .*timeout_s"):
        check_reward_specs({"judge": {"fn": "cec_vlm", "timout_s": 5}})
    with pytest.raises(RewardSpecError, match=r"^rewards\.b\.weight: 'heavy' is not a number"):
        check_reward_specs({"b": {"fn": "brightness", "weight": "heavy"}})
    with pytest.raises(RewardSpecError, match=r"^rewards\.brightness: .*takes no options; remove scale"):
        build_weighted_reward({"brightness": {"scale": 2}})
    check_reward_specs({"brightness": {"weight": 2}, "cec_vlm": {"url": "http://x:1", "timeout_s": 3}})
