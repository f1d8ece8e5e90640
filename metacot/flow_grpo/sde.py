"""One stochastic denoising step of a flow-matching model, with the exact log-density of its output.

Conventions (diffusers' QwenImage / SD3 / Flux flow matching): x_sigma = (1 - sigma) x0 + sigma noise, sigma runs
from 1 (pure noise) to 0 (data), the model predicts the velocity v ~ noise - x0, and a step goes from sigma to
sigma_next < sigma, so dt = sigma_next - sigma < 0. The plain Euler ODE step is x + dt v.

Flow-GRPO turns that ODE step into a Gaussian policy step x_next ~ N(mean(x, v), std^2) and trains on log-probs of
the sampled x_next. Two variants:

* ``"sde"`` (Flow-GRPO): the reverse-time SDE that has the same marginals as the ODE, discretised with Euler-
  Maruyama. std_dev = a sqrt(sigma / (1 - sigma)) with a = ``noise_level``;
  mean = x (1 + std_dev^2 dt / (2 sigma)) + v (1 + std_dev^2 (1 - sigma) / (2 sigma)) dt; std = std_dev sqrt(-dt).
  At sigma = 1 the factor sigma / (1 - sigma) is infinite. Like the reference implementation we evaluate that one
  denominator at the step's end point instead, 1 - sigma_next (> 0 because sigma_next < sigma = 1). Schedulers
  emit exactly 1.0 for the first sigma (diffusers' shifted schedules map 1 to 1), so an exact comparison suffices;
  a sigma a rounding error below 1 would give a huge but finite std, as it does in the reference.
* ``"cps"`` (coefficients-preserving sampling): predict x0_hat = x - sigma v and noise_hat = x + (1 - sigma) v,
  and re-noise to sigma_next with a fresh-noise share s = sigma_next sin(a pi / 2):
  mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) noise_hat, std = s. The total noise coefficient
  stays sigma_next, so the latent keeps the scheduler's signal-to-noise ratio. ``noise_level`` must lie in
  [0, 1] (a = 1 draws all of sigma_next's noise fresh; above 1 the angle folds back and a = 2 is deterministic).
  At sigma_next = 0 the step is deterministic (std = 0) and has no density: we refuse to score it with noise
  instead of returning a meaningless number; run that step as an ODE step (noise_level = 0).

With ``noise_level == 0`` both variants reduce to the Euler step x + dt v (no noise, no log-prob).

log_prob is the TRUE Gaussian log-density, all constants included, averaged (not summed) over the non-batch
dimensions, as the reference averages: -(x_next - mean)^2 / (2 std^2) - log std - log sqrt(2 pi). The average
keeps the log-ratio's scale independent of the latent size, which is what the PPO clip range is sized for.

Deliberately left out: the scheduler itself (callers pass sigmas), classifier-free guidance (callers combine the
velocities before the step), and any casting back to the model's dtype: outputs stay float32 (float64 for
float64 inputs), so that a stored latent scores to the same log-prob later. Store latents in float32.
"""

from __future__ import annotations

import math

import torch

SDE_TYPES = ("sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# PPO clip ranges for the importance ratio exp(logp_new - logp_old), per variant.
# "sde": the reference's 1e-4, already sized for the true averaged Gaussian log-density we use.
# "cps": the reference scores cps with -(x_next - mean)^2 (no 1/(2 s^2), no constants) and clips at 1e-5. Our
#   true density's log-ratio is that reference log-ratio times 1/(2 s^2) (log s and constants cancel in the ratio,
#   s does not depend on the policy), so the equivalent clip range is 1e-5 / (2 s^2), which depends on the step.
#   s = sigma_next sin(a pi / 2) <= 1, so 1e-5 / (2 * 1^2) = 5e-6 is the reference's bound at the largest
#   possible s. Per element, a policy mean shift d moves our log-ratio by eps d / s - d^2 / (2 s^2) (eps the
#   sampled standard normal) and the reference's by 2 s eps d - d^2, so at a step with std s our 5e-6 admits
#   mean shifts s^2 times the reference's: never looser, and 0.55-0.95 of it on the high-noise steps Meta-CoT
#   trains (first half of a shift-3 10-step schedule: sigma_next of about 0.75-0.97, s = sigma_next at a = 1).
_DEFAULT_CLIP_RANGE = {"sde": 1e-4, "cps": 5e-6}


def default_clip_range(sde_type: str) -> float:
    """The default PPO clip range for the ratio of true-density log-probs of one variant.

    Args:
        sde_type: "sde" or "cps".

    Returns:
        1e-4 for "sde" (the reference value); 5e-6 for "cps" (the reference's 1e-5 rescaled by 1 / (2 s^2) at
        s = 1, the largest fresh-noise std; see the comment on ``_DEFAULT_CLIP_RANGE`` for the derivation).

    Raises:
        ValueError: for an unknown variant.
    """
    if sde_type not in _DEFAULT_CLIP_RANGE:
        raise ValueError(f"sde_type={sde_type!r} is unknown; use one of {SDE_TYPES}.")
    return _DEFAULT_CLIP_RANGE[sde_type]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 model outputs are upcast for the step)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _as_sigma(
    value: float | torch.Tensor, name: str, like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A float or [B] sigma as a [B, 1, ..., 1] tensor broadcastable against ``like`` ([B, ...])."""
    batch = like.shape[0]
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; pass a float or a [B] tensor with B={batch} "
                "(one sigma per sample)."
            )
        out = value.to(device=like.device, dtype=dtype)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = torch.full((batch,), float(value), device=like.device, dtype=dtype)
    else:
        raise TypeError(f"{name} is a {type(value).__name__}; pass a float or a [B] tensor.")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains a non-finite value: {out.tolist()}.")
    return out.view(batch, *([1] * (like.ndim - 1)))


def _check_inputs(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None,
    noise_level: float,
    sde_type: str,
) -> None:
    """Refuse shapes, dtypes and settings the step cannot honour, with what to change."""
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={sde_type!r} is unknown; use one of {SDE_TYPES}.")
    if sample.ndim < 2:
        raise ValueError(
            f"sample has shape {tuple(sample.shape)}; pass a batch [B, ...] with at least one non-batch dimension "
            "(log_prob is averaged over the non-batch dimensions)."
        )
    for name, tensor in (("model_output", model_output), ("sample", sample), ("prev_sample", prev_sample)):
        if tensor is None:
            continue
        if tensor.shape != sample.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but sample has {tuple(sample.shape)}.")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} has dtype {tensor.dtype}; pass a floating-point tensor.")
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level={noise_level} must be a finite number >= 0 (0 = deterministic ODE step).")
    if sde_type == "cps" and noise_level > 1:
        raise ValueError(
            f"noise_level={noise_level} with sde_type='cps': use a value in [0, 1], the share of the next noise "
            "level drawn fresh (s = sigma_next * sin(noise_level * pi / 2) folds back above 1)."
        )
    if prev_sample is not None and noise_level == 0:
        raise ValueError(
            "prev_sample was given with noise_level=0: a deterministic ODE step has no log-density to score; "
            "pass the noise level the sample was drawn with, or drop prev_sample."
        )


def _check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    """0 <= sigma_next < sigma <= 1 per sample (denoising runs from noise at 1 to data at 0)."""
    bad = (sigma_next >= sigma) | (sigma_next < 0) | (sigma > 1)
    if bool(bad.any()):
        pairs = list(zip(sigma.flatten()[bad.flatten()].tolist(), sigma_next.flatten()[bad.flatten()].tolist()))
        raise ValueError(
            f"invalid (sigma, sigma_next) pairs {pairs[:4]}: a denoising step needs 0 <= sigma_next < sigma <= 1 "
            "(sigma = 1 is pure noise); pass the current sigma first and the next, smaller one second."
        )


def _sde_mean_std(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-Maruyama step of the marginal-preserving reverse SDE; std has shape [B, 1, ..., 1]."""
    dt = sigma_next - sigma
    # At sigma = 1 the diffusion coefficient's 1 - sigma is 0: use 1 - sigma_next there (module docstring).
    denominator = torch.where(sigma < 1, 1 - sigma, 1 - sigma_next)
    std_dev = noise_level * torch.sqrt(sigma / denominator)
    var_dev = std_dev**2
    mean = x * (1 + var_dev * dt / (2 * sigma)) + v * (1 + var_dev * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev * torch.sqrt(-dt)


def _cps_mean_std(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients-preserving step: re-noise the predicted x0 to sigma_next with a share of fresh noise."""
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    if bool((std == 0).any()):
        raise ValueError(
            "sde_type='cps' with sigma_next=0 is deterministic (std = sigma_next * sin(a*pi/2) = 0) and has no "
            "log-density; run the last step as an ODE step (noise_level=0) and keep it out of the trained window."
        )
    x0_hat = x - sigma * v
    noise_hat = x + (1 - sigma) * v
    # clamp: sigma_next^2 - s^2 = sigma_next^2 cos^2(a pi/2) >= 0, but rounding can dip a hair below 0 at a = 1.
    noise_coef = torch.sqrt(torch.clamp(sigma_next**2 - std**2, min=0))
    return (1 - sigma_next) * x0_hat + noise_coef * noise_hat, std


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Exact log N(value; mean, std^2) per element, averaged over the non-batch dimensions.

    Args:
        value: [B, ...] the scored sample (treated as data: detach it if it carries a graph you do not want).
        mean: [B, ...] the Gaussian's mean.
        std: broadcastable to [B, ...] (e.g. [B, 1, ..., 1]), all > 0.

    Returns:
        [B] mean over the non-batch dimensions of -(value - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi)).
    """
    per_element = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return per_element.mean(dim=tuple(range(1, value.ndim)))


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sde_type: str = "sde",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One denoising step from sigma to sigma_next, sampled or scored, with the log-density of its output.

    Args:
        model_output: [B, ...] predicted velocity v (noise - x0) at ``sample``; any float dtype.
        sample: [B, ...] the latent x at ``sigma``.
        sigma: float or [B] tensor, the current noise level, in (0, 1].
        sigma_next: float or [B] tensor, the next noise level, in [0, sigma).
        noise_level: the policy's noise scale a (>= 0; <= 1 for "cps"); 0 gives the Euler ODE step.
        prev_sample: [B, ...] a latent at sigma_next to score instead of sampling one (e.g. the rollout's stored
            latent when recomputing log-probs under the current policy).
        generator: source of the Gaussian noise when sampling; must live on ``sample``'s device.
        sde_type: "sde" (Flow-GRPO) or "cps" (coefficients-preserving); see the module docstring.
        noise: [B, ...] the standard Gaussian draw to sample with instead of one from ``generator`` (the rollout
            draws it per group, so a sample's noise does not depend on how samples are split into ranks or batches).

    Returns:
        (prev_sample, log_prob, mean, std), all in float32 (float64 if an input is float64):
        prev_sample: [B, ...] the sampled latent (mean + std * noise, reparameterised: gradients flow through the
            mean), or the given one. log_prob: [B] its Gaussian log-density averaged over the non-batch
            dimensions, computed with prev_sample detached so gradients reach the policy through the mean only;
            None when noise_level is 0. mean: [B, ...] the Gaussian's mean (the Euler step when noise_level is 0).
            std: [B, 1, ..., 1] (same ndim as sample, broadcastable against it) the standard deviation of
            prev_sample given sample; None when noise_level is 0.

    Raises:
        ValueError: shapes disagree, sigmas are out of order or range, noise_level is out of range, prev_sample
            is given for a deterministic step, or a cps step to sigma_next = 0 would need a density.
        TypeError: non-float tensors or a sigma of the wrong type.
    """
    _check_inputs(model_output, sample, prev_sample, noise_level, sde_type)
    dtype = _compute_dtype(model_output, sample, prev_sample)
    x = sample.to(dtype)
    v = model_output.to(dtype)
    sigma_t = _as_sigma(sigma, "sigma", x, dtype)
    sigma_next_t = _as_sigma(sigma_next, "sigma_next", x, dtype)
    _check_sigmas(sigma_t, sigma_next_t)

    if noise_level == 0:
        euler = x + (sigma_next_t - sigma_t) * v
        return euler, None, euler, None

    step = _sde_mean_std if sde_type == "sde" else _cps_mean_std
    mean, std = step(x, v, sigma_t, sigma_next_t, noise_level)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        elif noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the sample {tuple(x.shape)}")
        prev_sample = mean + std * noise.to(x.device, dtype)
    else:
        prev_sample = prev_sample.to(dtype)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return prev_sample, log_prob, mean, std
