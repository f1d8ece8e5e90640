"""Rollouts for Flow-GRPO: the flow sampler with an SDE window, storing only what training needs.

Inside the iteration's window (a few consecutive early, high-noise steps) each step is the stochastic
``sde_step_with_logprob``; elsewhere it is the deterministic Euler (ODE) step. Only window steps store their
input latents, output latents and log-probs: the log-prob bookkeeping costs nothing outside the window.
A window covering every step is plain Flow-GRPO through the same code path.

The velocity comes from ``metacot.models.sampler.predict_velocity`` with true CFG: conditional and negative branches
of the whole batch run in one batched forward, identically in rollout and training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from metacot.flow_grpo.sde import sde_step_with_logprob
from metacot.models.sampler import decode_latents, predict_velocity


@dataclass
class Conditions:
    """Per-sample conditions of a rollout batch (already repeated per group member).

    ``embeds``/``mask`` [B, L, D]/[B, L]: the prompt; ``neg_embeds``/``neg_mask``: CFG's negative branch (or None);
    ``image_latents`` [B, N_ctx, C]: the source image's packed latents (edit context), encoded at
    ``source_size`` (height, width in pixels; None = the output size).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None
    neg_embeds: torch.Tensor | None
    neg_mask: torch.Tensor | None
    image_latents: torch.Tensor
    source_size: tuple[int, int] | None = None

    def select(self, idx: torch.Tensor) -> "Conditions":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Conditions(self.embeds[idx], pick(self.mask), pick(self.neg_embeds), pick(self.neg_mask),
                          self.image_latents[idx], self.source_size)


@dataclass
class Trajectory:
    """What training needs from a rollout batch, for the W window steps.

    Attributes:
        latents: [W, B, N, C] x at the start of each window step.
        next_latents: [W, B, N, C] the sampled x after it.
        log_probs: [W, B] log-probs of ``next_latents`` under the rollout policy.
        final: [B, N, C] the final latents (decoded to images for the reward).
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    final: torch.Tensor


def velocity(model: Any, transformer: Any, x: torch.Tensor, cond: Conditions, sigma: float, cfg_scale: float,
             size: int) -> torch.Tensor:
    """CFG velocity of the policy ``transformer`` at noise level ``sigma`` for latents ``x`` [B, N, C] of
    ``size x size`` images."""
    return predict_velocity(model, x, cond.image_latents, (cond.embeds, cond.mask), sigma, height=size, width=size,
                            neg_cond=None if cond.neg_embeds is None else (cond.neg_embeds, cond.neg_mask),
                            cfg_scale=cfg_scale, transformer=transformer, source_size=cond.source_size)


@torch.no_grad()
def sample_with_window(model: Any, transformer: Any, x: torch.Tensor, cond: Conditions, sigmas: Sequence[float],
                       window: Sequence[int], *, size: int, cfg_scale: float, noise_level: float, sde_type: str,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Trajectory:
    """Denoise ``x`` [B, N, C] from ``sigmas[0]`` to ``sigmas[-1]`` with SDE steps at ``window`` indices.

    Args:
        sigmas: the schedule, ``len = num_steps + 1``, decreasing to 0.
        window: step indices (0-based) that run the SDE and are stored.
        generator: draws the SDE steps' noise, unless ``noise`` [len(window), B, N, C] gives it (one draw per window
            step, in window order).
    """
    # Latents stay float32 all along (only the model input is cast to its dtype inside predict_velocity):
    # scoring a bf16-rounded latent moves the log-prob by more than the cps clip range.
    x = x.float()
    stored_x, stored_next, stored_lp = [], [], []
    slot = {step: j for j, step in enumerate(window)}
    for i in range(len(sigmas) - 1):
        v = velocity(model, transformer, x, cond, float(sigmas[i]), cfg_scale, size)
        if i in slot:
            x_next, log_prob, _, _ = sde_step_with_logprob(v, x, float(sigmas[i]), float(sigmas[i + 1]),
                                                           noise_level, generator=generator, sde_type=sde_type,
                                                           noise=None if noise is None else noise[slot[i]])
            stored_x.append(x)
            stored_next.append(x_next)
            stored_lp.append(log_prob)
            x = x_next
        else:
            x, _, _, _ = sde_step_with_logprob(v, x, float(sigmas[i]), float(sigmas[i + 1]), 0.0)
    if not stored_x:  # an all-ODE pass (evaluation): nothing to train on
        empty = x.new_empty((0, *x.shape))
        return Trajectory(empty, empty, x.new_empty((0, x.shape[0])), x)
    return Trajectory(torch.stack(stored_x), torch.stack(stored_next), torch.stack(stored_lp), x)


def score_step(model: Any, transformer: Any, x: torch.Tensor, x_next: torch.Tensor, cond: Conditions,
               sigma: float, sigma_next: float, *, size: int, cfg_scale: float, noise_level: float,
               sde_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob [B] of the stored transition ``x -> x_next`` under ``transformer``, with the SDE mean and std.

    Differentiable with respect to the transformer's trainable weights (the training forward).
    """
    v = velocity(model, transformer, x, cond, sigma, cfg_scale, size)
    _, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, prev_sample=x_next,
                                                   sde_type=sde_type)
    return log_prob, mean, std


def decode(model: Any, latents: torch.Tensor, height: int, width: int) -> list[Any]:
    """Final latents -> PIL images (no grad)."""
    with torch.no_grad():
        return decode_latents(model, latents, height, width)
