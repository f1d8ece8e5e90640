"""Benchmark: one Stage 2 Flow-GRPO iteration (rollout + reward + train) on one GPU.

The state comes from ``metacot.flow_grpo.trainer.setup`` itself and each iteration is the library's
``iteration_step``: ``rollout`` (``sample_with_window`` with true CFG, both branches and the whole group in one
batched ``predict_velocity`` forward; VAE decode; rewards submitted to a thread pool), ``compute_advantages``,
``train_policy`` (old log-probs, clipped GRPO loss through ``score_step``, AdamW). The model is built in code
(``benchmarks.common.build_model``: real-size QwenImage MMDiT + VAE, random bf16 weights); the condition encoder
and VAE encoder return random tensors of the real shapes; the reward is a deliberately slow stand-in that sleeps
``--reward-seconds`` per rollout batch in a reward thread, to show how much of it the iteration waits for.

Settings (the issue's): one group of 8 per iteration, 10 rollout steps, true CFG 4.0, LoRA r=64 alpha=128 on the
attention and MLP projections, 1 inner epoch, 2 optimizer steps per group. A variant is comma-separated
``key=value`` pairs: ``window`` (full = 9 trained steps of 10; early2 = 2 steps within the first 4), ``mb`` (training
micro-batch, samples; CFG doubles the sequences), ``ckpt`` (checkpointed MMDiT blocks: all, none, a number, or
fit = the fewest, in tenths of the depth, whose training micro-step fits), ``old`` (recompute | rollout old
log-probs), ``rbatch`` (rollout batch), ``neg`` (valid tokens of the CFG negative condition; < 256 pads and masks
it), ``iters`` (iterations; the first is reported apart as warm-up when there are several). Usage::

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/grpo_iteration.py --layers 60 \
        --variant window=full,mb=4,ckpt=fit --variant window=early2,mb=4,ckpt=fit --forwards

``--forwards`` also times the CFG-batched denoising forward alone at rollout batch 4 and 8, with and without a
padded negative condition. ``--tiny`` is a CPU smoke test of the script. Prints a table last and writes
``OUT/<name>.json``. Left out: the judge (the stand-in reward), DeepSpeed (bf16 LoRA weights emulate its bf16 mode),
evaluation passes and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

# benchmarks/ is a folder of scripts, not a package: make its common.py importable from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from metacot.models.speed import set_block_checkpointing

WINDOWS = {"full": (9, 9), "early2": (2, 4)}
DEFAULTS = {"window": "full", "mb": "4", "ckpt": "all", "old": "recompute", "rbatch": "8", "neg": "256",
            "attn": "", "compile": "0", "fuse": "1", "src": "out", "vlm": "none"}


def source_area(args: argparse.Namespace, tokens: int) -> int:
    """``data.source_area`` for ``tokens`` source latent tokens (0 when that is the output's own count)."""
    side = 2 * (4 if args.tiny else 8)  # pixels per latent token side: VAE downsampling x 2x2 packing
    return 0 if tokens == (args.resolution // side) ** 2 else tokens * side * side


class SlowReward:
    """A reward that takes ``seconds`` per batch (sleeping, as a remote judge's latency would) and returns noise."""

    scale = (0.0, 1.0)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.rng = random.Random(0)

    def __call__(self, batch: Any) -> list[float]:
        time.sleep(self.seconds)
        return [self.rng.random() for _ in range(len(batch))]


def parse_variant(spec: str, iterations: int) -> dict[str, str]:
    out = dict(DEFAULTS, iters=str(iterations))
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"unknown variant key {key!r} in {spec!r}; use {sorted(out)}")
        out[key] = value
    if out["window"] not in WINDOWS:
        raise SystemExit(f"window={out['window']!r}: use one of {sorted(WINDOWS)}")
    return out


def make_config(args: argparse.Namespace, v: dict[str, str], out: str) -> Any:
    from metacot.flow_grpo.config import (
        EvalConfig,
        GRPOConfig,
        GRPOData,
        Policy,
        Rollout,
    )
    from metacot.training import ExpertConfig, LoRAConfig, TrainConfig

    size, wmax = WINDOWS[v["window"]]
    area = 0 if v["src"] == "out" else source_area(args, int(v["src"]))
    return GRPOConfig(
        model="in-code", output_dir=out, data=GRPOData(train="in-code", resolution=args.resolution, source_area=area,
                                                          cot_source="oracle"),  # conditions are stubbed
        train=TrainConfig(max_steps=10_000, deepspeed="none", device="auto",
                          mixed_precision="bf16" if args.adapters == "fp32-autocast" else "no",
                          wandb_mode="disabled", progress=False, resume=False),
        generation=ExpertConfig(mode="lora", lr=3e-4, weight_decay=1e-4, gradient_checkpointing=v["ckpt"] == "all",
                                lora=LoRAConfig(r=64, alpha=128, target_modules=common.ATTENTION + common.MLP),
                                fused_lora_inference=v["fuse"] == "1", compile=v["compile"] == "1",
                                attention_backend=v["attn"]),
        rollout=Rollout(group_size=8, prompts_per_iteration=1, batch_size=int(v["rbatch"]), num_steps=10,
                        cfg_scale=4.0, window_size=size, window_max=wmax),
        policy=Policy(micro_batch_size=int(v["mb"]), updates_per_epoch=2, inner_epochs=1, old_logprob=v["old"]),
        eval=EvalConfig(every=0, prompts=1), reward_workers=2)


COT_TEXT = ("Meta-tasks: Replace. Task thinking: the red mug on the left of the desk becomes a blue ceramic mug of "
            "the same size and pose; lighting and shadows follow the new material. Target traversal: desk (kept), "
            "laptop (kept), lamp (kept), red mug (replaced by a blue mug), window (kept), plant (kept). ")


def fake_prompts(n: int, resolution: int, cot_repeats: int = 1) -> list[Any]:
    from types import SimpleNamespace

    from metacot.flow_grpo.trainer import Prompt

    images = common.source_images(n, resolution)
    return [Prompt(SimpleNamespace(id=f"p{i}", instruction="make it red", category="recolor", scene_before=None,
                                   scene_after=None), images[i], None, None, COT_TEXT * cot_repeats)
            for i in range(n)]


def build_state(args: argparse.Namespace, device: torch.device, v: dict[str, str]) -> tuple[Any, common.Stubs]:
    import metacot.flow_grpo.trainer as grpo
    from rewards.contract import WeightedReward

    model = common.build_model(args.layers, device, tiny=args.tiny)
    if v["vlm"] == "7b":  # the condition encoder resident on the GPU, run by the trainer inside each iteration
        model.vlm, model.processor = common.build_vlm_7b(args.vlm_dir, device, tiny=args.tiny)
    else:
        model.vlm = torch.nn.Linear(1, 1, device=device)  # the frozen condition encoder: stubbed, never called
    stubs = common.Stubs(model, args.resolution, negative_valid=int(v["neg"]),
                         source_tokens=None if v["src"] == "out" else int(v["src"]))
    cfg = make_config(args, v, tempfile.mkdtemp(prefix="bench-grpo-"))
    prompts = fake_prompts(4, args.resolution, cot_repeats=args.cot_repeats)
    with common.patch(grpo, load_editing_model=lambda *a, **k: model,
                      check_calibration_gate=lambda cfg: {"benchmark": "no judge; gate not checked"},
                      _load_prompts=lambda *a, **k: prompts,
                      build_rewards=lambda cfg: WeightedReward({"slow": (SlowReward(args.reward_seconds), 1.0)}),
                      build_reward=lambda spec: (lambda batch: [None] * len(batch))):
        state = grpo.setup(cfg)
    common.lora_to_bf16_with_noise(state.accelerator.unwrap_model(state.policy),
                                   bf16=args.adapters == "bf16" and device.type == "cuda")
    return state, stubs


def fake_conditions(stubs: common.Stubs, n: int, negative_valid: int | None = None) -> Any:
    from metacot.flow_grpo.rollout import Conditions
    from metacot.models.conditioning import NEGATIVE_PROMPT

    embeds, mask = stubs.encode_conditions(None, None, [None] * n, ["edit"] * n)
    old = stubs.negative_valid
    stubs.negative_valid = negative_valid or old
    neg, neg_mask = stubs.encode_conditions(None, None, [None] * n, [NEGATIVE_PROMPT] * n)
    stubs.negative_valid = old
    return Conditions(embeds, mask, neg, neg_mask, stubs.encode_latents(None, [None] * n), source_size(stubs))


def source_size(stubs: common.Stubs) -> tuple[int, int] | None:
    """(height, width) in pixels of the (square) source the stub latents stand for; None = the output size."""
    if stubs.source_tokens == stubs.sh.image:
        return None
    side = int(round(stubs.source_tokens ** 0.5)) * stubs.model.vae_scale_factor * 2
    return side, side


def pair_flops(state: Any, stubs: common.Stubs) -> dict[str, float]:
    """FLOPs of one sample's CFG velocity (a conditional + a negative sequence in one batched forward)."""
    from metacot.flow_grpo.rollout import velocity

    policy = state.accelerator.unwrap_model(state.policy)
    cond = fake_conditions(stubs, 1)
    x = torch.randn(1, stubs.sh.image, stubs.sh.channels, device=state.device)
    seq = stubs.sh.image + stubs.source_tokens + stubs.sh.text
    return common.count_forward_flops(policy, lambda: velocity(state.base, policy, x, cond, 0.9, 4.0, stubs.size), seq)


def probe_train_step(state: Any, stubs: common.Stubs) -> bool:
    """One training micro-step (score_step forward + backward + AdamW) at the variant's micro-batch; False on OOM."""
    from metacot.flow_grpo.rollout import score_step

    r, mb = state.cfg.rollout, state.cfg.policy.micro_batch_size
    cond = fake_conditions(stubs, mb)
    x = torch.randn(mb, stubs.sh.image, stubs.sh.channels, device=state.device)
    try:
        logp, _, _ = score_step(state.base, state.policy, x, x + 0.01 * torch.randn_like(x), cond, 0.9, 0.8,
                                size=stubs.size, cfg_scale=r.cfg_scale, noise_level=r.noise_level, sde_type=r.sde_type)
        state.accelerator.backward(logp.mean())
        state.optimizer.step()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    state.optimizer.zero_grad(set_to_none=True)
    common.reset_memory(state.device)
    return ok


FORWARD_SETTINGS = [("peft", "native"), ("fused", "native"), ("fused", "_native_cudnn"), ("fused", "_native_flash")]


def denoise_forwards(state: Any, stubs: common.Stubs, pair: float, peak: float, *, compile_best: bool,
                     batches: tuple[int, ...] = (8, 4)) -> list[dict[str, Any]]:
    """The rollout's CFG-batched velocity forward alone (no grad): peft's LoRA path vs the fused one, attention
    backends, then the fastest setting with compiled blocks; at rollout batch 8 (16 sequences) and 4."""
    from metacot.flow_grpo.rollout import velocity
    from metacot.models.speed import compile_blocks, set_attention_backend

    policy = state.accelerator.unwrap_model(state.policy)
    rows: list[dict[str, Any]] = []

    def measure(batch: int, lora: str, backend: str, compiled: bool) -> dict[str, Any]:
        cond = fake_conditions(stubs, batch)
        x = torch.randn(batch, stubs.sh.image, stubs.sh.channels, device=state.device)
        set_attention_backend(policy, backend)
        peft = common.peft_lora_forward(policy) if lora == "peft" else contextlib.nullcontext()
        with torch.no_grad(), peft:
            first, _ = common.timed(lambda: velocity(state.base, policy, x, cond, 0.9, 4.0, stubs.size), state.device)
            times = [common.timed(lambda: velocity(state.base, policy, x, cond, 0.9, 4.0, stubs.size),
                                  state.device)[0] for _ in range(3)]
        t = sorted(times)[1]
        row = {"rollout_batch": batch, "sequences": 2 * batch, "lora": lora, "attention": backend,
               "compiled": compiled, "forward_s": t, "samples_s": times, "first_s": first,
               "mfu": pair * batch / t / (peak * 1e12)}
        print({k: v for k, v in row.items() if k != "samples_s"}, flush=True)
        return row

    # Eager blocks for the uncompiled rows even when the variant compiles them; the variant's own state is back
    # on leaving (blocks compiled here become eager again).
    with common.eager_blocks(policy):
        for batch in batches:
            for lora, backend in FORWARD_SETTINGS:
                try:
                    rows.append(measure(batch, lora, backend, False))
                except Exception as exc:  # an attention backend this GPU / build lacks: recorded, not fatal
                    rows.append({"rollout_batch": batch, "lora": lora, "attention": backend,
                                 "error": repr(exc)[:300]})
        fused = [r for r in rows if r.get("lora") == "fused" and "forward_s" in r
                 and r["rollout_batch"] == batches[0]]
        best = min(fused, key=lambda r: r["forward_s"])["attention"]
        if compile_best:
            compile_blocks(policy)
            for batch in batches:
                rows.append(measure(batch, "fused", best, True))
    set_attention_backend(policy, state.cfg.generation.attention_backend or "native")
    return rows


def run_iterations(state: Any, stubs: common.Stubs, n: int) -> list[dict[str, Any]]:
    import metacot.flow_grpo.trainer as grpo

    out = []
    stub_encoders = {"encode_latents": stubs.encode_latents}
    if state.base.processor is None:  # no VLM built: random conditions of the real shape
        stub_encoders["encode_conditions"] = stubs.encode_conditions
    with ThreadPoolExecutor(max_workers=state.cfg.reward_workers, thread_name_prefix="reward") as pool, \
            common.patch(grpo, **stub_encoders):
        for _ in range(n):
            t, metrics = common.timed(lambda: grpo.iteration_step(state, pool), state.device)
            out.append({k: metrics[k] for k in ("time_rollout", "time_reward_wait", "time_train", "time_old_logprob",
                                                "time_iteration", "window_start", "window_end", "optimizer_step",
                                                "loss")
                        if k in metrics} | {"wall_s": t})
    return out


def summarise(row: dict[str, Any], state: Any, pair: float, peak: float) -> None:
    """Iteration figures from the last iteration, with MFU per phase (issue's FLOP convention)."""
    cfg = state.cfg
    r, p = cfg.rollout, cfg.policy
    n = r.group_size * r.prompts_per_iteration
    w = r.window_size
    last = row["iterations"][-1]
    rollout_flops = r.num_steps * n * pair
    train_fwd = w * n * pair * p.inner_epochs
    train_flops = 3 * train_fwd + (w * n * pair if p.old_logprob == "recompute" else 0.0)
    row.update(iteration_s=last["wall_s"], rollout_s=last["time_rollout"], reward_wait_s=last["time_reward_wait"],
               train_s=last["time_train"], reward_wait_share=last["time_reward_wait"] / last["wall_s"],
               rollout_mfu=rollout_flops / last["time_rollout"] / (peak * 1e12),
               train_mfu=train_flops / last["time_train"] / (peak * 1e12),
               iteration_mfu=(rollout_flops + train_flops) / last["wall_s"] / (peak * 1e12),
               flops={"pair_forward": pair, "rollout": rollout_flops, "train": train_flops})


def run_variant(args: argparse.Namespace, device: torch.device, spec: str, peak: float,
                forwards: bool) -> dict[str, Any]:
    v = parse_variant(spec, args.iterations)
    row: dict[str, Any] = {"variant": spec, **v, "layers": args.layers, "adapters": args.adapters,
                           "reward_seconds": args.reward_seconds}
    common.reset_memory(device)
    t0 = time.perf_counter()
    state, stubs = build_state(args, device, v)
    row["setup_s"] = time.perf_counter() - t0
    row["source_tokens"] = stubs.source_tokens
    if state.base.processor is not None:
        from metacot.models.conditioning import condition_text_token_counts
        from metacot.sft.data import condition_prompt

        p0 = state.prompts[0]
        text = condition_prompt(p0.record.instruction, p0.cot_text, no_cot=False, include_instruction=True)
        row["condition_text_tokens"] = condition_text_token_counts(state.base.processor, [text])[0]
        row["vlm_params_b"] = sum(p.numel() for p in state.base.vlm.parameters()) / 1e9
    try:
        pair = pair_flops(state, stubs)
        row["pair_flops"] = pair
        if v["ckpt"] == "fit":
            k, failed = common.fit_checkpointing(state.policy, lambda: probe_train_step(state, stubs), args.layers,
                                                 device, args.fit_reserve_gib)
            row.update(ckpt_blocks=k, ckpt_oom_at=failed)
            if k is None:
                return {**row, "status": "oom"}
        else:
            k = args.layers if v["ckpt"] == "all" else 0 if v["ckpt"] == "none" else int(v["ckpt"])
            if v["ckpt"] != "all":  # "all" is the trainer's own generation.gradient_checkpointing=true
                set_block_checkpointing(state.policy, k)
            row["ckpt_blocks"] = k
        if forwards:
            row["denoise_forwards"] = denoise_forwards(state, stubs, pair["forward"], peak,
                                                       compile_best=args.compile_forwards)
        common.reset_memory(device)
        try:
            row["iterations"] = run_iterations(state, stubs, int(v["iters"]))
        except torch.OutOfMemoryError as exc:
            return {**row, "status": "oom", "error": str(exc).split("\n")[0], "mem_gib": common.memory_gib(device)}
        except Exception as exc:  # recorded so that the variants after it still run
            return {**row, "status": "error", "error": repr(exc)[:500], "mem_gib": common.memory_gib(device)}
        row.update(status="ok", mem_gib=common.memory_gib(device))
        summarise(row, state, pair["forward"], peak)
        return row
    finally:
        common.release(state, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--variant", action="append", help="key=value,... (repeat); see the module docstring")
    p.add_argument("--iterations", type=int, default=2, help="iterations per variant unless the variant sets iters")
    p.add_argument("--resolution", type=int, default=common.RESOLUTION)
    p.add_argument("--reward-seconds", type=float, default=1.0)
    p.add_argument("--adapters", choices=["bf16", "fp32-autocast", "fp32"], default="bf16")
    p.add_argument("--forwards", action="store_true", help="time the denoising forward alone (first variant)")
    p.add_argument("--fit-reserve-gib", type=float, default=3.0,
                   help="ckpt=fit: GiB held back while probing (what the iteration adds to one training step)")
    p.add_argument("--compile-forwards", action="store_true",
                   help="with --forwards: also time the fastest setting with torch.compile'd blocks")
    p.add_argument("--vlm-dir", default="build/benchwhl/vlm",
                   help="a metacot tiny VLM folder: processor and token ids for vlm=7b (its sizes are replaced)")
    p.add_argument("--cot-repeats", type=int, default=3, help="Meta-CoT length of the vlm=7b prompts (repeats)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: smoke test of the script only")
    p.add_argument("--name", default="grpo_iteration")
    p.add_argument("--out", default=common.out_dir_default())
    args = p.parse_args(argv)
    if args.tiny:
        args.resolution = 64
    variants = args.variant or ["window=full,mb=4,ckpt=fit", "window=early2,mb=4,ckpt=fit"]
    rows, _, _ = common.run_variants(
        args, "grpo_iteration", variants,
        lambda device, i, spec, peak: run_variant(args, device, spec, peak, forwards=args.forwards and i == 0),
        hidden=("iterations", "denoise_forwards", "pair_flops"))
    fw = [f for r in rows for f in r.get("denoise_forwards", [])]
    if fw:
        print(common.table(fw, ["rollout_batch", "sequences", "lora", "attention", "compiled", "forward_s", "mfu"]))
    print(common.table(rows, ["variant", "status", "ckpt_blocks", "iteration_s", "rollout_s", "train_s",
                              "reward_wait_share", "rollout_mfu", "train_mfu", "mem_gib"]))
    print(f"(source tokens per row: {[r.get('source_tokens') for r in rows]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
