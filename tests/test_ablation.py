"""``metacot experiment ablation``: the arms' data, the equal-GPU-time rule, and the toy preset end to end (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metacot.config import ConfigError, load_config
from metacot.experiments.ablation import (
    ARMS,
    COMPOSED,
    THREE_META,
    AblationConfig,
    arm_rows,
    grpo_overrides,
    write_arm_data,
)


def _rows(tiny_dataset: Path) -> list[dict]:
    return [json.loads(x) for x in (tiny_dataset / "train.jsonl").read_text().splitlines()]


def test_arm_data_holds_what_each_arm_may_see(tiny_dataset) -> None:
    rows = _rows(tiny_dataset)
    edits = lambda arm: [r for r in arm_rows(rows, arm) if r["type"] == "edit"]  # noqa: E731
    und = [r for r in rows if r["type"] == "understanding"]
    assert {r["category"] for r in edits("b")} == THREE_META
    assert {r["category"] for r in edits("c")} == {r["category"] for r in rows if r["type"] == "edit"} - COMPOSED
    assert COMPOSED <= {r["category"] for r in edits("d")} and len(edits("d")) == len(edits("a"))
    assert all(r["cot"]["thinking"] == "" for r in edits("e")) and len(edits("e")) == len(edits("d"))
    assert any(r["cot"]["thinking"] for r in edits("d")), "d keeps the task thinking"
    for arm in "abcde":  # the understanding data is the same in every arm
        assert [r for r in arm_rows(rows, arm) if r["type"] == "understanding"] == und


def test_arm_files_load_as_records(tiny_dataset, tmp_path) -> None:
    import shutil

    from metacot.cot.schema import EditRecord, load_records

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    paths = write_arm_data(data)
    e = [r for r in load_records(paths["e"]) if isinstance(r, EditRecord)]
    assert e and all(r.cot.thinking == "" for r in e)


def test_full_trajectory_arm_gets_the_early_arms_time_budget() -> None:
    q = AblationConfig(rollout_steps=8, window_size=2, window_max=4)
    f = dict(x.split("=", 1) for x in grpo_overrides(q, Path("/o"), "f"))
    g = dict(x.split("=", 1) for x in grpo_overrides(q, Path("/o"), "g", max_seconds=12.5))
    assert (f["rollout.window_size"], f["rollout.window_max"], f["train.max_seconds"]) == ("2", "4", "0.0")
    assert (g["rollout.window_size"], g["rollout.window_max"], g["train.max_seconds"]) == ("8", "8", "12.5")
    assert f["model"] == g["model"] == "/o/arms/d/sft/final"


def test_parallel_workers_split_the_cores_unless_the_user_chose() -> None:
    from metacot.experiments.ablation import worker_env

    assert worker_env(5, {"PATH": "/bin"}, cpus=16) == {"PATH": "/bin", "OMP_NUM_THREADS": "3"}
    assert worker_env(32, {}, cpus=16)["OMP_NUM_THREADS"] == "1"
    inherited = {"PATH": "/bin", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "41629"}  # what an earlier in-process run leaves in this process
    assert worker_env(2, inherited, cpus=2) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert worker_env(2, {"OMP_NUM_THREADS": "6"}, cpus=16)["OMP_NUM_THREADS"] == "6"


def test_grpo_arms_without_d_are_refused() -> None:
    with pytest.raises(ConfigError, match="include d"):
        load_config(AblationConfig, "ablation_toy", ["arms=[a,f]"])


@pytest.mark.slow
def test_toy_preset_runs_every_arm_end_to_end(tiny_models, tmp_path) -> None:
    from metacot.experiments.ablation import main

    out = tmp_path / "abl"
    # parallel=2: the Stage 1 arms run as worker processes, as on a GPU.
    assert main(["--preset", "toy", f"out={out}", f"models={tiny_models.pipeline}", "parallel=2"]) == 0
    assert all("sft done" in (out / "arms" / a / "sft.log").read_text() for a in "abcde")
    page = (out / "report" / "index.html").read_text()
    assert "Train-Editing-Only" in page and "oracle" in page  # the page says no table uses the oracle CoT
    for split in ("single", "composed"):
        results = json.loads((out / "eval" / split / "results.json").read_text())
        assert set(ARMS) | {"copy", "erase"} == set(results["methods"])
        assert "ins" in results["methods"]["d"]["overall"]["ci"]
        rows = [json.loads(x) for x in (out / "eval" / split / "samples.jsonl").read_text().splitlines()]
        sources = {r["method"]: r.get("cot_source") for r in rows}
        assert sources["a"] == "none" and all(sources[a] == "model" for a in "bcdefg"), sources
    f_rows = [json.loads(x) for x in (out / "arms" / "f" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    g_rows = [json.loads(x) for x in (out / "arms" / "g" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    budget = max(r["train_seconds"] for r in f_rows if "train_seconds" in r)
    g_seconds = [r["train_seconds"] for r in g_rows if "train_seconds" in r]
    # (g) stops at the first iteration boundary past (f)'s seconds: all but its last iteration fit in the budget.
    assert g_seconds and (len(g_seconds) == 1 or g_seconds[-2] < budget), (budget, g_seconds)
    assert (out / "report" / "grid_single.png").is_file() and (out / "report" / "grpo_curves.png").is_file()
