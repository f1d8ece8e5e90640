"""``metacot reward calibrate --server`` against the real vLLM judge server the session shares (marker ``vllm``).

The served model is a tiny random VLM, so whether it passes is beside the point: the test checks that every
labelled sample is scored by the real judge for each prompt variant, and that the report records the served model
name and each prompt file's hash, so the gate can match them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_recipes.demo_samples import write_demo_samples
from rewards.calibration import calibrate_main, find_passing_calibration
from rewards.simulated import simulate_labels
from tests.conftest import require


@pytest.mark.vllm
def test_calibrate_against_the_real_judge_server(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    try:
        server = request.getfixturevalue("vllm_server")
    except pytest.FixtureLookupError:
        require(False, "the vllm_server fixture (tests/fixtures_vllm.py) is not loaded by tests/conftest.py")
    from rewards.cec import load_prompt

    samples = write_demo_samples(tmp_path / "demo", 12, resolution=32, seed=0)
    simulate_labels(samples, tmp_path / "labels.jsonl", n_annotators=2, seed=0)
    out = tmp_path / "calib"
    code = calibrate_main(["--labels", str(tmp_path / "labels.jsonl"), "--server", server.url,
                           "--prompts", "cec_v1", "cec_v2", "--out", str(out)])
    assert code in (0, 1)
    report = json.loads((out / "calibration.json").read_text())
    assert report["judge_model"] == "tiny-judge" and report["simulated"] is True
    by = {v["prompt"]: v for v in report["variants"]}
    assert set(by) == {"cec_v1", "cec_v2"}
    for name, variant in by.items():
        assert variant["prompt_sha"] == load_prompt(name).sha
        assert variant["n"] + variant["excluded"]["unscored"] == 12  # every sample was sent; None only if unread
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 24 and all(s["score"] is None or 0 <= s["score"] <= 10 for s in scores)
    if code == 0:
        assert find_passing_calibration(out, "tiny-judge", report["best_prompt"], allow_simulated=True)["passed"]
