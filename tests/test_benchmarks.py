"""The GPU benchmark scripts run end to end on a tiny model on the CPU (``--tiny``), and count FLOPs exactly.

They drive the real trainers (``metacot.sft.trainer`` / ``metacot.flow_grpo.trainer``), so these tests also catch
library changes that would break the benchmarks before anyone spends device time on them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts set RANK/WORLD_SIZE for a plain single process; keep that out of the other tests."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _tiny_matmul_flops_per_sequence(lora_rank: int, mlp: bool = False) -> float:
    """Matmul FLOPs of one tiny-MMDiT forward at 64 px (64 + 64 image tokens, 256 text tokens), by hand."""
    common = _load("common")
    c = common.TINY_MMDIT_CONFIG
    d = c["num_attention_heads"] * c["attention_head_dim"]
    layers, img, txt = c["num_layers"], 2 * (64 // 4 // 2) ** 2, common.TEXT_TOKENS
    blocks = layers * 2 * (4 * d * d + 2 * d * 4 * d) * (img + txt)  # attention + MLP, both streams
    lora = layers * 4 * 2 * lora_rank * (d + d) * (img + txt)  # 4 adapted attention projections per stream
    if mlp:  # fc1 (d -> 4d) and fc2 (4d -> d) per stream
        lora += layers * 2 * 2 * lora_rank * (d + 4 * d) * (img + txt)
    per_sample = layers * 2 * 2 * d * 6 * d + 2 * d * 2 * d + 2 * 256 * d + 2 * d * d  # modulation, norm_out, t-embed
    io = 2 * img * c["in_channels"] * d + 2 * txt * c["joint_attention_dim"] * d + 2 * img * d * 4 * c["out_channels"]
    return float(blocks + lora + per_sample + io)


def test_sft_step_tiny(tmp_path: Path, one_process: None) -> None:
    assert _load("sft_step").main(["--tiny", "--layers", "2", "--steps", "1", "--warmup", "1", "--adapters", "fp32",
                                   "--variant", "8,none,2", "--variant", "8,1,4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sft_step.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert [r["status"] for r in rows.values()] == ["ok", "ok"]
    assert rows["8,1,4"]["ckpt_blocks"] == 1
    for row in rows.values():
        assert row["step_s"] > 0
        assert row["flops"]["sequences"] == 4  # batch 4 per step, whatever the micro-batch
        assert row["flops"]["matmul"] / 4 == pytest.approx(_tiny_matmul_flops_per_sequence(8), rel=1e-9)


def test_grpo_iteration_tiny(tmp_path: Path, one_process: None, tiny_models) -> None:
    assert _load("grpo_iteration").main([
        "--tiny", "--layers", "2", "--reward-seconds", "0.05", "--adapters", "fp32", "--out", str(tmp_path),
        "--forwards", "--vlm-dir", str(tiny_models.vlm),
        "--variant", "window=early2,mb=4,ckpt=none,old=rollout,iters=1",
        "--variant", "window=early2,mb=2,ckpt=1,iters=1,src=256,vlm=7b,attn=_native_math,fuse=0"]) == 0
    result = json.loads((tmp_path / "grpo_iteration.json").read_text())
    row, other = result["rows"]
    assert row["status"] == "ok" and other["status"] == "ok"
    # The forward comparison: peft's LoRA path and the fused one, per attention backend (the CPU lacks the
    # GPU-only backends: recorded as errors, not fatal).
    fw = row["denoise_forwards"]
    assert {(r["lora"], r["attention"]) for r in fw if "forward_s" in r} >= {("peft", "native"), ("fused", "native")}
    # A source at 4x the output's area (the stock pipeline's one megapixel at 512 px), the VLM run inside the
    # iteration, one of two blocks checkpointed.
    assert other["source_tokens"] == 256 and other["ckpt_blocks"] == 1 and other["condition_text_tokens"] > 50
    assert other["pair_flops"]["matmul"] > row["pair_flops"]["matmul"]
    it = row["iterations"][0]
    assert it["optimizer_step"] == 2  # two optimizer steps per group
    assert it["window_end"] - it["window_start"] == 1 and it["window_end"] < 4  # 2 early steps
    assert 0.02 <= row["reward_wait_s"] < row["iteration_s"]  # most of the 0.05 s reward of the last batch
    assert row["rollout_s"] + row["reward_wait_s"] + row["train_s"] <= row["iteration_s"]
    # One CFG velocity = a conditional and a negative sequence; r=64 LoRA on attention and MLP.
    assert row["pair_flops"]["sequences"] == 2
    assert row["pair_flops"]["matmul"] / 2 == pytest.approx(_tiny_matmul_flops_per_sequence(64, mlp=True), rel=1e-9)


@pytest.mark.slow
def test_learning_curves_runs_and_reports_each_evaluation(tiny_models, tmp_path, one_process, monkeypatch) -> None:
    """Two evaluations on the CPU: the curve has a row per evaluation with the held-out columns the README's tables
    quote (Ins on single meta-tasks, written CoTs parsed / cut), and the grid is rewritten at each evaluation."""
    import sys

    lc = _load("learning_curves")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "learning_curves.py", "--device", "cpu", "--out", str(out), "--models", str(tiny_models.pipeline),
        "--variant", "name=v,train=64,steps=2,eval=1:2,heldout=4,batch=4,sft.edit_region_weight=2"])
    lc.main()
    result = json.loads((out / "learning_curves.json").read_text())
    assert "error" not in result["v"], result["v"].get("error")
    rows = result["v"]["curve"]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("heldout_ins", "heldout_ins_single", "heldout_n_single", "heldout_cot_parsed", "heldout_cot_cut",
                "train_psnr", "loss_gen"):
        assert all(key in r for r in rows), key
    assert rows[0]["heldout_n_single"] > 0
    assert (out / "grid_v.png").is_file()
