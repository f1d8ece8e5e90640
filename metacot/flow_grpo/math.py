"""The RL math of Flow-GRPO as pure functions: advantages, the clipped policy loss, KL, window draw, EMA.

Every function takes tensors (or plain numbers) and returns new ones; nothing here knows about models, ranks,
schedulers or optimisers. Shapes are in the docstrings: N = all samples of a rollout batch (every rank's,
gathered), B = the samples of one micro-batch.

Deliberately left out: gathering across ranks (the trainer gathers rewards before ``group_advantages`` and lets
the optimiser's all-reduce handle gradients), the log-probs themselves (``metacot.flow_grpo.sde``), and the
choice of which samples go into a micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

STD_MODES = ("group", "batch")


def _check_1d(name: str, tensor: torch.Tensor, length: int | None = None) -> None:
    """A 1-D tensor (of the given length)."""
    if tensor.ndim != 1 or (length is not None and tensor.shape[0] != length):
        want = f"[{length}]" if length is not None else "[N]"
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; pass a 1-D tensor of shape {want}.")


def _check_advantage_args(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_mode: str, eps: float, clip: float
) -> None:
    """Refuse inputs group_advantages cannot honour, with what to change."""
    _check_1d("rewards", rewards)
    _check_1d("group_ids", group_ids, rewards.shape[0])
    if rewards.shape[0] == 0:
        raise ValueError("rewards is empty; a rollout batch needs at least one sample.")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards has dtype {rewards.dtype}; pass floats with NaN for unscored samples.")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids has dtype {group_ids.dtype}; pass integer ids (torch.long), one per sample.")
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards contains +-inf; a reward must be finite, or NaN for 'no score'.")
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode={std_mode!r} is unknown; use one of {STD_MODES}.")
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0: it keeps the division finite for near-equal rewards.")
    if not clip > 0:
        raise ValueError(f"clip={clip} must be > 0 (advantages are clipped to [-clip, clip]).")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """GRPO advantages: each reward minus its group's mean, over a group or batch std, clipped.

    Callers gather rewards and group ids from all ranks first (a group's samples may sit on several ranks) and
    call this once on the whole rollout batch; every rank then gets identical advantages.

    Args:
        rewards: [N] float; NaN marks a sample without a score (a judge that failed), which drops out of its
            group's mean and std and gets advantage 0.
        group_ids: [N] integer; samples with the same id share a prompt (any ids, not necessarily 0..G-1).
        std_mode: "group": divide by the group's std; "batch": by the std of all scored rewards of the batch.
            Both are population stds (ddof = 0).
        eps: added to the std before dividing.
        clip: advantages are clipped to [-clip, clip].

    Returns:
        (advantages, stats). advantages: [N], rewards' dtype; 0 for unscored samples and for every sample of a
        zero-spread group (fewer than 2 scored samples, or all scored rewards equal: no signal).
        stats: n_groups, zero_spread_groups, zero_spread_share (zero_spread_groups / n_groups), n_scored.

    Raises:
        ValueError / TypeError: shapes, dtypes, infinite rewards or settings out of range.
    """
    _check_advantage_args(rewards, group_ids, std_mode, eps, clip)
    # Statistics in float64: the batch is small and a reward spread of 1e-6 must not round to zero.
    scored = ~torch.isnan(rewards)
    values = torch.where(scored, rewards, 0).to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    zeros = values.new_zeros(n_groups)
    count = zeros.index_add(0, inverse, scored.to(torch.float64))
    mean = zeros.index_add(0, inverse, values) / count.clamp(min=1)
    deviation = torch.where(scored, values - mean[inverse], 0)
    if std_mode == "group":
        std = (zeros.index_add(0, inverse, deviation**2) / count.clamp(min=1)).sqrt()[inverse]
    else:
        scored_values = values[scored]
        std = scored_values.std(correction=0) if scored_values.numel() > 0 else values.new_zeros(())
    big = torch.finfo(torch.float64).max
    highest = torch.full_like(zeros, -big).scatter_reduce(0, inverse, torch.where(scored, values, -big), "amax")
    lowest = torch.full_like(zeros, big).scatter_reduce(0, inverse, torch.where(scored, values, big), "amin")
    zero_spread = (count < 2) | (highest == lowest)
    advantages = (deviation / (std + eps)).clamp(-clip, clip)
    advantages = torch.where(zero_spread[inverse] | ~scored, 0, advantages)
    n_zero = int(zero_spread.sum())
    stats = {
        "n_groups": n_groups,
        "zero_spread_groups": n_zero,
        "zero_spread_share": n_zero / n_groups,
        "n_scored": int(scored.sum()),
    }
    return advantages.to(rewards.dtype), stats


def grpo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped policy loss on per-sample log-probs of one trained denoising step.

    ratio = exp(logp_new - logp_old); loss = mean(max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))).
    logp_old and advantages are detached: gradients reach the policy through logp_new only.

    Args:
        logp_new: [B] log-probs of the stored latents under the current policy (with grad).
        logp_old: [B] the same log-probs recorded at rollout time.
        advantages: [B] from ``group_advantages``.
        clip_low: lower clip range, in (0, 1).
        clip_high: upper clip range (> 0); None = clip_low (symmetric).

    Returns:
        (loss, stats). loss: scalar. stats (detached scalar tensors, so logging needs no device sync per step):
        clipfrac: share of samples whose ratio lies outside [1 - clip_low, 1 + clip_high] (the reference's
        definition, whether or not clipping changed that sample's gradient); ratio_mean; approx_kl:
        mean(0.5 (logp_new - logp_old)^2), the k2 estimator of KL(old || new) the reference logs (non-negative,
        second-order accurate for small policy changes).

    Raises:
        ValueError: shapes differ or clip ranges are out of range.
    """
    _check_1d("logp_new", logp_new)
    _check_1d("logp_old", logp_old, logp_new.shape[0])
    _check_1d("advantages", advantages, logp_new.shape[0])
    clip_high = clip_low if clip_high is None else clip_high
    if not 0 < clip_low < 1:
        raise ValueError(f"clip_low={clip_low} must lie in (0, 1): the ratio's lower bound is 1 - clip_low.")
    if not clip_high > 0:
        raise ValueError(f"clip_high={clip_high} must be > 0 (or None for a symmetric clip).")
    log_ratio = logp_new - logp_old.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        outside = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
        stats = {
            "clipfrac": outside.to(ratio.dtype).mean(),
            "ratio_mean": ratio.mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


def kl_to_reference(mean_theta: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between the policy's and the reference's Gaussian steps, averaged over the non-batch dimensions.

    Both steps share the same std (it depends only on the schedule and the noise level), so the exact KL of
    N(mean_theta, std^2) to N(mean_ref, std^2) per element is (mean_theta - mean_ref)^2 / (2 std^2).

    Args:
        mean_theta: [B, ...] the policy's step mean (with grad).
        mean_ref: [B, ...] the reference policy's mean (detached here; with LoRA, the same network with the
            adapters disabled).
        std: broadcastable to [B, ...], e.g. the [B, 1, ..., 1] std of ``sde_step_with_logprob``.

    Returns:
        [B] per-sample KL averaged over the non-batch dimensions.

    Raises:
        ValueError: the means' shapes differ or have no non-batch dimension.
    """
    if mean_theta.shape != mean_ref.shape or mean_theta.ndim < 2:
        raise ValueError(
            f"mean_theta {tuple(mean_theta.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same "
            "[B, ...] shape with at least one non-batch dimension."
        )
    per_element = (mean_theta - mean_ref.detach()) ** 2 / (2 * std**2)
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.")


def draw_window(num_steps: int, window_size: int, window_max: int, seed: int, iteration: int) -> list[int]:
    """A contiguous window of denoising-step indices to run as SDE and train on, drawn per iteration.

    Step 0 is the first denoising step (sigma = 1, the highest noise). The window starts uniformly in
    [0, window_max - window_size], so it lies inside the first ``window_max`` steps. The draw depends only on
    (seed, iteration): every rank calls it with the same arguments and gets the same window (no per-rank or
    process state), and the window changes from iteration to iteration. window_size == window_max == num_steps
    gives every step (plain Flow-GRPO).

    Args:
        num_steps: denoising steps of a rollout (>= 1).
        window_size: steps in the window (1 <= window_size <= window_max).
        window_max: the window stays within steps [0, window_max) (window_max <= num_steps).
        seed: the run's seed (>= 0).
        iteration: the rollout iteration (>= 0).

    Returns:
        window_size consecutive step indices, ascending.

    Raises:
        ValueError: a non-integer or out-of-range argument.
    """
    _check_int("num_steps", num_steps, 1)
    _check_int("window_size", window_size, 1)
    _check_int("seed", seed, 0)
    _check_int("iteration", iteration, 0)
    _check_int("window_max", window_max, 1)
    if window_size > window_max:
        raise ValueError(f"window_size={window_size} exceeds window_max={window_max}; the window must fit.")
    if window_max > num_steps:
        raise ValueError(
            f"window_max={window_max} exceeds num_steps={num_steps}; the window must lie within the schedule."
        )
    # numpy's SeedSequence mixes (seed, iteration) into an independent stream: identical on every rank and
    # process (unlike Python's hash()), and unrelated across neighbouring iterations.
    rng = np.random.default_rng([int(seed), int(iteration)])
    start = int(rng.integers(0, window_max - window_size + 1))
    return list(range(start, start + window_size))


def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """In place: ema = decay * ema + (1 - decay) * param, for matching lists of tensors.

    Args:
        ema_params: the EMA copies (updated in place; may be float32 copies of bf16 parameters).
        params: the live parameters, in the same order and shapes.
        decay: in [0, 1]; 0 copies the parameters, 1 keeps the EMA unchanged.

    Raises:
        ValueError: decay out of range, or the lists differ in length or shapes.
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"decay={decay} must lie in [0, 1].")
    ema_list, param_list = list(ema_params), list(params)
    if len(ema_list) != len(param_list):
        raise ValueError(f"{len(ema_list)} EMA tensors for {len(param_list)} parameters; build the EMA from them.")
    with torch.no_grad():
        for i, (ema, param) in enumerate(zip(ema_list, param_list)):
            if ema.shape != param.shape:
                raise ValueError(f"EMA tensor {i} has shape {tuple(ema.shape)}, parameter {tuple(param.shape)}.")
            ema.lerp_(param.detach().to(device=ema.device, dtype=ema.dtype), 1 - decay)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (all elements, or along ``dim``).

    An empty selection gives 0, not NaN, so a micro-batch whose samples all carry no signal adds a zero loss.

    Args:
        values: any shape.
        mask: bool, broadcastable to values.
        dim: reduce this dimension only; None reduces everything to a scalar.

    Returns:
        The masked mean: scalar, or values' shape without ``dim``.

    Raises:
        TypeError: mask is not boolean.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask has dtype {mask.dtype}; pass a bool tensor (True = include).")
    mask = mask.expand(values.shape)
    kept = torch.where(mask, values, 0)  # where, not multiply: a NaN outside the mask must not leak in
    count = mask.to(values.dtype)
    if dim is None:
        return kept.sum() / count.sum().clamp(min=1)
    return kept.sum(dim) / count.sum(dim).clamp(min=1)
