"""``metacot experiment ablation``: the Meta-CoT paper's ablation in miniature, every arm trained from scratch.

Arms (same data, model sizes and Stage 1 step budget in each; the letters are the issue's and the report's):

====  =====================================================================================================
a     Train-Editing-Only: no CoT (``no_cot=true``), all edit data
b     SFT with 3 meta-tasks: single edits composed of Add / Remove / Replace only
c     SFT with the 5 meta-tasks: every single edit (Add, Remove, Replace, Camera Motion, Position Change)
d     full Meta-CoT SFT: (c) plus composed tasks (swaps, whole edit chains)
e     (d) without task thinking (the thinking step of every CoT emptied)
f     (d) + Flow-GRPO on the early window with the CEC rule reward
g     (d) + Flow-GRPO on the full trajectory, stopped at (f)'s GPU seconds (``train.max_seconds``)
====  =====================================================================================================

Evaluation (``metacot.eval``): the held-out test split, the model writing its own Meta-CoT (arm a writes none),
split into single meta-task edits and the composed generalisation split that (b) and (c) never saw; columns Ins /
Con / Nat / Art / CoT accuracy with bootstrap intervals (``metacot.eval.scene_metrics``), beside the copy and erase
baselines. Everything lands in ``OUT/``: ``arms/<x>/sft|grpo`` run folders, ``eval/`` (``samples.jsonl``,
``results.json``), ``report/index.html``.

Launch: ``metacot experiment ablation --preset gpu_mini`` (one GPU; Stage 1 arms run as parallel processes),
``--preset toy`` (CPU, the test suite's size), ``--config FILE key=value`` for bigger presets on a cluster node.
A finished stage of an arm is reused when the command is run again.
Left out: the paper's VIEScore judge columns (no judge weights here; pass a judge to ``metacot eval``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacot.config import check, load_config, to_yaml
from metacot.jsonl import read_dicts
from metacot.run import is_complete

ARMS: dict[str, str] = {
    "a": "Train-Editing-Only (no CoT)",
    "b": "SFT, 3 meta-tasks",
    "c": "SFT, 5 meta-tasks",
    "d": "SFT, full Meta-CoT",
    "e": "SFT, Meta-CoT without task thinking",
    "f": "(d) + Flow-GRPO, early window",
    "g": "(d) + Flow-GRPO, full trajectory, equal GPU time",
}
SFT_ARMS, GRPO_ARMS = ("a", "b", "c", "d", "e"), ("f", "g")
THREE_META = {"add", "remove", "replace", "recolour", "resize", "relabel", "count"}
COMPOSED = {"swap", "chain"}  # two Position Changes; whole multi-step chains
FIVE_META = THREE_META | {"move", "zoom", "pan"}


@dataclass
class AblationConfig:
    out: str = "runs/ablation"
    device: str = "cuda"  # "cuda" or "cpu"
    seed: int = 0
    models: str = ""  # a tiny pipeline folder to start every arm from ("" = build one into OUT/models)
    resolution: int = 32
    samples: int = 4000  # synthetic single edits (+ as many understanding samples)
    chains: int = 200  # 3-step edit chains (composed tasks)
    sft_steps: int = 1000
    sft_batch: int = 32
    sft_lr: float = 1e-3
    understanding_ratio: float = 0.25
    deepspeed: str = "none"  # Stage 1/2 DeepSpeed config (train.deepspeed); none: plain accelerate
    parallel: int = 5  # Stage 1 arms trained at once as separate processes (1 = in this process, one by one)
    grpo_iterations: int = 60
    grpo_group: int = 8
    grpo_prompts: int = 8
    grpo_lr: float = 1e-3
    rollout_steps: int = 8
    window_size: int = 2
    window_max: int = 4
    eval_every: int = 10  # GRPO held-out evaluation every N iterations (the held-out curves)
    eval_samples: int = 200  # held-out test edits per split (single, composed)
    eval_steps: int = 16
    eval_batch: int = 64  # edits sampled (and CoTs written) per batch at evaluation
    max_cot_tokens: int = 384  # generation budget of a written Meta-CoT (GRPO rollouts and evaluation)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    # Further Stage 2 overrides (GRPOConfig keys) for arms f and g, e.g. ["judge.min_scored_share=0"].
    grpo_extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.device in {"cpu", "cuda"}, "device", "use cpu or cuda")
        check(set(self.arms) <= set(ARMS), "arms", f"choose among {', '.join(ARMS)}")
        check(not (set(self.arms) & set(GRPO_ARMS)) or "d" in self.arms, "arms",
              "f and g start from arm d's Stage 1 model: include d")
        check(self.resolution % 16 == 0, "resolution", "must be a multiple of 16")
        check(self.parallel >= 1, "parallel", "must be >= 1")


# -- data ------------------------------------------------------------------------------------------------------------

def arm_rows(rows: list[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    """The training records of a Stage 1 arm (understanding records are kept in every arm)."""
    out = []
    for r in rows:
        if r["type"] != "edit":
            out.append(r)
        elif arm == "b" and r["category"] in THREE_META:
            out.append(r)
        elif arm == "c" and r["category"] in FIVE_META:
            out.append(r)
        elif arm in ("a", "d"):
            out.append(r)
        elif arm == "e":
            out.append({**r, "cot": {**r["cot"], "thinking": ""}})
    return out


def write_arm_data(data: Path) -> dict[str, Path]:
    """``data/train_<arm>.jsonl`` for every Stage 1 arm (beside train.jsonl, so image paths stay valid)."""
    rows = read_dicts(data / "train.jsonl")
    paths = {}
    for arm in SFT_ARMS:
        path = data / f"train_{arm}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in arm_rows(rows, arm)))
        paths[arm] = path
    return paths


def eval_splits(data: Path, per_split: int, resolution: int) -> dict[str, list[Any]]:
    """Held-out test edits: ``single`` (one meta-task) and ``composed`` (the generalisation split)."""
    from metacot.eval.runner import load_jsonl_suite

    samples = load_jsonl_suite(data / "test.jsonl", resolution=resolution)
    composed = [s for s in samples if s.category in COMPOSED]
    single = [s for s in samples if s.category not in COMPOSED]
    return {"single": single[:per_split], "composed": composed[:per_split]}


# -- stages ----------------------------------------------------------------------------------------------------------

def sft_overrides(q: AblationConfig, out: Path, arm: str, data: Path) -> list[str]:
    return [f"model={out / 'models' / 'pipeline'}", f"data.train={data}", f"output_dir={out / 'arms' / arm / 'sft'}",
            f"data.resolution={q.resolution}", f"train.max_steps={q.sft_steps}", f"batch_size={q.sft_batch}",
            f"micro_batch_size={q.sft_batch}", f"understanding.lr={q.sft_lr}", f"generation.lr={q.sft_lr}",
            f"data.understanding_ratio={q.understanding_ratio}", f"train.device={q.device}", f"train.seed={q.seed}",
            f"train.deepspeed={q.deepspeed}", "train.save_every=0", "train.log_every=10",
            "train.wandb_mode=disabled", "train.progress=false", *(["no_cot=true"] if arm == "a" else [])]


def grpo_overrides(q: AblationConfig, out: Path, arm: str, max_seconds: float = 0.0) -> list[str]:
    full = arm == "g"
    window = (q.rollout_steps, q.rollout_steps) if full else (q.window_size, q.window_max)
    samples = q.grpo_group * q.grpo_prompts
    return [f"model={out / 'arms' / 'd' / 'sft' / 'final'}", f"data.train={out / 'data' / 'train_d.jsonl'}",
            f"data.eval={out / 'data' / 'val.jsonl'}", f"output_dir={out / 'arms' / arm / 'grpo'}",
            f"data.resolution={q.resolution}", f"train.max_steps={q.grpo_iterations}",
            f"train.max_seconds={max_seconds}", f"train.device={q.device}", f"train.seed={q.seed}",
            f"train.deepspeed={q.deepspeed}", f"rollout.group_size={q.grpo_group}",
            f"rollout.prompts_per_iteration={q.grpo_prompts}", f"rollout.batch_size={samples}",
            f"rollout.num_steps={q.rollout_steps}", f"rollout.window_size={window[0]}",
            f"rollout.window_max={window[1]}", f"policy.micro_batch_size={samples // 2}", "policy.updates_per_epoch=2",
            f"generation.lr={q.grpo_lr}", f"eval.every={q.eval_every}", f"eval.num_steps={q.eval_steps}",
            f"eval.prompts={min(32, q.eval_samples)}", f"data.max_cot_tokens={q.max_cot_tokens}",
            "train.save_every=0", "train.wandb_mode=disabled", "train.progress=false", *q.grpo_extra]


def _sft(q: AblationConfig, out: Path, arm: str) -> None:
    from metacot.sft.config import SFTConfig
    from metacot.sft.trainer import train

    train(load_config(SFTConfig, "tiny", sft_overrides(q, out, arm, out / "data" / f"train_{arm}.jsonl"),
                      stage="sft"))


PROCESS_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker_env(parallel: int, environ: dict[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """The environment of one of ``parallel`` Stage 1 worker processes: the machine's cores split between them.

    Each PyTorch process otherwise starts one intra-op thread per core; ``parallel`` of them during the host-side
    preprocessing oversubscribe the CPU (on the H200 machine two such processes printed nothing past model loading
    in 545 s, where one alone preprocessed the same data in 75 s: benchmarks/NOTES.md, session 4). A thread count
    the user set (``OMP_NUM_THREADS``) is kept. The process-group variables of this process (``RANK``,
    ``MASTER_PORT``, ...: set once an in-process run has started) are left out: each worker is its own world of one
    and picks its own port; inherited, two workers bound the same port (EADDRINUSE).
    """
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in PROCESS_GROUP_VARS}
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, (cpus or os.cpu_count() or 1) // parallel))
    return env


def run_sft_arms(q: AblationConfig, out: Path, arms: list[str]) -> dict[str, float]:
    """Stage 1 of ``arms`` (those without a complete final/), ``q.parallel`` at a time; returns wall seconds each."""
    todo = [a for a in arms if not is_complete(out / "arms" / a / "sft" / "final")]
    seconds: dict[str, float] = {}
    if q.parallel == 1:
        for arm in todo:
            t0 = time.perf_counter()
            _sft(q, out, arm)
            seconds[arm] = time.perf_counter() - t0
        return seconds
    running: list[tuple[str, subprocess.Popen, Any, float]] = []
    failed = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < q.parallel:
            arm = queue.pop(0)
            log = out / "arms" / arm / "sft.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "metacot.experiments.ablation", "--sft-arm", arm, "--config",
                   str(out / "ablation.yaml")]
            handle = open(log, "w")
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=worker_env(q.parallel))
            running.append((arm, proc, handle, time.perf_counter()))
        for item in list(running):
            arm, proc, handle, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                handle.close()
                seconds[arm] = time.perf_counter() - t0
                if proc.returncode:
                    failed.append(arm)
        time.sleep(0.5)
    if failed:
        raise RuntimeError(f"Stage 1 of arm(s) {', '.join(failed)} failed; see "
                           + ", ".join(str(out / "arms" / a / "sft.log") for a in failed))
    return seconds


def run_grpo_arms(q: AblationConfig, out: Path, arms: list[str]) -> None:
    """(f) first; (g) then gets (f)'s summed iteration seconds as its time budget (equal GPU time)."""
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import train

    budget = 0.0
    for arm in ("f", "g"):
        if arm not in arms:
            continue
        if arm == "g":
            budget = grpo_seconds(out / "arms" / "f" / "grpo") if "f" in arms else 0.0
        if not is_complete(out / "arms" / arm / "grpo" / "final"):
            train(load_config(GRPOConfig, "tiny", grpo_overrides(q, out, arm, budget), stage="grpo"))


def grpo_seconds(run: Path) -> float:
    """Summed iteration seconds of a GRPO run (its last ``train_seconds``)."""
    rows = read_dicts(run / "metrics.jsonl", torn_tail="drop")
    return max((r["train_seconds"] for r in rows if "train_seconds" in r), default=0.0)


def arm_model(out: Path, arm: str) -> Path:
    return out / "arms" / arm / ("grpo" if arm in GRPO_ARMS else "sft") / "final"


def evaluate_arms(q: AblationConfig, out: Path, arms: list[str]) -> dict[str, Any]:
    """Every arm and the baselines on both held-out splits; returns {split: results}."""
    from metacot.eval.runner import run_eval

    results = {}
    for split, samples in eval_splits(out / "data", q.eval_samples, q.resolution).items():
        if not samples:
            continue
        for arm in arms:
            results[split] = run_eval(arm_model(out, arm), samples, out / "eval" / split, num_steps=q.eval_steps,
                                      cot_source="model", no_cot=arm == "a", method=arm, seed=q.seed,
                                      batch_size=q.eval_batch, device=q.device, max_cot_tokens=q.max_cot_tokens)
    return results


def run_ablation(q: AblationConfig) -> Path:
    """Every stage above into ``q.out``; returns the report's path."""
    from data_recipes.synth import generate
    from metacot.experiments.ablation_report import write_report
    from metacot.models.tiny import build_tiny_editing_model

    out = Path(q.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.yaml").write_text(to_yaml(q))
    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    if not is_complete(out / "models" / "pipeline"):
        if q.models:
            import shutil

            shutil.copytree(q.models, out / "models" / "pipeline")
        else:
            build_tiny_editing_model(out / "models" / "pipeline", resolution=q.resolution, seed=q.seed)
    if not is_complete(out / "data"):
        generate(out / "data", q.samples, q.seed, resolution=q.resolution, chains=q.chains, chain_length=3)
    write_arm_data(out / "data")
    timings["setup"] = time.perf_counter() - t0
    sft_arms = [a for a in SFT_ARMS if a in q.arms or (a == "d" and set(GRPO_ARMS) & set(q.arms))]
    t = time.perf_counter()
    timings["sft_arm_seconds"] = run_sft_arms(q, out, sft_arms)
    timings["sft"] = time.perf_counter() - t
    t = time.perf_counter()
    run_grpo_arms(q, out, q.arms)
    timings["grpo"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_arms(q, out, q.arms)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    report = write_report(out, q, timings)
    print(f"[ablation] done in {timings['total'] / 60:.1f} min. Report: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metacot experiment ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu_mini", help="gpu_mini (one GPU) or toy (CPU); see metacot/configs/")
    parser.add_argument("--config", default=None, help="a YAML file instead of a preset")
    parser.add_argument("--sft-arm", default=None, help=argparse.SUPPRESS)  # the worker of one parallel arm
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. sft_steps=2000 arms=[a,d,f]")
    args = parser.parse_args(argv)
    try:
        q = load_config(AblationConfig, args.config or f"ablation_{args.preset}", args.overrides)
    except ValueError as exc:
        print(f"metacot experiment ablation: {exc}", file=sys.stderr)
        return 2
    if q.device == "cpu":
        import torch

        torch.set_num_threads(1)
    if args.sft_arm:
        _sft(q, Path(q.out).resolve(), args.sft_arm)
        return 0
    run_ablation(q)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
