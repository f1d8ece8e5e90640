"""``metacot export`` on tiny SFT / Flow-GRPO runs: layouts, weights, checkpoints (ZeRO-2 and ZeRO-3), refusals.

Every export below was reloaded by the exporter in a fresh process that imports no metacot and produced a finite
2-step edit (it refuses to commit otherwise); the tests check the recorded report and recompute the weights
independently (merged LoRA = W_base + (alpha / r) B A).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from metacot.export import cli
from metacot.export.exporter import export_run
from metacot.export.source import ExportError
from metacot.export.verify import VerificationError, check_against
from metacot.run import is_complete

QUIET = {"say": lambda _: None}
# Set in this process by the in-process trainers (world size 1); a child process must pick its own port.
DIST_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def vlm_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return {k: v.float() for k, v in AutoModelForImageTextToText.from_pretrained(folder).state_dict().items()}


def mmdit_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import QwenImageTransformer2DModel

    return {k: v.float() for k, v in QwenImageTransformer2DModel.from_pretrained(folder).state_dict().items()}


def lora_merge(base: dict[str, torch.Tensor], adapter_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """base + (alpha / r) B A for every adapted weight, from the adapter's own files."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out, merged = dict(base), 0
    for key, a in tensors.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
            out[name] = base[name] + scale * tensors[key.replace("lora_A", "lora_B")].float() @ a.float()
            merged += 1
    return out, merged


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as a bf16 export holds them."""
    return {k: v.bfloat16().float() for k, v in state.items()}


def tensor_dtypes(folder: Path) -> set[str]:
    out = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as fh:
            out |= {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    return out


# -- SFT ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_merged_sft_export_is_base_plus_lora(tiny_sft_export: Path, tiny_sft_run: Path, tiny_models,
                                            tiny_dataset: Path) -> None:
    out, final = tiny_sft_export, tiny_sft_run / "final"
    assert is_complete(out) and (out / "pipeline" / "model_index.json").is_file()
    facts = json.loads((out / "metacot.json").read_text())
    smoke = facts["verification"]["smoke"]
    assert smoke["finite"] and smoke["imported_metacot"] == [] and smoke["image_shape"] == [1, 64, 64, 3]
    base = Path(tiny_models.pipeline)
    for folder, load, adapter in (("text_encoder", vlm_state, "understanding"), ("transformer", mmdit_state,
                                                                               "generation")):
        want, merged = lora_merge(load(base / folder), final / "adapters" / adapter)
        got = load(out / "pipeline" / folder)
        assert merged >= 8 and max_diff(got, want) < 1e-5
        assert max_diff(got, load(base / folder)) > 1e-4, f"{folder}: the trained LoRA must change the weights"
    # The understanding expert is the text encoder here: hard links, no second copy on disk.
    te = sorted((out / "pipeline" / "text_encoder").glob("*.safetensors"))
    assert te and all(os.path.samefile(p, out / "understanding" / p.name) for p in te)
    assert facts["layout"]["understanding"]["files"] == "hardlink"
    assert set(facts["verification"]["check_against"]["folders"]) >= {"pipeline/text_encoder", "understanding"}
    # Provenance: the data manifest hash, the prompt format, the base model.
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    assert manifest["content_sha256"] in card and str(base) in card
    assert facts["prompt_format"]["example"].startswith("Make the red circle blue.\nMeta-CoT:\n### Meta-task")
    assert facts["prompt_format"]["example"] in card
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not (out / ".work").exists()


@pytest.mark.slow
def test_keep_lora_sharded_export_holds_base_weights_and_the_runs_adapters(tiny_sft_run: Path, tiny_models,
                                                                           tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("metacot.export.layout.MAX_SHARD_SIZE", "300KB")
    out = tmp_path / "export"
    assert cli.main([str(tiny_sft_run), "--out", str(out), "--keep-lora"]) == 0
    facts = json.loads((out / "metacot.json").read_text())
    assert facts["layout"]["lora"] == "kept" and facts["layout"]["dtype"] == "bf16"
    assert set(facts["layout"]["adapters"]) == {"understanding", "generation"}
    base = Path(tiny_models.pipeline)
    assert max_diff(mmdit_state(out / "pipeline" / "transformer"), bf16(mmdit_state(base / "transformer"))) == 0
    from safetensors.torch import load_file

    for name in ("understanding", "generation"):
        got = load_file(out / "adapters" / name / "adapter_model.safetensors")
        want = load_file(tiny_sft_run / "final" / "adapters" / name / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].bfloat16()) for k in want)
    # Sharded the way transformers / diffusers expect, and the links cover every shard.
    index = out / "pipeline" / "text_encoder" / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1 and all(os.path.samefile(out / "pipeline" / "text_encoder" / s, out / "understanding" / s)
                                   for s in shards)
    assert (out / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert tensor_dtypes(out / "pipeline" / "transformer") == {"BF16"}
    # metacot edit applies the kept adapters on load: it then holds the run's merged weights (to bf16 precision).
    from metacot.export.edit import load_model

    loaded = load_model(out)
    got = {k: v.float() for k, v in loaded.model.transformer.state_dict().items()}
    assert max_diff(got, mmdit_state(tiny_sft_run / "final" / "transformer")) < 1e-2
    assert loaded.und_vlm is loaded.model.vlm  # conditions were encoded with the adapter on: one module serves both


@pytest.mark.slow
def test_checkpoint_export_equals_the_final_weights_of_the_same_step(tiny_sft_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = export_run(tiny_sft_run, out, step=2, dtype="fp32", check_against_run=tiny_sft_run, **QUIET)
    assert result.facts["source"]["weights"] == "checkpoints/step-2"
    final = tiny_sft_run / "final"
    assert max_diff(vlm_state(out / "pipeline" / "text_encoder"), vlm_state(final / "text_encoder")) < 1e-6
    assert max_diff(mmdit_state(out / "pipeline" / "transformer"), mmdit_state(final / "transformer")) < 1e-6


# -- Flow-GRPO ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grpo_export_records_both_stages_judge_and_curves(tiny_grpo_run: Path, tiny_sft_run: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "export"
    facts = export_run(tiny_grpo_run, out, **QUIET).facts
    assert set(facts["stages"]) == {"sft", "grpo"}
    assert facts["stages"]["sft"]["run"] == str(tiny_sft_run.resolve())
    gate = json.loads((tiny_grpo_run / "gate.json").read_text())
    assert facts["stages"]["grpo"]["judge"]["gate"] == gate
    card = (out / "README.md").read_text()
    assert "### GRPO run" in card and "### SFT run" in card and "grpo-reward.png" in card
    assert (out / "report" / "grpo-reward.png").is_file() and (out / "report" / "sft-loss.png").is_file()
    assert facts["stages"]["grpo"]["metrics"]["last"]["step"] == 2
    # Stage 2 tuned only the MMDiT: the text encoder is the SFT one; the transformer is the GRPO run's (in bf16),
    # which its LoRA moved away from the SFT one.
    assert max_diff(vlm_state(out / "pipeline" / "text_encoder"),
                    bf16(vlm_state(tiny_sft_run / "final" / "text_encoder"))) == 0
    exported = mmdit_state(out / "pipeline" / "transformer")
    assert max_diff(exported, bf16(mmdit_state(tiny_grpo_run / "final" / "transformer"))) == 0
    assert max_diff(exported, mmdit_state(tiny_sft_run / "final" / "transformer")) > 1e-3


@pytest.mark.slow
def test_grpo_checkpoint_keep_lora_export_checks_against_the_run(tiny_grpo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    facts = export_run(tiny_grpo_run, out, keep_lora=True, step=1, dtype="fp32", check_against_run=tiny_grpo_run,
                       **QUIET).facts
    assert facts["layout"]["adapters"]["generation"]["apply_to"] == ["pipeline/transformer"]
    assert facts["layout"]["base_model"] == str(tiny_grpo_run.parent / "sft" / "final")
    assert facts["source"]["step"] == 1 and "adapters/generation" in facts["verification"]["check_against"]["folders"]


# -- ZeRO-3 ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_zero3_checkpoint_export(tiny_models, tiny_dataset: Path, tmp_path: Path) -> None:
    from fixtures_runs import SFT_FAST  # tests/ is on sys.path (conftest.py registers the fixture modules)

    # The ZeRO-3 run gets its own process, as `metacot sft` would: ZeRO-3 leaves process-wide state behind
    # (accelerate's, transformers' zero.Init switch) that must not leak into the other tests.
    run = tmp_path / "run"
    overrides = [f"model={tiny_models.pipeline}", f"data.train={tiny_dataset / 'train.jsonl'}", f"output_dir={run}",
                 *SFT_FAST, "train.deepspeed=zero3", "train.save_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run([sys.executable, "-m", "metacot.sft.cli", "--config", "tiny", *overrides], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-2" / "pytorch_model").is_dir()
    out = tmp_path / "export"
    export_run(run, out, step=2, dtype="fp32", **QUIET)
    assert max_diff(vlm_state(out / "pipeline" / "text_encoder"), vlm_state(run / "final" / "text_encoder")) < 1e-6
    assert max_diff(mmdit_state(out / "pipeline" / "transformer"), mmdit_state(run / "final" / "transformer")) < 1e-6


# -- refusals --------------------------------------------------------------------------------------------------------

def _copy_run(run: Path, dest: Path, final: bool = True) -> Path:
    dest.mkdir(parents=True)
    shutil.copy2(run / "config.yaml", dest / "config.yaml")
    if final:
        shutil.copytree(run / "final", dest / "final")
    return dest


@pytest.mark.slow
def test_refusals_say_what_to_do(tiny_sft_run: Path, tiny_sft_export: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ExportError, match="no config.yaml"):
        export_run(tmp_path, tmp_path / "x", **QUIET)
    bare = _copy_run(tiny_sft_run, tmp_path / "bare", final=False)
    with pytest.raises(ExportError, match="does not exist.*finish or resume"):
        export_run(bare, tmp_path / "x", **QUIET)
    with pytest.raises(ExportError, match="complete checkpoints of this run: 1, 2"):
        export_run(tiny_sft_run, tmp_path / "x", step=7, **QUIET)
    broken = _copy_run(tiny_sft_run, tmp_path / "broken")
    (broken / "final" / "metacot_complete.json").unlink()
    with pytest.raises(ExportError, match="incomplete"):
        export_run(broken, tmp_path / "x", **QUIET)
    moved = _copy_run(tiny_sft_run, tmp_path / "moved")
    meta = json.loads((moved / "final" / "metacot.json").read_text())
    (moved / "final" / "metacot.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match="base model the run recorded cannot be found"):
        export_run(moved, tmp_path / "x", keep_lora=True, **QUIET)
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_run(tiny_sft_run, tiny_sft_export, **QUIET)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=10_000, used=9_000, free=1_000))
    with pytest.raises(OSError, match="not enough disk space.*GiB"):
        export_run(tiny_sft_run, tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists()
    assert cli.main([str(bare), "--out", str(tmp_path / "x")]) == 1


def test_cli_merges_lora_unless_asked_to_keep_it() -> None:
    parse = cli.build_parser().parse_args
    assert parse(["run", "--out", "x"]).keep_lora is False
    assert parse(["run", "--out", "x", "--merge-lora"]).keep_lora is False
    assert parse(["run", "--out", "x", "--keep-lora"]).keep_lora is True
    with pytest.raises(SystemExit):
        parse(["run", "--out", "x", "--keep-lora", "--merge-lora"])


@pytest.mark.slow
def test_an_export_that_fails_verification_leaves_nothing(tiny_sft_run: Path, tmp_path: Path, monkeypatch) -> None:
    from metacot.export import exporter

    real = exporter.write_weights

    def broken(final: Path, meta: dict, tmp: Path, **kwargs):
        layout = real(final, meta, tmp, **kwargs)
        (tmp / "pipeline" / "vae" / "config.json").unlink()  # a component diffusers cannot load
        return layout

    monkeypatch.setattr(exporter, "write_weights", broken)
    with pytest.raises(VerificationError, match="fresh process"):
        export_run(tiny_sft_run, tmp_path / "out", **QUIET)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_weight_check_catches_a_changed_tensor(tiny_sft_export: Path, tiny_sft_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "export"
    shutil.copytree(tiny_sft_export, copy)
    layout = json.loads((copy / "metacot.json").read_text())["layout"]
    path = next((copy / "pipeline" / "transformer").glob("*.safetensors"))
    tensors = load_file(path)
    key = min(tensors)
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(VerificationError, match=f"pipeline/transformer: tensor {re.escape(key)} differs"):
        check_against(copy, layout, tiny_sft_run / "final")
