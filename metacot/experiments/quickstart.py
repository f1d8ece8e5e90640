"""``metacot quickstart``: the whole method end to end on tiny local models, then a report people can look at.

Stages (each a call into the same library functions the real commands use; a finished stage is reused when the
command is run again, so an interrupted quickstart resumes):

1. ``models``: tiny Qwen2.5-VL + QwenImage edit pipeline (the VAE trained to reconstruct synthetic scenes);
2. ``data``: synthetic Meta-CoT edits with exact ground truth (all meta-tasks, dependent chains), splits;
3. ``sft``: Stage 1 of both experts (DeepSpeed ZeRO-2, in-process), then ``sft_nocot``: the no-CoT baseline
   (instruction only, same data and steps);
4. ``calibration``: the rule-based CEC judge against SIMULATED annotators (derived from the ground truth by a
   pixel measurement, not from the judge), plus the vLLM judge when ``judge.url`` is set;
5. ``grpo``: Stage 2 Flow-GRPO on early steps with the CEC rule reward (the calibration gate applies to VLM judges);
   the SFT model's understanding expert writes each prompt's Meta-CoT (``cot_source``; ``oracle``: the dataset's);
6. ``export``: the aligned checkpoint as plain diffusers + transformers folders, verified in a fresh process;
7. ``eval``: the no-CoT baseline, SFT and GRPO on the held-out test split against the copy and erase baselines, each
   model conditioned on the Meta-CoT its own understanding expert writes (``cot_source=oracle``: the dataset's; the
   rows are then named "sft (oracle CoT)", "grpo (oracle CoT)");
8. ``report``: ``OUT/report/index.html``.

Launch: ``make quickstart`` (CPU, 32 px defaults, budget 15 minutes on 2 cores), ``metacot quickstart --device cuda``
(bigger defaults), or ``metacot quickstart --config my.yaml key=value`` (copy ``metacot/configs/quickstart.yaml``).
Left out: real weights (see the README for the real-scale commands the report prints).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from metacot.config import check, load_config, to_yaml
from metacot.run import is_complete


@dataclass
class QuickJudge:
    url: str = ""  # a running `metacot reward serve` judge to calibrate as well ("" = rule judge only)
    model: str = ""
    prompts: list[str] = field(default_factory=lambda: ["cec_v1", "cec_v2"])


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    device: str = "cpu"  # "cpu" or "cuda" (the gpu preset raises sizes)
    seed: int = 0
    resolution: int = 32
    samples: int = 2000  # synthetic single edits (+ as many understanding samples)
    chains: int = 60  # edit chains of 3 steps (half with injected dependencies)
    sft_steps: int = 300
    sft_batch: int = 32
    sft_lr: float = 1e-3
    grpo_iterations: int = 40
    grpo_group: int = 8
    grpo_prompts: int = 4  # prompts per GRPO iteration
    grpo_lr: float = 3e-3
    rollout_steps: int = 8
    window_size: int = 2
    window_max: int = 4
    eval_steps: int = 16
    eval_samples: int = 48  # test-split edits evaluated (before vs after)
    calibration_samples: int = 88  # demo samples labelled by simulated annotators (8 per degradation kind)
    # Whose Meta-CoT conditions GRPO and eval: "model" (the method: the model's understanding expert writes it) or
    # "oracle" (the dataset's; an upper bound). A tiny SFT VLM often writes CoTs that do not parse: GRPO counts them
    # (cot_unparsed in grpo/metrics.jsonl) and the rule judge gives them no score, so such prompts teach nothing.
    cot_source: str = "model"
    judge: QuickJudge = field(default_factory=QuickJudge)
    # Further Stage 2 overrides (GRPOConfig keys), e.g. ["judge.min_scored_share=0"] to let GRPO run although a
    # briefly trained Stage 1 writes CoTs that the rule judge cannot score (a real run stops: README, "A run that
    # scores nothing fails").
    grpo_extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.device in {"cpu", "cuda"}, "device", "use cpu or cuda")
        check(self.resolution % 16 == 0, "resolution", "must be a multiple of 16")
        check(self.sft_steps > 0 and self.grpo_iterations > 0, "sft_steps / grpo_iterations", "must be > 0")
        check(self.cot_source in {"model", "oracle"}, "cot_source", "use model or oracle")


def _stage(name: str, done: bool, fn: Callable[[], Any], log: list[dict[str, Any]]) -> None:
    start = time.perf_counter()
    if done:
        print(f"[quickstart] {name}: already complete, reused")
    else:
        print(f"[quickstart] {name} ...", flush=True)
        fn()
    seconds = time.perf_counter() - start
    log.append({"stage": name, "seconds": round(seconds, 1), "reused": done})
    print(f"[quickstart] {name}: {seconds:.1f} s", flush=True)


def sft_overrides(q: QuickstartConfig, out: Path, name: str = "sft") -> list[str]:
    return [f"model={out / 'models' / 'pipeline'}", f"data.train={out / 'data' / 'train.jsonl'}",
            f"output_dir={out / name}", f"data.resolution={q.resolution}", f"train.max_steps={q.sft_steps}",
            f"batch_size={q.sft_batch}", f"micro_batch_size={q.sft_batch}", f"understanding.lr={q.sft_lr}",
            f"generation.lr={q.sft_lr}", f"train.device={q.device}", f"train.seed={q.seed}",
            f"train.save_every={max(1, q.sft_steps // 2)}", "train.wandb_mode=offline"]


def grpo_overrides(q: QuickstartConfig, out: Path) -> list[str]:
    return [f"model={out / 'sft' / 'final'}", f"data.train={out / 'data' / 'train.jsonl'}",
            f"data.eval={out / 'data' / 'val.jsonl'}", f"output_dir={out / 'grpo'}",
            f"data.resolution={q.resolution}", f"data.cot_source={q.cot_source}",
            f"train.max_steps={q.grpo_iterations}", f"train.device={q.device}",
            f"train.seed={q.seed}", f"rollout.group_size={q.grpo_group}",
            f"rollout.prompts_per_iteration={q.grpo_prompts}", f"rollout.batch_size={q.grpo_group * q.grpo_prompts}",
            f"rollout.num_steps={q.rollout_steps}", f"rollout.window_size={q.window_size}",
            f"rollout.window_max={q.window_max}", f"policy.micro_batch_size={q.grpo_group * q.grpo_prompts // 2}",
            "policy.updates_per_epoch=2", f"generation.lr={q.grpo_lr}",
            f"eval.every={max(1, q.grpo_iterations // 5)}", f"eval.num_steps={q.eval_steps}",
            f"train.save_every={max(1, q.grpo_iterations // 2)}", "train.wandb_mode=offline", *q.grpo_extra]


def calibrate_rule_judge(q: QuickstartConfig, out: Path) -> None:
    """Demo samples -> simulated human labels -> rule-judge scores -> calibration report (+ vLLM judge if set)."""
    from data_recipes.demo_samples import write_demo_samples
    from rewards.calibration import calibrate, score_with_reward, score_with_server, write_report
    from rewards.labeling import load_labels
    from rewards.rule_judge import CECRuleJudge
    from rewards.simulated import simulate_labels

    work = out / "calibration_work"
    shutil.rmtree(work, ignore_errors=True)
    # 64 px: the rule judge reads objects more reliably there than at 32 (it is resolution-agnostic otherwise).
    samples = write_demo_samples(work / "samples", q.calibration_samples, resolution=64, seed=q.seed)
    simulate_labels(samples, work / "labels.jsonl", n_annotators=3, seed=q.seed)
    items = load_labels(work / "labels.jsonl")
    scores = {"cec_rule": score_with_reward(list(items.values()), CECRuleJudge())}
    if q.judge.url:
        scores.update(score_with_server(list(items.values()), q.judge.url, q.judge.prompts, q.judge.model))
    report = calibrate(items, scores, judge_model="cec_rule" if not q.judge.url else q.judge.model)
    write_report(report, out / "calibration", scores)


def run_quickstart(q: QuickstartConfig) -> Path:
    """Run every stage (module docstring) into ``q.out``; returns the report's path."""
    from data_recipes.synth import generate
    from metacot.eval.runner import load_jsonl_suite, method_label, run_eval
    from metacot.export.exporter import export_run
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import train as grpo_train
    from metacot.models.tiny import build_tiny_editing_model
    from metacot.experiments.quickstart_report import write_report
    from metacot.sft.config import SFTConfig
    from metacot.sft.trainer import train as sft_train

    if q.device == "cpu":
        import torch

        # Tiny models on a small CPU: one intra-op thread is faster, and far faster when other processes compete
        # (OpenMP threads spin-waiting on a shared core were measured ~10x slower).
        torch.set_num_threads(1)
    out = Path(q.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.yaml").write_text(to_yaml(q))
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    _stage("models", is_complete(out / "models" / "pipeline"),
           lambda: build_tiny_editing_model(out / "models" / "pipeline", resolution=q.resolution, seed=q.seed), log)
    _stage("data", is_complete(out / "data"),
           lambda: generate(out / "data", q.samples, q.seed, resolution=q.resolution, chains=q.chains,
                            chain_length=3), log)
    _stage("sft", is_complete(out / "sft" / "final"),
           lambda: sft_train(load_config(SFTConfig, "tiny", sft_overrides(q, out), stage="sft")), log)
    # The no-CoT baseline (the paper's Train-Editing-Only): same data, steps and models, instruction only.
    _stage("sft_nocot", is_complete(out / "sft_nocot" / "final"),
           lambda: sft_train(load_config(SFTConfig, "tiny", [*sft_overrides(q, out, "sft_nocot"), "no_cot=true"],
                                         stage="sft")), log)
    _stage("calibration", (out / "calibration" / "calibration.json").is_file(),
           lambda: calibrate_rule_judge(q, out), log)
    _stage("grpo", is_complete(out / "grpo" / "final"),
           lambda: grpo_train(load_config(GRPOConfig, "tiny", grpo_overrides(q, out), stage="grpo")), log)
    _stage("export", is_complete(out / "export"),
           lambda: export_run(out / "grpo", out / "export", dtype="fp32", check_against_run=out / "grpo",
                              overwrite=True), log)

    def evaluate() -> None:
        samples = load_jsonl_suite(out / "data" / "test.jsonl")[: q.eval_samples]
        for method, model in (("sft_nocot", out / "sft_nocot" / "final"), ("sft", out / "sft" / "final"),
                              ("grpo", out / "export")):
            run_eval(model, samples, out / "eval", num_steps=q.eval_steps, method=method, seed=q.seed,
                     device=q.device, cot_source=q.cot_source)

    names = ("sft_nocot", *(method_label(m, q.cot_source) for m in ("sft", "grpo")))
    _stage("eval", (out / "eval" / "results.json").is_file() and _has_methods(out / "eval", names), evaluate, log)
    total = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps({"stages": log, "total_seconds": round(total, 1)}, indent=2))
    report = write_report(out, q, log, total)
    print(f"[quickstart] done in {total / 60:.1f} min. Report: {report}")
    return report


def _has_methods(eval_dir: Path, methods: tuple[str, ...]) -> bool:
    results = json.loads((eval_dir / "results.json").read_text())
    return all(m in results["methods"] for m in methods)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metacot quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML (default: the quickstart preset for the device)")
    parser.add_argument("--out", default=None, help="output folder (default runs/quickstart)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. sft_steps=100")
    args = parser.parse_args(argv)
    preset = args.config or ("quickstart_gpu" if args.device == "cuda" else "quickstart")
    extra = [*args.overrides] + ([f"out={args.out}"] if args.out else []) + \
        ([f"device={args.device}"] if args.device else [])
    try:
        q = load_config(QuickstartConfig, preset, extra)
    except ValueError as exc:
        print(f"metacot quickstart: {exc}", file=sys.stderr)
        return 2
    run_quickstart(q)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
