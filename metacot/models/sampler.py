"""metacot's explicit flow-matching edit loop, in pieces the Flow-GRPO trainer reuses.

It does what ``QwenImageEditPipeline.__call__`` does, at the size it is given (the source latents at the output size
by default, or at the stock pipeline's one megapixel with ``source_area``, see :func:`source_shape`):

1. :func:`encode_latents`: source images -> VAE latent mode, normalised by the VAE's ``latents_mean``/``latents_std``,
   packed into 2x2 patches ``[B, (h/2)*(w/2), 4*C]`` (the edit context the MMDiT attends to).
2. :func:`~metacot.models.conditioning.encode_conditions`: source image + prompt -> VLM hidden states.
3. :func:`sigma_schedule`: ``linspace(1, 1/N, N)`` shifted by the scheduler's resolution-dependent ``mu`` (same
   ``calculate_shift`` and scheduler config as the pipeline), with the final 0 appended: ``[N+1]``.
4. :func:`predict_velocity`: the MMDiT on ``[noisy latents ; source latents]``; true classifier-free guidance as the
   pipeline does it (``neg + s * (cond - neg)``, rescaled to the conditional prediction's norm per token), with both
   branches in ONE batched forward.
5. Euler steps ``x <- x + (sigma_next - sigma) * v`` and :func:`decode_latents`.

With the same initial noise, :func:`edit` gives what the stock pipeline gives (checked in the tests). The SDE rollout
and log-probabilities of Flow-GRPO live in ``metacot.flow_grpo`` and build on these pieces.

Left out: the pipeline's automatic resizing, ``num_images_per_prompt`` (repeat the inputs), callbacks, LoRA scaling
kwargs and guidance-distilled models (the Qwen-Image-Edit transformer has no guidance embedding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from metacot.models.conditioning import (
    DEFAULT_MAX_TEXT_TOKENS,
    NEGATIVE_PROMPT,
    encode_conditions,
)
from metacot.models.loading import EditingModel

Condition = tuple[torch.Tensor, torch.Tensor]  # (embeds [B, L, D], mask [B, L]) from encode_conditions


def _image_processor(model: EditingModel):
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=model.pixel_multiple)


def check_size(model: EditingModel, height: int, width: int) -> None:
    """Refuse image sides that are not positive multiples of ``model.pixel_multiple`` (VAE /s x 2x2 packing)."""
    m = model.pixel_multiple
    if height <= 0 or width <= 0 or height % m or width % m:
        raise ValueError(
            f"height={height}, width={width}: both must be positive multiples of {m} (VAE downsampling "
            f"{model.vae_scale_factor} x 2x2 latent packing); e.g. {max(m, height // m * m)}"
        )


def resize_sources(model: EditingModel, images: Sequence[Image.Image], height: int, width: int) -> list[Image.Image]:
    """Resize source images to ``width x height`` as the stock pipeline resizes to its computed size."""
    check_size(model, height, width)
    processor = _image_processor(model)
    return [processor.resize(img.convert("RGB"), height, width) for img in images]


STOCK_SOURCE_AREA = 1024 * 1024  # QwenImageEditPipeline encodes the source at about one megapixel, any output size


def source_shape(model: EditingModel, height: int, width: int, area: int) -> tuple[int, int]:
    """``(height, width)`` in pixels at which the source image of a ``width x height`` edit is VAE-encoded.

    ``area`` 0 keeps the output size (1,024 source tokens at 512 px); ``STOCK_SOURCE_AREA`` is what the stock
    pipeline does (about one megapixel at the output's aspect ratio, sides rounded to multiples of 32: 4,096 source
    tokens for a square edit, whatever its size).
    """
    if area < 0:
        raise ValueError(f"source_area={area}: use 0 (the output size) or a pixel area such as {STOCK_SOURCE_AREA}")
    if area == 0:
        return height, width
    m = max(32, model.pixel_multiple)
    w = math.sqrt(area * width / height)
    return max(m, round(w * height / width / m) * m), max(m, round(w / m) * m)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, h, w]`` -> ``[B, (h/2)*(w/2), 4*C]`` (2x2 patches, the MMDiT token layout)."""
    b, c, _, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Inverse of :func:`pack` for an image of ``height x width`` pixels: -> ``[B, C, 1, h, w]``."""
    b, _, channels = packed.shape
    h, w = height // vae_scale_factor, width // vae_scale_factor
    latents = packed.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, 1, h, w)


def _latent_stats(model: EditingModel, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, model.latent_channels, 1, 1, 1)
    mean = torch.tensor(model.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(model.vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()  # the VAE is never trained here; no graph through it
def encode_latents(model: EditingModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """Encode same-sized images into normalised, packed VAE latents (the latent mode, as the pipeline does).

    Args:
        model: the editing model.
        images: PIL images, all of the same size with sides that are multiples of ``model.pixel_multiple``.

    Returns:
        ``[B, (H/s/2)*(W/s/2), 4*C]`` in the VAE's dtype (s = ``model.vae_scale_factor``).

    Raises:
        ValueError: images of different sizes, or a side that is not a valid multiple.
    """
    sizes = {img.size for img in images}
    if len(sizes) != 1:
        raise ValueError(f"encode_latents needs images of one size, got sizes {sorted(sizes)}; resize them first")
    width, height = sizes.pop()
    check_size(model, height, width)
    pixels = _image_processor(model).preprocess(list(images), height, width).unsqueeze(2)
    pixels = pixels.to(model.vae.device, model.vae.dtype)
    latents = model.vae.encode(pixels).latent_dist.mode()
    mean, std = _latent_stats(model, latents)
    return pack((latents - mean) / std)


def decode_latents(model: EditingModel, packed: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    """Decode packed normalised latents into ``width x height`` PIL images (as the pipeline's output step)."""
    check_size(model, height, width)
    latents = unpack(packed, height, width, model.vae_scale_factor).to(model.vae.dtype)
    mean, std = _latent_stats(model, latents)
    pixels = model.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return _image_processor(model).postprocess(pixels, output_type="pil")


def sigma_schedule(model: EditingModel, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The sigmas of a ``num_steps`` edit at ``image_seq_len`` latent tokens, exactly as the stock pipeline sets them.

    Args:
        model: the editing model (its scheduler config is read; the scheduler object is not modified).
        num_steps: denoising steps N.
        image_seq_len: packed latent tokens of the output image (``(H/s/2)*(W/s/2)``).

    Returns:
        float32 ``[N+1]``, decreasing from ~1 to the terminal sigma, then 0.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one denoising step")
    if num_steps == 1:
        # One Euler jump from pure noise. (The scheduler's terminal stretch divides by 1 - sigma_last, which is 0
        # for a single sigma of 1: the stock pipeline gets NaN there.) Any shift maps sigma 1 to 1.
        return torch.tensor([1.0, 0.0], dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=_shift_mu(model, image_seq_len))
    return scheduler.sigmas.to(torch.float32).cpu()


def _shift_mu(model: EditingModel, image_seq_len: int) -> float:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    config = model.scheduler.config
    return calculate_shift(
        image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )


def sampler_shift(model: EditingModel, image_seq_len: int) -> float:
    """The factor ``s`` of the sampler's sigma shift ``s*t / (1 + (s-1)*t)`` at ``image_seq_len`` output tokens.

    The stock scheduler shifts exponentially with ``mu`` from the sequence length (``s = e^mu``) when dynamic shifting
    is on, else by its fixed ``shift``. Stage 1 uses it to train the noise levels the sampler visits (the terminal
    stretch, a small change near sigma 0, is left out).
    """
    config = model.scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    mu = _shift_mu(model, image_seq_len)
    # diffusers' time_shift: exponential e^mu / (e^mu + (1/t - 1)), linear mu / (mu + (1/t - 1)): both are s*t/(...).
    return float(mu if config.get("time_shift_type", "exponential") == "linear" else np.exp(mu))


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - x.shape[1]
    return x if pad == 0 else torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


def image_shapes(model: EditingModel, height: int, width: int) -> tuple[int, int, int]:
    """``(frames, rows, cols)`` of the packed latent grid of a ``width x height`` image, as the MMDiT's
    ``img_shapes`` entries are written (the trainers build their ``img_shapes`` with it)."""
    check_size(model, height, width)
    return (1, height // model.vae_scale_factor // 2, width // model.vae_scale_factor // 2)


def image_seq_len(model: EditingModel, height: int, width: int) -> int:
    """Packed latent tokens of a ``width x height`` output image (what the sampler's shift is computed from)."""
    _, rows, cols = image_shapes(model, height, width)
    return rows * cols


def predict_velocity(
    model: EditingModel, latents: torch.Tensor, image_latents: torch.Tensor, cond: Condition,
    sigma: float | torch.Tensor, *, height: int, width: int, neg_cond: Condition | None = None,
    cfg_scale: float = 1.0, transformer: torch.nn.Module | None = None, source_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The MMDiT's flow velocity for noisy latents, conditioned on the source latents and the VLM condition.

    Args:
        model: the editing model.
        latents: noisy packed latents ``[B, N, 4C]`` at noise level ``sigma``.
        image_latents: packed source latents ``[B, N_src, 4C]`` (:func:`encode_latents`).
        cond: ``(embeds [B, L, D], mask [B, L])`` from ``encode_conditions``.
        sigma: noise level in [0, 1], a float or ``[B]`` tensor (the MMDiT's timestep is sigma, as in the pipeline).
        height: output image height in pixels (sets the latent grid for the MMDiT's positional encoding).
        width: output image width in pixels.
        neg_cond: the negative condition for true CFG (required when ``cfg_scale > 1``).
        cfg_scale: true CFG scale; 1 disables guidance.
        transformer: the MMDiT to run instead of ``model.transformer`` (the Flow-GRPO policy: LoRA- or
            DeepSpeed-wrapped, with grad, or with adapters disabled for the KL reference).
        source_size: ``(height, width)`` in pixels the source was encoded at (:func:`source_shape`); None = the
            output size.

    Returns:
        Velocity ``[B, N, 4C]`` (guided and norm-rescaled when ``cfg_scale > 1``), in the transformer's dtype.

    Raises:
        ValueError: ``cfg_scale > 1`` without ``neg_cond`` or ``neg_cond`` with ``cfg_scale <= 1``.
    """
    guided = cfg_scale > 1
    if guided != (neg_cond is not None):
        raise ValueError(
            f"cfg_scale={cfg_scale} with neg_cond {'missing' if guided else 'given'}: true CFG needs both "
            f"cfg_scale > 1 and a negative condition; pass neither to run unguided"
        )
    check_size(model, height, width)
    b, n = latents.shape[:2]
    sigma_t = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device).expand(b)
    hidden = torch.cat([latents, image_latents], dim=1)
    embeds, mask = cond
    if guided:
        length = max(embeds.shape[1], neg_cond[0].shape[1])
        embeds = torch.cat([_pad_to(embeds, length), _pad_to(neg_cond[0], length)])
        mask = torch.cat([_pad_to(mask, length), _pad_to(neg_cond[1], length)])
        hidden, sigma_t = torch.cat([hidden, hidden]), torch.cat([sigma_t, sigma_t])
    grid = image_shapes(model, height, width)
    source_grid = _source_grid(model, image_latents.shape[1], grid if source_size is None else
                               image_shapes(model, *source_size))
    out = mmdit_velocity(transformer if transformer is not None else model.transformer, hidden.to(model.dtype),
                         sigma_t.to(model.dtype), embeds.to(model.dtype), mask,
                         [[grid, source_grid]] * hidden.shape[0], n)
    if not guided:
        return out
    pred, neg = out[:b], out[b:]
    combined = neg + cfg_scale * (pred - neg)
    return combined * (pred.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


def mmdit_velocity(transformer: Any, hidden: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                   mask: torch.Tensor | None, img_shapes: list[list[tuple[int, int, int]]], n_target: int) -> torch.Tensor:
    """The one call of the MMDiT (sampling, Flow-GRPO and Stage 1 training): the velocity ``[B, n_target, C]`` of
    the target tokens, the first ``n_target`` of ``hidden`` (the source tokens after them only condition).

    ``img_shapes``: per sample, the latent grids of the target and (when ``hidden`` holds them) the source.
    All-valid masks are passed as None, as the pipeline does (lets attention take its unmasked fast path).
    """
    return transformer(hidden_states=hidden, timestep=sigma, encoder_hidden_states=cond,
                       encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask,
                       img_shapes=img_shapes, return_dict=False)[0][:, :n_target]


def _source_grid(model: EditingModel, source_tokens: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    # The source's latent grid as the caller declared it; a token count that does not match means mixed inputs.
    if source_tokens != grid[1] * grid[2]:
        raise ValueError(
            f"source latents have {source_tokens} tokens but the declared source size "
            f"{grid[1] * 2 * model.vae_scale_factor}x{grid[2] * 2 * model.vae_scale_factor} px has {grid[1] * grid[2]}: "
            f"encode the sources at source_shape(...) of the source_area in use and pass that size as source_size"
        )
    return grid


def initial_noise(
    model: EditingModel, batch: int, height: int, width: int, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Packed Gaussian noise drawn exactly as the pipeline draws it (so equal generators give equal noise)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (batch, 1, model.latent_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    # randn_tensor's layout is (B, 1, C, h, w); the pipeline packs it with view, as if it were (B, C, 1, h, w).
    return pack(noise.view(batch, model.latent_channels, 1, *shape[3:]))


@torch.no_grad()
def edit(
    model: EditingModel, images: Sequence[Image.Image], prompts: Sequence[str], *, height: int, width: int,
    num_steps: int, cfg_scale: float, generator: torch.Generator | list[torch.Generator] | None,
    negative_prompt: str = NEGATIVE_PROMPT, max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS,
    source_area: int = 0,
) -> list[Image.Image]:
    """Edit each source image according to its prompt (deterministic ODE sampling).

    Args:
        model: the editing model.
        images: source images (resized to the source size, ``width x height`` unless ``source_area`` says
            otherwise, as the pipeline resizes to its computed size).
        prompts: prompt strings from :func:`metacot.models.conditioning.build_prompt`.
        height: output height in pixels (a multiple of ``model.pixel_multiple``).
        width: output width in pixels.
        num_steps: denoising steps.
        cfg_scale: true CFG scale (the pipeline's ``true_cfg_scale``); 1 disables guidance.
        generator: torch generator(s) for the initial noise; same generator state = same output.
        negative_prompt: the negative prompt when guided (Qwen-Image-Edit's usual " ").
        max_text_tokens: condition text-token budget (see ``encode_conditions``).
        source_area: pixel area the source latents are encoded at (:func:`source_shape`; 0 = the output size,
            ``STOCK_SOURCE_AREA`` = the stock pipeline's one megapixel).

    Returns:
        ``width x height`` PIL images, one per prompt.
    """
    if len(images) != len(prompts):
        raise ValueError(f"edit got {len(images)} images and {len(prompts)} prompts; give one image per prompt")
    # The source as the condition encoder and the VAE see it: at the output size, or at the source area the model
    # was trained with (the stock pipeline feeds its one-megapixel source to both).
    src = source_shape(model, height, width, source_area)
    sources = resize_sources(model, images, *src)
    cond = encode_conditions(model.vlm, model.processor, sources, prompts, max_text_tokens=max_text_tokens)
    neg = None
    if cfg_scale > 1:
        negatives = [negative_prompt] * len(prompts)
        neg = encode_conditions(model.vlm, model.processor, sources, negatives, max_text_tokens=max_text_tokens)
    image_latents = encode_latents(model, sources).to(model.dtype)
    latents = initial_noise(model, len(prompts), height, width, generator)
    sigmas = sigma_schedule(model, num_steps, latents.shape[1]).to(model.device)
    for i in range(num_steps):
        v = predict_velocity(
            model, latents, image_latents, cond, sigmas[i], height=height, width=width, neg_cond=neg,
            cfg_scale=cfg_scale, source_size=src,
        )
        # Euler step in float32, as the scheduler does, then back to the model dtype.
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(model.dtype)
    return decode_latents(model, latents, height, width)
