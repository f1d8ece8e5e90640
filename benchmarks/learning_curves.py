"""Learning curves of Stage 1 on tiny models: loss, sampled-edit quality and CoT writing against the step.

The presets' learning rates, step counts and noise-level sampling are chosen from these curves (README, "Presets
that learn"). Each variant trains with the library's own ``metacot.sft.trainer.setup`` / ``train_step`` and, at the
listed steps, samples edits through the inference path (``metacot.models.sampler.edit``, deterministic ODE, CFG 1)
with the model writing its own Meta-CoT (``metacot.understanding.write_cots``, greedy), on the training subset and on
held-out edits. Measures: PSNR and ``sim_changed`` against the ground-truth target (``metacot.eval.metrics``), the
share of written CoTs equal to the dataset's (verbatim) and the share that parse.

Run (CPU or one GPU; ``--models`` is a ``metacot models tiny`` pipeline folder, built when missing)::

    python benchmarks/learning_curves.py --device cuda --out $OUT --models /tmp/tiny/pipeline \
        --variant name=overfit8,train=8,steps=1500,eval=100:300:600:1000:1500 \
        --variant name=old_sigma,train=8,steps=600,eval=300:600,sft.timestep_sampling=logit_normal,sft.timestep_shift=1

Variant keys: ``name``, ``train`` (edit records trained on: 8 = the overfit set with an identity edit, else the
first N training edits), ``steps``, ``eval`` (steps to sample at, ``:``-separated), ``heldout`` (held-out edits
sampled, default 16), ``res`` (resolution, default 32), ``batch``, ``seconds`` (stop after this much training time,
evaluation excluded, then evaluate once more), ``final`` (1: write the run's ``final/`` model folder at the end, as
``metacot sft`` does, for a Stage 2 run or ``metacot eval`` to start from); ``sft.KEY=VALUE`` is passed to the SFT
config.
Writes ``OUT/learning_curves.json`` and a grid PNG per variant (``grid_NAME.png``: source / edit / target rows for
the training subset, then held-out), both rewritten after every evaluation, so a run stopped at its time limit
keeps its last evaluation's samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_recipes.overfit_set import write_overfit_set  # noqa: E402


def parse_variant(text: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"train": 8, "steps": 300, "eval": "", "heldout": 16, "res": 32, "batch": 8, "sft": []}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.startswith("sft."):
            spec["sft"].append(f"{key[4:]}={value}")
        elif key in ("train", "steps", "heldout", "res", "batch", "final"):
            spec[key] = int(value)
        elif key == "seconds":
            spec[key] = float(value)
        else:
            spec[key] = value
    spec["eval"] = [int(x) for x in str(spec["eval"]).split(":") if x] or [spec["steps"]]
    spec.setdefault("name", text)
    return spec


def evaluate(state: Any, sets: dict[str, list[Any]], res: int, grid: Path | None) -> dict[str, float]:
    """Sample every set through the inference path with model-written CoTs; mean measures per set."""
    from metacot.eval.metrics import edit_scores
    from metacot.eval.scene_metrics import instruction_consistency
    from metacot.models.conditioning import build_prompt
    from metacot.models.sampler import edit
    from metacot.understanding import fit_to_budget, write_cots

    experts = state.accelerator.unwrap_model(state.experts)
    model = dataclasses.replace(state.base, vlm=experts.vlm, transformer=experts.transformer)
    experts.eval()
    out: dict[str, float] = {}
    images_all = []
    try:
        for name, samples in sets.items():
            written = [None] * len(samples)
            if not state.cfg.no_cot:
                written = write_cots(model.vlm, model.processor, [s.source for s in samples],
                                     [s.instruction for s in samples], max_new_tokens=300)
                out[f"{name}_cot_verbatim"] = sum(w.text == s.cot_text for w, s in zip(written, samples)) / len(samples)
                out[f"{name}_cot_parsed"] = sum(w.parsed.cot is not None for w in written) / len(samples)
            # A rambling CoT is cut to the condition budget, as metacot eval and the GRPO rollouts do (counted).
            fitted = [None if w is None else fit_to_budget(model.processor, s.instruction, w.text)
                      for s, w in zip(samples, written)]
            if not state.cfg.no_cot:
                out[f"{name}_cot_cut"] = sum(f[1] for f in fitted) / len(samples)
            prompts = [build_prompt(s.instruction, None if f is None else (f[0] or None))
                       for s, f in zip(samples, fitted)]
            gens = [torch.Generator().manual_seed(k) for k in range(len(samples))]
            with torch.no_grad():
                images = edit(model, [s.source for s in samples], prompts, height=res, width=res, num_steps=16,
                              cfg_scale=1.0, generator=gens)
            scores = [edit_scores(img, s.source, s.target) | instruction_consistency(
                img, s.source, s.target, s.record.scene_before, s.record.scene_after,
                whole_view="Camera Motion" in s.meta_tasks) for img, s in zip(images, samples)]
            for key in ("psnr", "sim_changed", "sim_kept", "ins", "con"):
                vals = [x[key] for x in scores if x[key] is not None and x[key] == x[key]]
                out[f"{name}_{key}"] = sum(vals) / max(1, len(vals))
            single = [x["ins"] for x, s in zip(scores, samples) if len(s.meta_tasks) == 1 and x["ins"] is not None]
            out[f"{name}_ins_single"] = sum(single) / max(1, len(single))  # the bar: single meta-tasks
            out[f"{name}_n_single"] = len(single)
            images_all.append((samples[:8], images[:8]))
    finally:
        experts.train()
    if grid is not None:
        _grid(images_all, res, grid)
    return out


def _grid(rows: list[tuple[list[Any], list[Any]]], res: int, path: Path) -> None:
    from PIL import Image

    width = max(len(s) for s, _ in rows)
    canvas = Image.new("RGB", (width * res, 3 * res * len(rows)), "white")
    for r, (samples, images) in enumerate(rows):
        for c, (s, img) in enumerate(zip(samples, images)):
            for k, im in enumerate((s.source, img, s.target)):
                canvas.paste(im.resize((res, res)), (c * res, (3 * r + k) * res))
    canvas.resize((canvas.width * 4, canvas.height * 4), 0).save(path)


def run_variant(spec: dict[str, Any], args: argparse.Namespace, results: dict[str, Any]) -> None:
    from metacot.config import load_config
    from metacot.eval.runner import load_jsonl_suite
    from metacot.sft import trainer as T
    from metacot.sft.config import SFTConfig
    from metacot.training import release_accelerator

    res = spec["res"]
    work = Path(args.work or Path(args.out) / "work")
    root = work / spec["name"]
    data = _dataset(work / f"synth{res}", res, max(spec["train"], 64) * 2)
    train_file = write_overfit_set(data, root / "data") if spec["train"] == 8 else _first_edits(data, spec["train"])
    cfg = load_config(SFTConfig, "tiny", [
        f"model={args.models}", f"data.train={train_file}", f"output_dir={root / 'run'}", f"data.resolution={res}",
        f"train.max_steps={spec['steps']}", f"batch_size={spec['batch']}", f"micro_batch_size={spec['batch']}",
        f"train.device={args.device}", "train.wandb_mode=disabled", "train.progress=false", "train.save_every=0",
        "train.log_every=10", "train.resume=false", "train.deepspeed=none",  # one process: the plain loop
        *spec["sft"]], stage="sft")
    sets = {"train": load_jsonl_suite(train_file, resolution=res)[:8],
            "heldout": load_jsonl_suite(data / "test.jsonl", resolution=res)[:spec["heldout"]]}
    t_setup = time.perf_counter()
    state = T.setup(cfg)
    print(json.dumps({"variant": spec["name"], "setup_seconds": round(time.perf_counter() - t_setup, 1)}), flush=True)
    entry: dict[str, Any] = {"spec": {k: v for k, v in spec.items()}, "curve": []}
    results[spec["name"]] = entry
    t0 = time.perf_counter()
    losses: list[dict[str, float]] = []
    train_s, evaluated = 0.0, -1
    try:
        while state.step < spec["steps"]:
            losses.append(T.train_step(state))
            train_s += time.perf_counter() - t0
            out_of_time = spec.get("seconds", 0) > 0 and train_s >= spec["seconds"]
            if state.step in spec["eval"] or out_of_time or state.step == spec["steps"]:
                _evaluate_row(state, spec, entry, sets, losses, train_s, res, args, results)
                evaluated = state.step
            if out_of_time:
                break
            t0 = time.perf_counter()  # evaluation time is not training time
        if evaluated != state.step:
            _evaluate_row(state, spec, entry, sets, losses, train_s, res, args, results)
        if spec.get("final"):
            from metacot.final import save_final

            entry["final"] = str(save_final(state))
            print(json.dumps({"variant": spec["name"], "final": entry["final"]}), flush=True)
    finally:
        state.run.close()
        release_accelerator(state.accelerator)


def _evaluate_row(state: Any, spec: dict[str, Any], entry: dict[str, Any], sets: dict[str, list[Any]],
                  losses: list[dict[str, float]],
                  train_s: float, res: int, args: argparse.Namespace, results: dict[str, Any]) -> None:
    recent = losses[-10:]
    row = {"step": state.step, "train_seconds": round(train_s, 1),
           "s_per_step": round(train_s / max(1, len(losses)), 4),
           **{k: sum(m.get(k, 0.0) for m in recent) / len(recent) for k in ("loss_und", "loss_gen")},
           **evaluate(state, sets, res, Path(args.out) / f"grid_{spec['name']}.png")}
    entry["curve"].append(row)
    print(json.dumps({"variant": spec["name"], **{k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in row.items()}}), flush=True)
    (Path(args.out) / "learning_curves.json").write_text(json.dumps(results, indent=2))


def _dataset(path: Path, res: int, n: int) -> Path:
    from data_recipes.synth import generate

    if not path.exists():
        generate(path, n, 0, resolution=res)
    return path


def _first_edits(data: Path, n: int) -> Path:
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    edits = [r for r in rows if r["type"] == "edit"][:n]
    und = [r for r in rows if r["type"] == "understanding"][:n]
    out = data / f"train_first{n}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in edits + und))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--models", required=True, help="tiny pipeline folder (built there when missing)")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--work", default=None, help="scratch folder for data and runs (default OUT/work)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--stack-dump", type=float, default=0,
                        help="every this many seconds, print every thread's stack to stderr (where a run hangs)")
    args = parser.parse_args()
    if args.stack_dump:
        import faulthandler

        faulthandler.dump_traceback_later(args.stack_dump, repeat=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not Path(args.models).is_dir():
        from metacot.models.tiny import build_tiny_editing_model

        build_tiny_editing_model(args.models, resolution=32, seed=0)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    for text in args.variant:
        spec = parse_variant(text)
        try:
            run_variant(spec, args, results)
        except Exception as exc:  # a failing variant is recorded and the next one runs
            results.setdefault(spec["name"], {})["error"] = repr(exc)
            print(f"variant {spec['name']} failed: {exc!r}", flush=True)
        (Path(args.out) / "learning_curves.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
