"""Loading and saving the editing model as a plain diffusers pipeline folder; the CLI that builds tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from metacot.models import cli, tiny_vae
from metacot.models.loading import (
    EditingModel,
    ModelFolderError,
    load_editing_model,
    save_editing_model,
)
from metacot.run import is_complete

if TYPE_CHECKING:
    from tests.fixtures_models import TinyModels


@pytest.fixture(scope="module")
def model(tiny_models: TinyModels) -> EditingModel:
    return load_editing_model(tiny_models.pipeline)


def test_loaded_model_facts(model: EditingModel) -> None:
    assert type(model.vlm).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.vae_scale_factor == 4 and model.latent_channels == 16 and model.pixel_multiple == 8
    assert model.tokenizer is model.processor.tokenizer
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert not model.transformer.training and not model.vlm.training


def test_save_then_load_round_trips_through_diffusers(model: EditingModel, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    with torch.no_grad():  # make the saved weights differ from the source folder's
        model.transformer.proj_out.bias.add_(1.0)
    try:
        out = save_editing_model(model, tmp_path / "saved")
        assert is_complete(out)
        loaded = load_editing_model(out)
        for name in ("vlm", "transformer", "vae"):
            ours, theirs = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        pipe = DiffusionPipeline.from_pretrained(out)
        assert torch.equal(pipe.transformer.proj_out.bias, model.transformer.proj_out.bias)
        assert not list(out.rglob("*.bin"))  # safetensors only
        with pytest.raises(Exception, match="already exists"):
            save_editing_model(model, out)
        (tmp_path / "outer").mkdir()  # atomic=False writes into a folder the caller already made atomic
        save_editing_model(model, tmp_path / "outer", atomic=False)
        assert (tmp_path / "outer" / "model_index.json").is_file() and not is_complete(tmp_path / "outer")
    finally:
        with torch.no_grad():
            model.transformer.proj_out.bias.sub_(1.0)


def test_adapter_layers_are_refused_on_save(model: EditingModel, tmp_path: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    transformer = model.transformer
    lora = inject_adapter_in_model(LoraConfig(target_modules=["to_q"], r=2), _copy(transformer))
    with pytest.raises(TypeError, match="merge them first"):
        save_editing_model(type(model)(**{**vars(model), "transformer": lora}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("missing", ["vae", "text_encoder/config.json", "model_index.json"])
def test_missing_parts_name_themselves(tiny_models: TinyModels, tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_models.pipeline, folder)
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelFolderError, match=missing.split("/")[-1] if missing != "vae" else "'vae' is missing"):
        load_editing_model(folder)


def test_cli_builds_both_folders_and_refuses_to_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForImageTextToText

    monkeypatch.setattr(tiny_vae, "DEFAULT_STEPS", 2)  # the CLI's full VAE training is what tiny_models measures
    assert cli.main(["tiny", "--out", str(tmp_path / "m"), "--resolution", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"pipeline: {tmp_path / 'm' / 'pipeline'}" in printed and "prefix = 64 tokens" in printed
    DiffusionPipeline.from_pretrained(tmp_path / "m" / "pipeline")
    AutoModelForImageTextToText.from_pretrained(tmp_path / "m" / "vlm")
    assert cli.main(["tiny", "--out", str(tmp_path / "m")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
