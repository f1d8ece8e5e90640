"""Tiny local models: tokenizer (64-token system prefix, chat template), VLM folders, pipeline folder, trained VAE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from PIL import Image

from metacot.models import tiny, tiny_vae
from metacot.models.conditioning import stock_template, system_prefix_length

if TYPE_CHECKING:
    from tests.fixtures_models import TinyModels


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.make_tiny_tokenizer()


def test_tokenizer_folder_drops_the_same_64_token_prefix_as_the_real_one(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tiny.build_tiny_tokenizer(tmp_path / "tok"))
    template, drop_idx = stock_template()
    assert drop_idx == 64
    assert system_prefix_length(loaded) == 64
    ids = loaded(template.format("Make the red circle blue."))["input_ids"]
    # The dropped tokens are exactly the system turn plus "<|im_start|>user\n": the first kept token is the image.
    assert loaded.decode(ids[:64]) == template.split("<|vision_start|>")[0]
    assert ids[64] == loaded.convert_tokens_to_ids("<|vision_start|>")


def test_special_tokens_are_single_distinct_ids(tokenizer: Any) -> None:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tiny.QWEN_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(tiny.QWEN_SPECIAL_TOKENS)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_tokenizer_is_deterministic(tokenizer: Any) -> None:
    tiny._trained_bpe.cache_clear()  # train the BPE again instead of reusing this process's result
    retrained = tiny.make_tiny_tokenizer()
    assert retrained.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert retrained is not tokenizer


def test_chat_template_marks_exactly_the_assistant_turn_for_trl(tokenizer: Any) -> None:
    from trl.chat_template_utils import (
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
    )

    messages = [{"role": "user", "content": "Remove the star."}, {"role": "assistant", "content": "Meta-tasks: Remove"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Meta-tasks: Remove<|im_end|>"
    text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nRemove the star.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert is_chat_template_stop_token_trained(tokenizer)
    assert is_chat_template_prefix_preserving(tokenizer)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_vlm_folder_loads_with_auto_classes_and_sees_the_image(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny.build_tiny_vlm(tmp_path / arch, arch=arch, seed=0)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.model_type == arch
    text_config = model.config.text_config
    assert text_config.hidden_size // text_config.num_attention_heads >= 32  # vLLM CPU attention refuses smaller
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert text_config.vocab_size == len(tok)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is red?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    logits = []
    for colour in ((220, 20, 20), (20, 20, 220)):
        inputs = processor(text=[prompt], images=[Image.new("RGB", (32, 32), colour)], return_tensors="pt")
        assert int(inputs["image_grid_thw"].prod()) // 4 == 4  # a 32 px scene is 4 image tokens
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert not torch.allclose(logits[0], logits[1])


def test_vlm_init_depends_only_on_the_seed(tokenizer: Any) -> None:
    a, b, c = (tiny.make_tiny_vlm(tokenizer, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pipeline_folder_loads_as_a_stock_diffusers_pipeline(tiny_models: TinyModels) -> None:
    from diffusers import DiffusionPipeline, QwenImageEditPipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pipe = DiffusionPipeline.from_pretrained(tiny_models.pipeline)
    assert isinstance(pipe, QwenImageEditPipeline)
    index = json.loads((tiny_models.pipeline / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]  # as in the real Qwen-Image-Edit folder
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_models.pipeline / "text_encoder")
    AutoProcessor.from_pretrained(tiny_models.pipeline / "processor")
    assert vlm.config.text_config.hidden_size == pipe.transformer.config.joint_attention_dim
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.z_dim
    for key, value in tiny.QWEN_IMAGE_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key
    # The standalone VLM folder holds the very same weights as the pipeline's text encoder.
    standalone = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm).state_dict()
    assert all(torch.equal(t, standalone[k]) for k, t in vlm.state_dict().items())


def test_trained_vae_reconstructs_held_out_scenes(tiny_models: TinyModels) -> None:
    from diffusers import AutoencoderKLQwenImage

    from metacot.scenes import sample_scene_images

    report = json.loads((tiny_models.pipeline / "vae_report.json").read_text())
    assert report["heldout_psnr_db"] >= 20.0
    assert report["heldout_mse"] < report["mean_colour_baseline_mse"] / 4
    vae = AutoencoderKLQwenImage.from_pretrained(tiny_models.pipeline / "vae")
    fresh = tiny_vae.reconstruction_error(vae, sample_scene_images(32, tiny_models.resolution, seed=424242))
    assert fresh["psnr_db"] >= 20.0, fresh
    assert any(abs(m) > 1e-3 for m in vae.config.latents_mean)  # latent statistics were measured and stored


def test_single_frame_convs_equal_the_stock_vae_path() -> None:
    vae = tiny_vae.make_tiny_vae(seed=3).eval()
    for module in vae.modules():  # give the zero-initialised residual branches some weight
        if isinstance(module, torch.nn.Conv3d | torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    pixels = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        stock = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        with tiny_vae.single_frame(vae):
            fast = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    assert torch.allclose(stock, fast, atol=1e-5)
    assert "forward" not in vars(vae.encoder.conv_in)  # the stock forward is back after the block


def test_vae_training_is_deterministic_and_lowers_the_error() -> None:
    (a, report_a), (b, report_b) = (tiny_vae.train_tiny_vae(resolution=16, seed=5, steps=12) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert report_a["heldout_mse"] == report_b["heldout_mse"]
    untrained = tiny_vae.make_tiny_vae(seed=5).eval()
    from metacot.scenes import sample_scene_images

    scenes = sample_scene_images(16, 16, seed=5 + tiny_vae.HELDOUT_SEED_OFFSET)
    assert report_a["heldout_mse"] < tiny_vae.reconstruction_error(untrained, scenes)["mse"]


def test_bad_resolution_and_arch_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(tiny.TinyBuildError, match="multiple of 8"):
        tiny.build_tiny_editing_model(tmp_path / "p", resolution=30)
    with pytest.raises(tiny.TinyBuildError, match="unknown tiny VLM arch"):
        tiny.make_tiny_vlm(tokenizer, arch="llava")
    assert not (tmp_path / "p").exists()


def test_mini_size_reuses_the_trained_vae_and_loads_through_the_library(tiny_models: TinyModels, tmp_path: Path) -> None:
    from diffusers import AutoencoderKLQwenImage
    from transformers import AutoProcessor

    from metacot.models.cli import main
    from metacot.models.loading import load_editing_model

    assert main(["tiny", "--out", str(tmp_path / "m"), "--size", "mini", "--vae-from", str(tiny_models.pipeline)]) == 0
    pipeline = tmp_path / "m" / "pipeline"
    model = load_editing_model(pipeline)
    size = tiny.MODEL_SIZES["mini"]
    assert model.vlm.config.text_config.hidden_size == size.vlm_hidden == model.transformer.config.joint_attention_dim
    assert model.transformer.config.num_layers == size.dit_layers
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("vlm", model.vlm), ("dit", model.transformer))}
    assert all(n > 2_000_000 for n in params.values()), params  # tiny: about 0.4 M each
    reused, original = (AutoencoderKLQwenImage.from_pretrained(p / "vae").state_dict()
                        for p in (pipeline, tiny_models.pipeline))
    assert all(torch.equal(t, original[k]) for k, t in reused.items())
    assert json.loads((pipeline / "vae_report.json").read_text())["reused_from"] == str(tiny_models.pipeline)
    # The mini VLM sees a 32 px scene as 16 tokens (8 x 8 px each), the tiny one as 4.
    grids = [AutoProcessor.from_pretrained(p / "processor").image_processor(
        images=[Image.new("RGB", (32, 32))], return_tensors="pt")["image_grid_thw"][0].tolist()
        for p in (pipeline, tiny_models.pipeline)]
    assert grids == [[1, 8, 8], [1, 4, 4]]


def test_unknown_size_and_a_vae_of_another_resolution_are_refused(tiny_models: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(tiny.TinyBuildError, match="unknown model size 'huge'"):
        tiny.build_tiny_editing_model(tmp_path / "p", size="huge")
    with pytest.raises(tiny.TinyBuildError, match="trained at 32 px, not 64"):
        tiny.build_tiny_editing_model(tmp_path / "p", resolution=64, vae_from=tiny_models.pipeline)
    with pytest.raises(tiny.TinyBuildError, match="no vae/ and vae_report.json"):
        tiny.build_tiny_editing_model(tmp_path / "p", vae_from=tmp_path)
    assert not (tmp_path / "p").exists()
