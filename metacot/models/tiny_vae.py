"""Train the tiny ``AutoencoderKLQwenImage`` briefly on synthetic scenes, so that tiny edits are images, not noise.

A random VAE does not reconstruct, and then every image-space reward or metric on the tiny model measures noise. So
the tiny builder trains it for about a minute on 2 CPU cores on scenes from ``data_recipes.synth`` and reports its
reconstruction error on held-out scenes (``vae_report.json``). Three things make that minute enough:

- One torch thread (:func:`one_thread`): deterministic across core counts, and far faster on a busy shared CPU.
- Single-frame convolutions: the QwenImage VAE is a causal 3D-conv video VAE; for one frame with causal zero padding
  only the last temporal slice of each kernel touches data. :func:`single_frame` computes exactly that as a 2D
  convolution (same weights, about 3x less compute); the result equals the stock ``encode``/``decode``.
- Residual branches start at zero (last conv of every residual block and the attention output projection), so the
  untrained network is a shallow path from pixels to latents and back; it leaves the plateau of predicting the mean
  colour much sooner.
- A deterministic autoencoder objective (MSE + 0.1 L1 on the latent mode, no KL): the edit pipeline only ever uses
  the latent mode (its ``sample_mode="argmax"``), so sampling noise would only slow training down.

Afterwards the per-channel mean and std of the training latents are written into the VAE config (``latents_mean`` /
``latents_std``), as the real VAE has them, so the flow model sees roughly unit-variance latents.

Left out: perceptual/adversarial losses and video frames (the edit pipeline encodes single images).
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Tiny VAE architecture: 16 latent channels like the real one, but 4x (not 8x) downsampling so 32 px scenes keep an
# 8x8 latent grid (4x4 tokens after 2x2 packing).
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "temperal_downsample": [False, True],
}
DEFAULT_STEPS = 800
BATCH_SIZE = 16
LEARNING_RATE = 2e-3
TRAIN_SCENES = 512
HELDOUT_SCENES = 64
HELDOUT_SEED_OFFSET = 1_000_003  # held-out scenes come from a different seed than the training scenes


def make_tiny_vae(seed: int = 0) -> Any:
    """A random tiny ``AutoencoderKLQwenImage`` with zero-initialised residual branches (see module docstring)."""
    from diffusers import AutoencoderKLQwenImage

    z_dim = VAE_CONFIG["z_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(**VAE_CONFIG, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    for name, module in vae.named_modules():
        if name.endswith((".conv2", ".proj")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return vae


def _single_frame_forward(self: Any, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    if cache_x is not None or x.shape[2] != 1 or self._padding[4] != self.kernel_size[0] - 1 or self.stride[0] != 1:
        raise RuntimeError("single_frame() only supports one-frame inputs through causal, temporally unstrided convs")
    out = F.conv2d(
        x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:],
        padding=(self._padding[2], self._padding[0]),
    )
    return out.unsqueeze(2)


@contextlib.contextmanager
def single_frame(vae: Any) -> Iterator[None]:
    """Within the block, the VAE's causal 3D convs run as 2D convs on one frame (same result, ~3x faster)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
        QwenImageCausalConv3d,
    )

    convs = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d)]
    for conv in convs:
        conv.forward = types.MethodType(_single_frame_forward, conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored afterwards).

    Why: the result then does not depend on the machine's core count (reduction order), so a seed gives the same
    VAE everywhere; and on a shared 2-core machine two OpenMP threads contending with other processes were measured
    10x slower than one thread (1.4 s vs 0.14 s per step).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> ``[N, 3, 1, H, W]`` float32 in [-1, 1] (the VAE's single-frame video layout)."""
    array = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return (torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0).unsqueeze(2)


def _latent_mode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    return vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)[0]


def reconstruction_error(vae: Any, images: Sequence[Image.Image]) -> dict[str, float]:
    """MSE (pixels in [0, 1]) and PSNR of encode -> latent mode -> decode, through the stock VAE API.

    Returns:
        ``{"mse": ..., "psnr_db": ..., "mean_colour_mse": ...}``; the last is the error of predicting every pixel as its
        image's mean colour, the trivial baseline a useful VAE must beat by far.
    """
    pixels = to_tensor(images)
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    mse = float(((recon - pixels) / 2).pow(2).mean())
    baseline = float(((pixels - pixels.mean(dim=(3, 4), keepdim=True)) / 2).pow(2).mean())
    return {"mse": mse, "psnr_db": 10 * math.log10(1 / mse), "mean_colour_mse": baseline}


def train_tiny_vae(resolution: int = 32, seed: int = 0, steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Build and train the tiny VAE on synthetic scenes; set its latent statistics; measure held-out error.

    Args:
        resolution: scene side in pixels.
        seed: seeds the initialisation, the training scenes and the batch order (held-out scenes use
            ``seed + HELDOUT_SEED_OFFSET``).
        steps: optimisation steps (default :data:`DEFAULT_STEPS`).

    Returns:
        ``(vae, report)``: the trained VAE in eval mode, and the facts for ``vae_report.json`` (held-out MSE/PSNR,
        the mean-colour baseline, steps, seconds, latent statistics).
    """
    from metacot.scenes import sample_scene_images

    steps = DEFAULT_STEPS if steps is None else steps
    vae = make_tiny_vae(seed)
    train = to_tensor(sample_scene_images(TRAIN_SCENES, resolution, seed))
    heldout = sample_scene_images(HELDOUT_SCENES, resolution, seed + HELDOUT_SEED_OFFSET)
    optimizer = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE)
    # 50 warm-up steps, then cosine decay to zero: higher constant rates stall this architecture at the mean colour.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    vae.train()
    with single_frame(vae), one_thread():
        for _ in range(steps):
            batch = train[torch.randint(0, len(train), (BATCH_SIZE,), generator=order)]
            recon = vae.decoder(vae.post_quant_conv(_latent_mode(vae, batch)))
            loss = F.mse_loss(recon, batch) + 0.1 * F.l1_loss(recon, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    vae.eval()
    seconds = time.perf_counter() - start
    with torch.no_grad(), single_frame(vae), one_thread():
        latents = torch.cat([_latent_mode(vae, chunk) for chunk in train.split(128)])
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(
        latents_mean=[round(float(x), 6) for x in mean], latents_std=[round(float(x), 6) for x in std]
    )
    with one_thread():
        error = reconstruction_error(vae, heldout)
    report = {
        "resolution": resolution, "seed": seed, "steps": steps, "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "train_scenes": TRAIN_SCENES, "heldout_scenes": HELDOUT_SCENES, "train_seconds": round(seconds, 2),
        "heldout_mse": round(error["mse"], 6),
        "heldout_psnr_db": round(error["psnr_db"], 2), "mean_colour_baseline_mse": round(error["mean_colour_mse"], 6),
        "latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std, "config": VAE_CONFIG,
    }
    return vae, report
