"""Benchmark: the tiny models at the GPU quickstart's sizes, where host work (not the GPU) used to bound both stages.

Builds the tiny editing model (``metacot.models.tiny.build_tiny_editing_model``, VAE briefly trained) and a synthetic
dataset (``data_recipes.synth.generate``) in a temporary folder, then runs the library's trainers with the settings
``metacot quickstart --device cuda`` gives them (``metacot/configs/quickstart_gpu.yaml`` through
``metacot.experiments.quickstart.sft_overrides`` / ``grpo_overrides``: 64 px, SFT batch 64, GRPO 8 prompts x 16), with
``train.deepspeed=none`` (the GPU machine has no DeepSpeed):

- SFT, once per ``--sft`` variant (``cached``: ``data.preprocess=true``; ``uncached``: every step tokenises and
  VAE-encodes its batch; ``+cudnn``: with cuDNN's attention, which the trainer turns off on CUDA; the first variant
  runs with cold caches, as a fresh run): samples/s over the steps after ``--warmup``, setup seconds (with the
  preprocessing), peak memory, the seconds of ``build_inputs`` alone, and on CUDA the GPU busy share of
  ``--profile-steps`` profiled steps (kernel time / wall time, from ``torch.profiler``) with the top host and device
  operators: where the time goes.
- the rule judge alone on 64 edits at the resolution (ms per batch, in-process and with its worker processes);
- GRPO iterations from the SFT run's ``final/``, once per ``--judge-workers`` value: the share of an iteration spent
  waiting for the judge (``time_reward_wait / time_iteration``), first iteration excluded.

Usage (GPU machine: about 3-4 minutes; CPU: use small numbers)::

    python benchmarks/small_scale.py --device cuda --steps 40 --samples 2048
    python benchmarks/small_scale.py --device cpu --steps 7 --warmup 2 --batch 8 --samples 64 \\
        --grpo-iterations 2 --grpo-group 4 --grpo-prompts 2 --rollout-steps 6

Writes ``OUT/<name>.json`` (``--out``, else ``$OUT``, else benchmarks/results/), rewritten after each part.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=2048, help="synthetic edits (+ as many understanding samples)")
    p.add_argument("--steps", type=int, default=40, help="SFT steps per variant, warm-up included")
    p.add_argument("--uncached-steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--sft", default="uncached+cudnn,cached,uncached",
                   help="SFT variants, comma-separated: cached / uncached (data.preprocess); +cudnn: cuDNN attention")
    p.add_argument("--grpo-iterations", type=int, default=3)
    p.add_argument("--grpo-group", type=int, default=16)
    p.add_argument("--grpo-prompts", type=int, default=8)
    p.add_argument("--rollout-steps", type=int, default=10)
    p.add_argument("--judge-workers", default="default,0", help="CECRuleJudge workers per GRPO run ('default')")
    p.add_argument("--vae-steps", type=int, default=50, help="tiny VAE training steps (quality is not measured)")
    p.add_argument("--name", default="small_scale")
    p.add_argument("--out", default=common.out_dir_default())
    return p.parse_args(argv)


def quickstart(args: argparse.Namespace, root: Path) -> Any:
    from metacot.config import load_config
    from metacot.experiments.quickstart import QuickstartConfig

    return load_config(QuickstartConfig, "quickstart_gpu", [
        f"out={root}", f"device={args.device}", f"resolution={args.resolution}", f"sft_batch={args.batch}",
        f"sft_steps={max(args.steps, args.uncached_steps)}", f"samples={args.samples}", f"grpo_group={args.grpo_group}",
        f"grpo_prompts={args.grpo_prompts}", f"rollout_steps={args.rollout_steps}"])


def profile_steps(state: Any, step: Any, n: int, device: torch.device) -> dict[str, Any]:
    """GPU busy share of ``n`` steps (sum of kernel times / wall) and the top operators, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step(state)
        common.sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    out: dict[str, Any] = {"wall_s": wall, "steps": n}
    top = lambda attr: [(e.key, round(getattr(e, attr) / 1e3 / n, 3)) for e in  # noqa: E731
                        sorted(events, key=lambda e: -getattr(e, attr))[:15]]
    out["top_host_ms_per_step"] = top("self_cpu_time_total")
    if device.type == "cuda":
        kernel_us = sum(e.self_device_time_total for e in events)
        out["gpu_busy_share"] = kernel_us / 1e6 / wall
        out["top_device_ms_per_step"] = top("self_device_time_total")
    return out


def time_build_inputs(state: Any, device: torch.device, n: int = 3) -> float:
    """Seconds of ``build_inputs`` for a step's batch (data collation or processing + the condition encoder's
    forward), as ``train_step`` calls it; the mean of ``n`` steps."""
    from metacot.sft.trainer import build_inputs

    cfg, total = state.cfg, 0.0
    for k in range(n):
        step = state.step + k
        edits = state.data.edit_batch(step, cfg.batch_size, cfg.train.seed)
        und = state.data.understanding_batch(step, round(cfg.data.understanding_ratio * cfg.batch_size),
                                             cfg.train.seed)
        total += common.timed(lambda: build_inputs(state, edits, und, step, 0), device)[0]
    return total / n


def run_sft(args: argparse.Namespace, q: Any, root: Path, device: torch.device, variant: str,
            keep_final: bool) -> dict[str, Any]:
    from metacot.config import load_config
    from metacot.final import save_final
    from metacot.experiments.quickstart import sft_overrides
    from metacot.sft.config import SFTConfig
    from metacot.sft.trainer import setup, train_step

    cached = variant.split("+")[0] == "cached"
    steps = args.steps if cached else args.uncached_steps
    cfg = load_config(SFTConfig, "tiny", sft_overrides(q, root) + [
        f"output_dir={root / f'sft_{variant}'}", "train.deepspeed=none", "train.progress=false",
        "train.wandb_mode=disabled", "train.save_every=0", f"data.preprocess={str(cached).lower()}"], stage="sft")
    common.reset_memory(device)
    t_setup, state = common.timed(lambda: setup(cfg), device)
    # setup turns cuDNN's attention off on CUDA; "+cudnn" turns it back on: the attention kernels as before.
    torch.backends.cuda.enable_cudnn_sdp(variant.endswith("+cudnn"))
    times = []
    for _ in range(steps):
        dt, metrics = common.timed(lambda: train_step(state), device)
        times.append(dt)
    timed_steps = times[args.warmup:]
    row: dict[str, Any] = {
        "part": "sft", "variant": variant, "setup_s": t_setup, "steps": steps, "warmup": args.warmup,
        "s_per_step": sum(timed_steps) / len(timed_steps), "step_times": times, "last_loss": metrics["loss"],
        "peak_gib": common.memory_gib(device)}
    row["samples_per_s"] = args.batch / row["s_per_step"]
    row["build_inputs_s"] = time_build_inputs(state, device)
    if args.profile_steps:
        row["profile"] = profile_steps(state, train_step, args.profile_steps, device)
    if keep_final:
        row["final"] = str(save_final(state))
    common.release(state, device)
    return row


def run_judge(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from metacot.cot.schema import EditRecord, load_records
    from rewards.contract import RewardBatch
    from rewards.rule_judge import CECRuleJudge

    recs = [r for r in load_records(root / "data" / "train.jsonl") if isinstance(r, EditRecord)][:64]
    images = [_open_rgb(root / "data" / r.target_image) for r in recs]
    batch = RewardBatch(images, images, [r.instruction for r in recs], [r.cot for r in recs],
                        {"scene_before": [r.scene_before for r in recs], "scene_after": [r.scene_after for r in recs]})
    row: dict[str, Any] = {"part": "judge", "samples": len(recs)}
    for name, workers in (("in_process", 0), ("workers", None)):
        judge = CECRuleJudge(workers=workers)
        judge(batch)  # start the workers, warm the caches of the scenes
        t0 = time.perf_counter()
        judge(batch)
        row[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3
        row[f"{name}_count"] = judge.workers
        judge.close()
    return row


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def run_grpo(args: argparse.Namespace, q: Any, root: Path, device: torch.device, final: str,
             workers: str) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from metacot.config import load_config
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import iteration_step, setup
    from metacot.experiments.quickstart import grpo_overrides

    judge = "{weight: 1.0}" if workers == "default" else f"{{weight: 1.0, workers: {workers}}}"
    cfg = load_config(GRPOConfig, "tiny", grpo_overrides(q, root) + [
        f"model={final}", f"output_dir={root / f'grpo_{workers}'}", "train.deepspeed=none", "train.progress=false",
        "train.wandb_mode=disabled", "train.save_every=0", "eval.every=0", f"rewards={{cec_rule: {judge}}}"],
        stage="grpo")
    state = setup(cfg)
    pool = ThreadPoolExecutor(max_workers=cfg.reward_workers, thread_name_prefix="reward")
    rows = []
    for _ in range(args.grpo_iterations):
        m = iteration_step(state, pool)
        rows.append({k: m[k] for k in ("time_iteration", "time_rollout", "time_reward_wait", "time_old_logprob",
                                       "time_train") if k in m})
    pool.shutdown()
    counted = rows[1:] or rows
    wait = sum(r["time_reward_wait"] for r in counted) / len(counted)
    total = sum(r["time_iteration"] for r in counted) / len(counted)
    common.release(state, device)
    return {"part": "grpo", "judge_workers": workers, "iterations": rows, "s_per_iteration": total,
            "reward_wait_s": wait, "reward_wait_share": wait / total, "samples": cfg.samples_per_iteration}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data_recipes.synth import generate
    from metacot.models.tiny import build_tiny_editing_model

    common.single_process()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models on a small CPU (as metacot quickstart does)
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"benchmark": "small_scale", "args": vars(args), "env": common.environment(device),
                               "rows": rows, "complete": False}

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("step_times", "profile", "iterations")}, flush=True)
        common.write_result(args.out, args.name, payload)

    with tempfile.TemporaryDirectory(prefix="small_scale_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_tiny_editing_model(root / "models" / "pipeline", resolution=args.resolution, seed=0,
                                 vae_steps=args.vae_steps)
        generate(root / "data", args.samples, 0, resolution=args.resolution, workers=4)
        payload["build_s"] = time.perf_counter() - t0
        q = quickstart(args, root)
        variants = [v for v in args.sft.split(",") if v]
        final = None
        for i, variant in enumerate(variants):
            row = run_sft(args, q, root, device, variant, keep_final=final is None)
            final = final or row.get("final")
            report(row)
        report(run_judge(args, root))
        for workers in (w for w in args.judge_workers.split(",") if w and final):
            report(run_grpo(args, q, root, device, final, workers))
    payload["complete"] = True
    path = common.write_result(args.out, args.name, payload)
    sft = {r["variant"]: r for r in rows if r["part"] == "sft"}
    for r in sft.values():
        busy = r.get("profile", {}).get("gpu_busy_share")
        print(f"sft {r['variant']}: {r['samples_per_s']:.0f} samples/s ({r['s_per_step'] * 1e3:.0f} ms/step), "
              f"setup {r['setup_s']:.1f} s, peak {r['peak_gib']:.2f} GiB"
              + (f", GPU busy {busy:.0%}" if busy is not None else ""))
    for r in rows:
        if r["part"] == "grpo":
            print(f"grpo judge workers={r['judge_workers']}: {r['s_per_iteration']:.2f} s/iteration, judge wait "
                  f"{r['reward_wait_s']:.2f} s = {r['reward_wait_share']:.0%}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
