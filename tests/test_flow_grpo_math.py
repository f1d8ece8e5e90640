"""Float64 reference tests for the Flow-GRPO step (metacot.flow_grpo.sde) and RL math (metacot.flow_grpo.math).

The references are written out here per sample with Python floats, independent of the vectorised code.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from metacot.flow_grpo.math import (
    draw_window,
    ema_update,
    grpo_policy_loss,
    group_advantages,
    kl_to_reference,
    masked_mean,
)
from metacot.flow_grpo.sde import default_clip_range, sde_step_with_logprob

F64 = torch.float64


def ref_mean_std(x: torch.Tensor, v: torch.Tensor, sig: float, sig_next: float, a: float, kind: str):
    """One sample's step mean and std, from the formulas in shared/notes/flow-grpo.md."""
    if kind == "sde":
        denominator = 1 - sig if sig < 1 else 1 - sig_next  # documented choice at sigma = 1
        g = a * math.sqrt(sig / denominator)
        dt = sig_next - sig
        mean = x * (1 + g * g * dt / (2 * sig)) + v * (1 + g * g * (1 - sig) / (2 * sig)) * dt
        return mean, g * math.sqrt(-dt)
    s = sig_next * math.sin(a * math.pi / 2)
    mean = (1 - sig_next) * (x - sig * v) + math.sqrt(sig_next**2 - s**2) * (x + (1 - sig) * v)
    return mean, s


def ref_log_prob(y: torch.Tensor, mean: torch.Tensor, s: float) -> float:
    """Average over elements of the Gaussian log-density log N(y; mean, s^2)."""
    values = [
        -0.5 * ((yi - mi) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
        for yi, mi in zip(y.flatten().tolist(), mean.flatten().tolist())
    ]
    return sum(values) / len(values)


def batch(b: int = 3, shape: tuple[int, ...] = (4, 5), seed: int = 0, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(b, *shape, generator=gen, dtype=F64).to(dtype)
    return x, v


SIGMAS = {"sde": ([1.0, 0.7, 0.3], [0.9, 0.5, 0.0]), "cps": ([1.0, 0.7, 0.3], [0.9, 0.5, 0.1])}


# --------------------------------------------------------------------------------------------- sde step


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("sde", 1.3), ("cps", 0.8), ("cps", 1.0)])
@pytest.mark.parametrize("given", [True, False])
def test_log_prob_is_the_analytic_gaussian_density(kind: str, a: float, given: bool) -> None:
    x, v = batch()
    sig, sig_next = SIGMAS[kind]
    y_given = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64) if given else None
    y, log_prob, mean, std = sde_step_with_logprob(
        v, x, torch.tensor(sig, dtype=F64), torch.tensor(sig_next, dtype=F64), a, prev_sample=y_given,
        generator=torch.Generator().manual_seed(2), sde_type=kind,
    )
    assert log_prob.shape == (3,) and std.shape == (3, 1, 1) and mean.shape == x.shape
    for i in range(3):
        ref_mean, ref_std = ref_mean_std(x[i], v[i], sig[i], sig_next[i], a, kind)
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-12, atol=1e-12)
        assert std[i].item() == pytest.approx(ref_std, rel=1e-12)
        assert log_prob[i].item() == pytest.approx(ref_log_prob(y[i], ref_mean, ref_std), rel=1e-10)
    if given:
        assert torch.equal(y, y_given)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_is_the_euler_step(kind: str) -> None:
    x, v = batch()
    sig, sig_next = torch.tensor([1.0, 0.7, 0.3], dtype=F64), torch.tensor([0.9, 0.5, 0.0], dtype=F64)
    y, log_prob, mean, std = sde_step_with_logprob(v, x, sig, sig_next, 0.0, sde_type=kind)
    expected = torch.stack([x[i] + (sig_next[i].item() - sig[i].item()) * v[i] for i in range(3)])
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(mean, expected, rtol=1e-14, atol=1e-14)
    assert log_prob is None and std is None


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sampling_then_scoring_gives_the_same_log_prob(kind: str) -> None:
    x, v = batch(dtype=torch.float32)
    sig, sig_next = torch.tensor(SIGMAS[kind][0]), torch.tensor(SIGMAS[kind][1])
    y, logp_sampled, _, _ = sde_step_with_logprob(
        v, x, sig, sig_next, 0.9, generator=torch.Generator().manual_seed(3), sde_type=kind
    )
    _, logp_scored, _, _ = sde_step_with_logprob(v, x, sig, sig_next, 0.9, prev_sample=y, sde_type=kind)
    assert torch.equal(logp_sampled, logp_scored)
    y_again, _, _, _ = sde_step_with_logprob(
        v, x, sig, sig_next, 0.9, generator=torch.Generator().manual_seed(3), sde_type=kind
    )
    assert torch.equal(y, y_again)  # the generator alone decides the noise


@pytest.mark.parametrize("kind,a", [("sde", 1.0), ("cps", 0.7)])
def test_empirical_spread_matches_std(kind: str, a: float) -> None:
    x, v = batch(b=2, shape=(20_000,))
    y, _, mean, std = sde_step_with_logprob(
        v, x, torch.tensor([0.8, 0.4], dtype=F64), torch.tensor([0.6, 0.3], dtype=F64), a,
        generator=torch.Generator().manual_seed(4), sde_type=kind,
    )
    residual = y - mean
    for i in range(2):
        s = std[i].item()
        assert residual[i].std().item() == pytest.approx(s, rel=0.03)
        assert abs(residual[i].mean().item()) < 4 * s / math.sqrt(20_000)


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("cps", 0.8)])
def test_step_keeps_the_marginal_noise_level(kind: str, a: float) -> None:
    """x = sigma * eps (data at 0) with the exact velocity eps: the next latent has std about sigma_next.

    "cps" preserves it exactly; "sde" to first order in dt (Euler-Maruyama of a marginal-preserving SDE).
    """
    n, sig, sig_next = 20_000, 0.5, 0.45
    eps = torch.randn(1, n, generator=torch.Generator().manual_seed(5), dtype=F64)
    y, _, _, _ = sde_step_with_logprob(
        eps, sig * eps, sig, sig_next, a, generator=torch.Generator().manual_seed(6), sde_type=kind
    )
    assert y.std().item() == pytest.approx(sig_next, rel=0.03)


def test_reduced_precision_inputs_give_float32_outputs() -> None:
    x, v = batch(dtype=torch.bfloat16)
    outputs = sde_step_with_logprob(v, x, 0.8, 0.6, 1.0)
    assert all(t.dtype == torch.float32 for t in outputs)
    x16, v16 = batch(dtype=torch.float16)
    assert all(t.dtype == torch.float32 for t in sde_step_with_logprob(v16, x16, 0.8, 0.6, 0.5, sde_type="cps"))
    x64, v64 = batch()
    assert all(t.dtype == F64 for t in sde_step_with_logprob(v64.float(), x64, 0.8, 0.6, 1.0))
    # the step itself runs in float32: it equals the float32 step on the upcast inputs
    ref = sde_step_with_logprob(v.float(), x.float(), 0.8, 0.6, 1.0, prev_sample=outputs[0])
    torch.testing.assert_close(outputs[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sigma_one_is_finite(kind: str) -> None:
    x, v = batch()
    y, log_prob, mean, std = sde_step_with_logprob(
        v, x, 1.0, 0.9, 1.0, generator=torch.Generator().manual_seed(7), sde_type=kind
    )
    assert all(bool(torch.isfinite(t).all()) for t in (y, log_prob, mean, std))
    # sde: std_dev = sqrt(1 / (1 - 0.9)) and std = std_dev * sqrt(0.1) = 1; cps: s = 0.9 * sin(pi/2)
    assert std.flatten()[0].item() == pytest.approx(1.0 if kind == "sde" else 0.9, rel=1e-12)


@pytest.mark.parametrize(
    "sigma,sigma_next",
    [(0.5, 0.6), (0.5, 0.5), (1.2, 0.5), (0.5, -0.1), (torch.tensor([0.9, 0.4, 0.5]), torch.tensor([0.8, 0.5, 0.1]))],
)
def test_invalid_sigmas_are_refused(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> None:
    x, v = batch()
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(v, x, sigma, sigma_next, 1.0)


def test_invalid_settings_are_refused() -> None:
    x, v = batch()
    with pytest.raises(ValueError, match="no\\s+log-density"):
        sde_step_with_logprob(v, x, 0.3, 0.0, 0.8, sde_type="cps")
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        sde_step_with_logprob(v, x, 0.5, 0.3, 1.5, sde_type="cps")
    with pytest.raises(ValueError, match="noise_level=0"):
        sde_step_with_logprob(v, x, 0.5, 0.3, 0.0, prev_sample=x)
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(v, x, 0.5, 0.3, 1.0, sde_type="ode")
    with pytest.raises(ValueError, match="shape"):
        sde_step_with_logprob(v[:2], x, 0.5, 0.3, 1.0)
    with pytest.raises(ValueError, match="\\[B\\] tensor"):
        sde_step_with_logprob(v, x, torch.tensor([0.5, 0.6]), 0.3, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        sde_step_with_logprob(v, x, 0.5, 0.3, -1.0)
    # the last step is fine for "sde" and as an ODE step for "cps"
    _, log_prob, _, _ = sde_step_with_logprob(v, x, 0.3, 0.0, 1.0)
    assert bool(torch.isfinite(log_prob).all())
    y, _, _, _ = sde_step_with_logprob(v, x, 0.3, 0.0, 0.0, sde_type="cps")
    torch.testing.assert_close(y, x - 0.3 * v)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_log_prob_gradient_flows_through_the_mean_only(kind: str) -> None:
    """d log_prob / d v with the sample held fixed: (y - mean) / std^2 * d mean / d v, averaged."""
    x, v = batch(b=1)
    v.requires_grad_(True)
    sig, sig_next, a = 0.8, 0.6, 0.9
    y, log_prob, mean, std = sde_step_with_logprob(
        v, x, sig, sig_next, a, generator=torch.Generator().manual_seed(8), sde_type=kind
    )
    log_prob.sum().backward()
    if kind == "sde":
        g2 = a * a * sig / (1 - sig)
        dmean_dv = (1 + g2 * (1 - sig) / (2 * sig)) * (sig_next - sig)
    else:
        s = sig_next * math.sin(a * math.pi / 2)
        dmean_dv = -(1 - sig_next) * sig + math.sqrt(sig_next**2 - s**2) * (1 - sig)
    expected = (y - mean).detach() / std.item() ** 2 * dmean_dv / x[0].numel()
    torch.testing.assert_close(v.grad, expected, rtol=1e-10, atol=1e-12)


def test_default_clip_ranges_and_the_cps_scale() -> None:
    assert default_clip_range("sde") == 1e-4
    assert default_clip_range("cps") == 5e-6
    with pytest.raises(ValueError, match="sde_type"):
        default_clip_range("ode")
    # Our cps log-ratio is the reference's -(y - mean)^2 log-ratio times 1 / (2 s^2): the basis of the default.
    x, v_old = batch(b=1, seed=9)
    v_new = v_old + 0.01 * torch.randn(v_old.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    y, logp_old, mean_old, s = sde_step_with_logprob(v_old, x, 0.8, 0.6, 0.8, sde_type="cps")
    _, logp_new, mean_new, _ = sde_step_with_logprob(v_new, x, 0.8, 0.6, 0.8, prev_sample=y, sde_type="cps")
    reference_ratio = (-((y - mean_new) ** 2)).mean() - (-((y - mean_old) ** 2)).mean()
    ours = (logp_new - logp_old).item()
    assert ours == pytest.approx(reference_ratio.item() / (2 * s.item() ** 2), rel=1e-9)
    assert ours != pytest.approx(reference_ratio.item(), rel=1e-3)


# --------------------------------------------------------------------------------------------- KL and loss


def test_kl_to_reference() -> None:
    mean, _ = batch()
    std = torch.tensor([0.5, 1.0, 2.0], dtype=F64).view(3, 1, 1)
    assert torch.equal(kl_to_reference(mean, mean.clone(), std), torch.zeros(3, dtype=F64))
    other = mean + 0.1 * torch.arange(20, dtype=F64).view(1, 4, 5)
    kl = kl_to_reference(mean, other, std)
    for i, s in enumerate([0.5, 1.0, 2.0]):
        diffs = (mean[i] - other[i]).flatten().tolist()
        assert kl[i].item() == pytest.approx(sum(d * d / (2 * s * s) for d in diffs) / 20, rel=1e-12)
    theta = mean.clone().requires_grad_(True)
    ref = other.clone().requires_grad_(True)
    kl_to_reference(theta, ref, std).sum().backward()
    assert theta.grad is not None and ref.grad is None
    with pytest.raises(ValueError, match="same"):
        kl_to_reference(mean, other[:2], std)


def test_first_inner_step_has_ratio_one_and_loss_minus_mean_advantage() -> None:
    logp_old = torch.tensor([-1.3, -0.7, -2.1, -1.0], dtype=torch.float32, requires_grad=True)
    logp_new = logp_old.detach().clone().requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.25, -2.0])
    loss, stats = grpo_policy_loss(logp_new, logp_old, adv, 1e-4)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-(1.5 - 0.5 + 0.25 - 2.0) / 4, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp_new.grad, -adv / 4)
    assert logp_old.grad is None  # the old policy is data, not trained


def test_loss_matches_the_clipped_objective_and_counts_clipped_samples() -> None:
    ratios = [1.0, 1 + 2e-4, 1 - 2e-4, 1 + 0.5e-4, 1 + 3e-4]
    adv = [0.3, 1.0, -1.0, 2.0, -0.5]
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], dtype=F64)
    logp_new = (logp_old + torch.log(torch.tensor(ratios, dtype=F64))).requires_grad_(True)
    advantages = torch.tensor(adv, dtype=F64)
    loss, stats = grpo_policy_loss(logp_new, logp_old, advantages, 1e-4)
    ref_terms = [max(-a * r, -a * min(max(r, 1 - 1e-4), 1 + 1e-4)) for r, a in zip(ratios, adv)]
    assert loss.item() == pytest.approx(sum(ref_terms) / 5, rel=1e-10)
    assert stats["clipfrac"].item() == pytest.approx(3 / 5)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / 5, rel=1e-12)
    log_ratios = [math.log(r) for r in ratios]
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * lr * lr for lr in log_ratios) / 5, rel=1e-6)
    loss.backward()
    # the clip stops the gradient where it binds (A > 0 above, A < 0 below) and nowhere else
    assert logp_new.grad[1].item() == 0.0 and logp_new.grad[2].item() == 0.0
    assert logp_new.grad[4].item() == pytest.approx(0.5 * ratios[4] / 5, rel=1e-10)
    # asymmetric: a wider upper range keeps 1 + 2e-4 inside
    _, asym = grpo_policy_loss(logp_new, logp_old, advantages, clip_low=1e-4, clip_high=2.5e-4)
    assert asym["clipfrac"].item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="clip_low"):
        grpo_policy_loss(logp_new, logp_old, advantages, 0.0)
    with pytest.raises(ValueError, match="shape"):
        grpo_policy_loss(logp_new, logp_old[:3], advantages, 1e-4)


# --------------------------------------------------------------------------------------------- advantages

NAN = float("nan")


def test_group_advantages_edge_cases() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0, NAN, 4.0, 6.0, NAN, 3.0], dtype=F64)
    groups = torch.tensor([10, 10, 10, 3, 3, 8, 2, 2, 2, 5, 5])
    adv, stats = group_advantages(rewards, groups)
    std_a = statistics.pstdev([1.0, 2.0, 3.0])
    expected = [-1 / (std_a + 1e-4), 0.0, 1 / (std_a + 1e-4), 0.0, 0.0, 0.0, 0.0, -1 / 1.0001, 1 / 1.0001, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    assert stats == {"n_groups": 5, "zero_spread_groups": 3, "zero_spread_share": 0.6, "n_scored": 9}


def test_group_advantages_batch_std() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, NAN, 4.0, 8.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    adv, stats = group_advantages(rewards, groups, std_mode="batch")
    std = statistics.pstdev([1.0, 2.0, 3.0, 5.0, 5.0, 4.0, 8.0]) + 1e-4
    expected = [-1 / std, 0.0, 1 / std, 0.0, 0.0, 0.0, -2 / std, 2 / std]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert adv.dtype == torch.float32 and stats["zero_spread_groups"] == 1 and stats["n_scored"] == 7


def test_group_advantages_clip_and_all_unscored() -> None:
    rewards = torch.zeros(50, dtype=F64)
    rewards[0] = 1.0  # (1 - 0.02) / sqrt(0.02 * 0.98) = 7 standard deviations
    adv, _ = group_advantages(rewards, torch.zeros(50, dtype=torch.long))
    assert adv[0].item() == 5.0 and adv[1].item() == pytest.approx(-0.02 / (0.14 + 1e-4), rel=1e-9)
    adv, stats = group_advantages(torch.full((4,), NAN), torch.tensor([0, 0, 1, 1]), std_mode="batch")
    assert torch.equal(adv, torch.zeros(4)) and stats["n_scored"] == 0 and stats["zero_spread_share"] == 1.0


def test_group_advantages_refuses_bad_input() -> None:
    ok = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(ok, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(ok, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(ok, torch.tensor([0, 0]), std_mode="global")


# --------------------------------------------------------------------------------------------- window, EMA


def test_window_is_identical_on_every_rank_and_process() -> None:
    here = [draw_window(10, 2, 5, seed=17, iteration=i) for i in range(20)]
    code = (
        "import json; from metacot.flow_grpo.math import draw_window; "
        "print(json.dumps([draw_window(10, 2, 5, seed=17, iteration=i) for i in range(20)]))"
    )
    for hash_seed in ("1", "2"):  # separate processes ("ranks") with different str hashing
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here


def test_window_varies_across_iterations_within_bounds() -> None:
    windows = [draw_window(10, 2, 5, seed=3, iteration=i) for i in range(200)]
    assert {w[0] for w in windows} == {0, 1, 2, 3}  # every admissible start occurs
    assert all(w == [w[0], w[0] + 1] for w in windows)
    assert windows != [draw_window(10, 2, 5, seed=4, iteration=i) for i in range(200)]
    assert draw_window(10, 10, 10, seed=3, iteration=7) == list(range(10))
    assert draw_window(10, 3, 3, seed=3, iteration=7) == [0, 1, 2]


@pytest.mark.parametrize(
    "args", [(10, 0, 5, 0, 0), (10, 6, 5, 0, 0), (10, 2, 11, 0, 0), (10, 2, 5, -1, 0), (10, 2, 5, 0, -1),
             (10, 2.0, 5, 0, 0), (10, True, 5, 0, 0)]
)
def test_window_refuses_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        draw_window(*args)


def test_ema_update_and_masked_mean() -> None:
    ema = [torch.zeros(3), torch.ones(2, 2)]
    params = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), torch.full((2, 2), 3.0)]
    ema_update(ema, params, decay=0.9)
    torch.testing.assert_close(ema[0], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(ema[1], torch.full((2, 2), 0.9 + 0.3))
    assert ema[0].dtype == torch.float32
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema, params, decay=1.5)
    with pytest.raises(ValueError, match="EMA tensors"):
        ema_update(ema, params[:1], decay=0.9)
    values = torch.tensor([[1.0, NAN, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 0.0]))
    with pytest.raises(TypeError, match="bool"):
        masked_mean(values, mask.float())
