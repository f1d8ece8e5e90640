"""metacot's edit loop: same result as the stock pipeline, deterministic per seed, and its pieces."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from metacot.scenes import sample_scene_images
from metacot.models.conditioning import NEGATIVE_PROMPT, encode_conditions
from metacot.models.loading import EditingModel, load_editing_model
from metacot.models.sampler import (
    decode_latents,
    edit,
    encode_latents,
    image_shapes,
    initial_noise,
    pack,
    predict_velocity,
    sigma_schedule,
    unpack,
)

if TYPE_CHECKING:
    from tests.fixtures_models import TinyModels

SIZE = 32
PROMPTS = ["Make the red circle blue.", "Remove the star.\nMeta-CoT:\n### Meta-task summary\nMeta-tasks: Remove"]


@pytest.fixture(scope="module")
def model(tiny_models: TinyModels) -> EditingModel:
    return load_editing_model(tiny_models.pipeline)


@pytest.fixture(scope="module")
def sources() -> list[Image.Image]:
    return sample_scene_images(2, SIZE, seed=21)


def _arrays(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def test_two_step_edit_is_finite_sized_and_seeded(model: EditingModel, sources: list[Image.Image]) -> None:
    def run(seed: int) -> np.ndarray:
        out = edit(model, sources, PROMPTS, height=SIZE, width=SIZE, num_steps=2, cfg_scale=4.0,
                   generator=torch.Generator().manual_seed(seed))
        assert [img.size for img in out] == [(SIZE, SIZE)] * 2 and all(img.mode == "RGB" for img in out)
        return _arrays(out)

    first, again, other = run(0), run(0), run(1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.std() > 0  # not a constant image


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_edit_equals_the_stock_pipeline(
    model: EditingModel, tiny_models: TinyModels, sources: list[Image.Image], cfg_scale: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as stock
    from diffusers import QwenImageEditPipeline

    # The stock pipeline resizes its inputs to ~1 megapixel; give its size rule the small target area instead.
    monkeypatch.setattr(stock, "calculate_dimensions", lambda area, ratio: (SIZE, SIZE, None))
    pipe = QwenImageEditPipeline.from_pretrained(tiny_models.pipeline)
    guided = cfg_scale > 1
    ref = pipe(
        image=sources, prompt=PROMPTS, negative_prompt=[NEGATIVE_PROMPT] * 2 if guided else None,
        true_cfg_scale=cfg_scale, height=SIZE, width=SIZE, num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
    ).images
    ours = edit(model, sources, PROMPTS, height=SIZE, width=SIZE, num_steps=2, cfg_scale=cfg_scale,
                generator=torch.Generator().manual_seed(7))
    assert np.abs(_arrays(ours) - _arrays(ref)).max() <= 1  # uint8 rounding at most


def test_sigma_schedule_is_the_pipelines(model: EditingModel) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
        calculate_shift,
        retrieve_timesteps,
    )

    config = model.scheduler.config
    untouched = model.scheduler.sigmas.clone()
    for steps, seq_len in ((2, 16), (10, 16), (28, 4096)):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                             config["max_shift"])
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        sigmas = sigma_schedule(model, steps, seq_len)
        assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        assert torch.allclose(sigmas, scheduler.sigmas.float())
        assert torch.all(sigmas[:-1] > sigmas[1:])
    # One step: the stock scheduler's terminal stretch gives NaN (0 / 0); metacot takes one jump from noise.
    assert sigma_schedule(model, 1, 16).tolist() == [1.0, 0.0]
    # Longer sequences are shifted towards high noise (the dynamic shift is really applied).
    assert sigma_schedule(model, 10, 4096)[5] > sigma_schedule(model, 10, 16)[5]
    assert torch.equal(model.scheduler.sigmas, untouched)  # the model's own scheduler is not modified


def test_batched_cfg_equals_two_forwards_and_the_guidance_formula(
    model: EditingModel, sources: list[Image.Image]
) -> None:
    with torch.no_grad():
        cond = encode_conditions(model.vlm, model.processor, sources, PROMPTS)
        neg = encode_conditions(model.vlm, model.processor, sources, [NEGATIVE_PROMPT] * 2)
        image_latents = encode_latents(model, sources)
        latents = initial_noise(model, 2, SIZE, SIZE, torch.Generator().manual_seed(3))
        kw = {"height": SIZE, "width": SIZE}
        guided = predict_velocity(model, latents, image_latents, cond, 0.7, neg_cond=neg, cfg_scale=3.0, **kw)
        v_cond = predict_velocity(model, latents, image_latents, cond, 0.7, **kw).double()
        v_neg = predict_velocity(model, latents, image_latents, neg, 0.7, **kw).double()
    combined = v_neg + 3.0 * (v_cond - v_neg)
    expected = combined * v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    assert guided.shape == latents.shape
    assert torch.allclose(guided.double(), expected, atol=1e-5)
    assert not torch.allclose(v_cond, v_neg)  # the prompt reaches the velocity


def test_an_explicit_transformer_is_the_one_that_runs(model: EditingModel, sources: list[Image.Image]) -> None:
    import copy

    assert image_shapes(model, SIZE, 2 * SIZE) == (1, SIZE // 8, 2 * SIZE // 8)
    other = copy.deepcopy(model.transformer)
    with torch.no_grad():
        other.proj_out.bias.add_(0.5)
        cond = encode_conditions(model.vlm, model.processor, sources, PROMPTS)
        image_latents = encode_latents(model, sources)
        latents = initial_noise(model, 2, SIZE, SIZE, torch.Generator().manual_seed(4))
        kw = {"height": SIZE, "width": SIZE}
        default = predict_velocity(model, latents, image_latents, cond, 0.3, **kw)
        explicit = predict_velocity(model, latents, image_latents, cond, 0.3, transformer=other, **kw)
    assert torch.allclose(explicit, default + 0.5, atol=1e-5)
    other.train()  # with grad, as the Flow-GRPO policy runs it
    v = predict_velocity(model, latents, image_latents, cond, 0.3, transformer=other, **kw)
    v.pow(2).mean().backward()
    assert other.proj_out.weight.grad is not None and model.transformer.proj_out.weight.grad is None


def test_latents_pack_unpack_and_reconstruct(model: EditingModel, sources: list[Image.Image]) -> None:
    grid = torch.randn(2, model.latent_channels, 1, SIZE // model.vae_scale_factor, SIZE // model.vae_scale_factor)
    assert torch.equal(unpack(pack(grid), SIZE, SIZE, model.vae_scale_factor), grid)
    with torch.no_grad():
        packed = encode_latents(model, sources)
        decoded = decode_latents(model, packed, SIZE, SIZE)
    assert packed.shape == (2, (SIZE // model.pixel_multiple) ** 2, 4 * model.latent_channels)
    assert 0.2 < float(packed.std()) < 5  # normalised by the VAE's latent statistics
    mse = ((_arrays(decoded) - _arrays(sources)) / 255.0) ** 2
    assert 10 * np.log10(1 / mse.mean()) > 18


def test_bad_inputs_are_refused(model: EditingModel, sources: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        edit(model, sources, PROMPTS, height=30, width=32, num_steps=1, cfg_scale=1.0, generator=None)
    with pytest.raises(ValueError, match="one image per prompt"):
        edit(model, sources[:1], PROMPTS, height=SIZE, width=SIZE, num_steps=1, cfg_scale=1.0, generator=None)
    with torch.no_grad():
        cond = encode_conditions(model.vlm, model.processor, sources, PROMPTS)
        latents = initial_noise(model, 2, SIZE, SIZE, None)
        with pytest.raises(ValueError, match="true CFG needs both"):
            predict_velocity(model, latents, encode_latents(model, sources), cond, 0.5, height=SIZE, width=SIZE,
                             cfg_scale=4.0)
    with pytest.raises(ValueError, match="one size"):
        encode_latents(model, [sources[0], sources[1].resize((16, 16))])
    with pytest.raises(ValueError, match="at least one denoising step"):
        sigma_schedule(model, 0, 16)
