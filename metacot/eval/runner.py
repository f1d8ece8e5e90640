"""``metacot eval``: edit held-out samples with a model and score them against ground truth and baselines.

Per sample and method (the model, ``copy``, ``erase``) it records the ground-truth measures of
:mod:`metacot.eval.metrics`, the paper's columns of :mod:`metacot.eval.scene_metrics` (Ins, Con, Nat, Art; CoT
accuracy when given the CoT the model wrote) and, when a judge is configured, a judge score with a prompt *other
than* the training reward's (the reward itself is never the headline: it is what RL optimised, so it hides reward
hacking). Results are
appended to ``OUT/samples.jsonl`` as each batch finishes, so an interrupted evaluation resumes where it stopped;
``OUT/results.json`` and ``OUT/table.md`` hold the aggregates per meta-task and per category (with 95 % bootstrap
intervals for the paper's columns). Each model row holds ``cot_source`` and ``cot_text``: the
Meta-CoT the generator was conditioned on.

Whose Meta-CoT (``cot_source``): ``model`` (the default, the method) lets the model's own understanding expert
(:func:`metacot.understanding.load_understanding`) write it greedily from (source, instruction); ``oracle`` uses the
dataset's, an upper bound the deployed model never has, so those rows are named ``"<method> (oracle CoT)"``. A model
trained without CoT (``no_cot`` in its ``metacot.json``) writes none (``cot_source`` ``none``).

Suites plug in by name: :data:`SUITES` maps a name to a loader ``(path, split) -> list[EvalSample]``; ``jsonl`` reads
metacot's own records. Public benchmarks (GEdit-Bench, ImgEdit, RISEBench) are left for their own loaders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from metacot.cot import MetaTask, render
from metacot.cot.schema import EditRecord, load_records
from metacot.eval.metrics import BASELINES, baseline_image, edit_scores
from metacot.eval.scene_metrics import COT_MEASURES, SCENE_MEASURES, bootstrap_ci, cot_accuracy, instruction_consistency
from metacot.jsonl import append_rows, read_dicts
from metacot.models.conditioning import build_prompt

MEASURES = ("sim", "sim_changed", "sim_kept", "psnr")
# Measures that get 95 % bootstrap intervals (0/1 or [0, 1] per sample; see metacot.eval.scene_metrics).
CI_MEASURES = (*SCENE_MEASURES, *COT_MEASURES)
COT_SOURCES = ("model", "oracle")


def method_label(method: str, cot_source: str) -> str:
    """The name of a model's rows: ``method``, or ``"<method> (oracle CoT)"`` when conditioned on the dataset's
    Meta-CoT, so results.json, table.md and reports never pass an oracle number off as the model's own."""
    return f"{method} (oracle CoT)" if cot_source == "oracle" else method


@dataclass
class EvalSample:
    id: str
    source: Image.Image
    target: Image.Image | None
    instruction: str
    cot_text: str | None
    meta_tasks: tuple[str, ...]
    category: str
    record: Any  # the suite's own record (scenes etc.), passed to judges as extras


def load_jsonl_suite(path: str | Path, split: str | None = None, resolution: int | None = None) -> list[EvalSample]:
    """metacot's JSONL records (edit records only), optionally filtered by split and resized."""
    out = []
    for rec in load_records(path, check_images=True):
        if not isinstance(rec, EditRecord) or (split and rec.split != split):
            continue
        images = []
        for p in (rec.source_image, rec.target_image):
            with Image.open(p) as img:
                img = img.convert("RGB")
                images.append(img.resize((resolution, resolution)) if resolution else img)
        out.append(EvalSample(rec.id, images[0], images[1], rec.instruction,
                              render(rec.cot) if rec.cot is not None else None,
                              tuple(m.value for m in rec.meta_tasks), rec.category, rec))
    if not out:
        raise ValueError(f"{path}: no edit samples{f' in split {split!r}' if split else ''} to evaluate")
    return out


SUITES: dict[str, Callable[..., list[EvalSample]]] = {"jsonl": load_jsonl_suite}


def _done(path: Path) -> set[tuple[str, str]]:
    # A torn last line of a killed run is left out: that sample is recomputed (and the line cut by the next append).
    return {(row["id"], row["method"]) for row in read_dicts(path, torn_tail="drop", missing_ok=True)}


def _score_rows(method: str, samples: Sequence[EvalSample], images: Sequence[Image.Image],
                judge: Callable | None, image_dir: Path, cots: Sequence[str | None] | None = None
                ) -> list[dict[str, Any]]:
    """Save the images and score them; ``cots``: the Meta-CoT texts the generator was conditioned on (row field
    ``cot_text``; None for baselines), which the judge then checks the edit against (else the records' CoT)."""
    from metacot.cot import parse_lenient

    rows = []
    judge_scores: list[float | None] = [None] * len(samples)
    if judge is not None:
        from rewards.contract import RewardBatch

        recs = [s.record for s in samples]
        judge_cots = [getattr(r, "cot", None) for r in recs] if cots is None else \
            [None if c is None else (parse_lenient(c).cot or c) for c in cots]
        judge_scores = judge(RewardBatch(
            [s.source for s in samples], list(images), [s.instruction for s in samples], judge_cots,
            extras={"ids": [s.id for s in samples], "target_images": [s.target for s in samples],
                    "scene_before": [getattr(r, "scene_before", None) for r in recs],
                    "scene_after": [getattr(r, "scene_after", None) for r in recs]}))
    for k, (s, img, js) in enumerate(zip(samples, images, judge_scores)):
        path = image_dir / method / f"{s.id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        scores = edit_scores(img, s.source, s.target) if s.target is not None else {}
        if s.target is not None:
            scores |= instruction_consistency(img, s.source, s.target, getattr(s.record, "scene_before", None),
                                              getattr(s.record, "scene_after", None),
                                              whole_view=MetaTask.CAMERA_MOTION.value in s.meta_tasks)
        if cots is not None:
            truth = getattr(s.record, "cot", None)
            scores |= cot_accuracy(cots[k], truth) if truth is not None else {}
        rows.append({"id": s.id, "method": method, "meta_tasks": list(s.meta_tasks), "category": s.category,
                     "image": str(path.relative_to(image_dir.parent)), **scores, "judge": js,
                     "cot_text": None if cots is None else cots[k]})
    return rows


def run_eval(model_dir: str | Path | None, samples: Sequence[EvalSample], out: str | Path, *, num_steps: int = 20,
             cfg_scale: float = 1.0, batch_size: int = 16, seed: int = 0, no_cot: bool = False,
             cot_source: str = "model", judge: Callable | None = None, method: str = "model",
             device: str = "cpu", max_cot_tokens: int = 384) -> dict[str, Any]:
    """Evaluate ``model_dir`` (a pipeline folder: export or ``final/``) and the baselines on ``samples``.

    Args:
        model_dir: None evaluates the baselines only.
        cot_source: "model" lets the model's understanding expert write the Meta-CoT; "oracle" uses the records'
            (the rows are then named ``"<method> (oracle CoT)"``, see :func:`method_label`).
        judge: a reward-contract callable scored on every output (configure it with a prompt different from the
            training reward's).
        method: the name of the model's rows (e.g. "sft", "grpo") so several models can share one output folder.
        max_cot_tokens: generation budget of a written Meta-CoT.

    Raises:
        ValueError: ``cot_source`` is neither model nor oracle.

    Returns:
        The aggregate results (also written to ``OUT/results.json`` and ``OUT/table.md``).
    """
    if cot_source not in COT_SOURCES:
        raise ValueError(f"cot_source={cot_source!r}: use model (the model writes its Meta-CoT) or oracle (the "
                         f"dataset's)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "samples.jsonl"
    done = _done(cache)
    for name in BASELINES:
        todo = [s for s in samples if (s.id, name) not in done and s.target is not None]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            images = [baseline_image(name, s.source, s.target, scene_before=getattr(s.record, "scene_before", None),
                                     scene_after=getattr(s.record, "scene_after", None)) for s in chunk]
            append_rows(cache, [{**row, "cot_source": None} for row in _score_rows(name, chunk, images, judge,
                                                                             out / "images")])
    if model_dir is not None:
        from metacot.facts import prompt_options
        from metacot.understanding import describe_model_folder

        no_cot = no_cot or prompt_options(describe_model_folder(model_dir).meta)["no_cot"]  # no-CoT models write none
        method = method if no_cot else method_label(method, cot_source)
        todo = [s for s in samples if (s.id, method) not in done]
        if todo:
            _eval_model(model_dir, todo, out, cache, num_steps=num_steps, cfg_scale=cfg_scale, batch_size=batch_size,
                        seed=seed, cot_source="none" if no_cot else cot_source, judge=judge, method=method,
                        device=device, max_cot_tokens=max_cot_tokens)
    results = aggregate(read_dicts(cache, torn_tail="drop"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(format_table(results) + "\n" + format_paper_table(results))
    return results


def _eval_model(model_dir: str | Path, todo: Sequence[EvalSample], out: Path, cache: Path, *, num_steps: int,
                cfg_scale: float, batch_size: int, seed: int, cot_source: str, judge: Callable | None,
                method: str, device: str, max_cot_tokens: int) -> None:
    from tqdm.auto import tqdm

    from metacot.export.edit import load_model
    from metacot.models.sampler import edit
    from metacot.understanding import fit_to_budget, write_cots

    loaded = load_model(model_dir, device=device, dtype=torch.float32)
    model, include, source = loaded.model, loaded.options["include_instruction"], cot_source
    size = todo[0].source.size
    for i in tqdm(range(0, len(todo), batch_size), desc=f"eval {method}", dynamic_ncols=True):
        chunk = todo[i:i + batch_size]
        cots: list[str | None] = [None] * len(chunk)
        if source == "oracle":
            cots = [s.cot_text for s in chunk]
        elif source == "model":
            written = write_cots(loaded.und_vlm, loaded.und_processor, [s.source for s in chunk],
                                 [s.instruction for s in chunk], max_new_tokens=max_cot_tokens)
            # Too long for the condition budget: conditioned on (and recorded as) its longest fitting prefix.
            cots = [fit_to_budget(model.processor, s.instruction, w.text, include_instruction=include)[0]
                    for s, w in zip(chunk, written)]
        # An empty written CoT leaves the instruction alone (the row keeps the empty text it wrote).
        usable = [c if c and c.strip() else None for c in cots]
        prompts = [build_prompt(s.instruction, c, include_instruction=include or c is None)
                   for s, c in zip(chunk, usable)]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i + k) for k in range(len(chunk))]
        images = edit(model, [s.source for s in chunk], prompts, height=size[1], width=size[0], num_steps=num_steps,
                      cfg_scale=cfg_scale, generator=gens, source_area=loaded.source_area)
        rows = _score_rows(method, chunk, images, judge, out / "images", cots=cots)
        append_rows(cache, [{**row, "cot_source": source} for row in rows])


def trained_source_area(model_dir: str | Path) -> int:
    """``data.source_area`` the model at ``model_dir`` trained with: from its facts (a run's ``final/``, an export or
    an export's ``pipeline/`` folder); 0 (the output size) for a plain pipeline folder."""
    from metacot.facts import source_area
    from metacot.understanding import describe_model_folder

    return source_area(describe_model_folder(model_dir).meta)


def _mean(values: Sequence[Any]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def aggregate(rows: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Means of every measure per method: overall, per meta-task and per category (with counts).

    Every group also holds ``ci``: measure -> ``{"n", "mean", "lo", "hi"}``, a 95 % percentile bootstrap interval
    (1000 resamples, ``seed``) for each of :data:`CI_MEASURES` (n counts the samples that have the measure).
    """
    methods: dict[str, Any] = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"n": len(mine), "overall": _means(mine, seed), "meta_task": {}, "category": {}}
        for task in sorted({t for r in mine for t in r["meta_tasks"]}):
            group = [r for r in mine if task in r["meta_tasks"]]
            entry["meta_task"][task] = {"n": len(group), **_means(group, seed)}
        for cat in sorted({r["category"] for r in mine}):
            group = [r for r in mine if r["category"] == cat]
            entry["category"][cat] = {"n": len(group), **_means(group, seed)}
        methods[method] = entry
    return {"methods": methods, "measures": [*MEASURES, *CI_MEASURES, "judge"]}


def _means(rows: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    means: dict[str, Any] = {m: _mean([r.get(m) for r in rows]) for m in (*MEASURES, *CI_MEASURES, "judge")}
    means["ci"] = {}
    for m in CI_MEASURES:
        values = [r[m] for r in rows if r.get(m) is not None and not math.isnan(r[m])]
        lo, hi = bootstrap_ci(values, seed)
        means["ci"][m] = {"n": len(values), "mean": means[m], "lo": lo, "hi": hi}
    return means


def format_table(results: dict[str, Any], measure: str = "sim_changed") -> str:
    """Markdown table: rows = meta-tasks (+ overall), columns = methods, cells = ``measure``."""
    methods = results["methods"]
    names = list(methods)
    tasks = sorted({t for m in methods.values() for t in m["meta_task"]})

    def cell(entry: dict[str, Any] | None) -> str:
        value = None if entry is None else entry.get(measure)
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{measure} (higher is better; ground truth: changed pixels only)", "",
             "| meta-task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(cell(methods[n]["meta_task"].get(task)) for n in names) + " |")
    lines.append("| **overall** | " + " | ".join(cell(methods[n]["overall"]) for n in names) + " |")
    return "\n".join(lines) + "\n"


PAPER_COLUMNS = (("Ins", "ins"), ("Con", "con"), ("Nat", "nat"), ("Art", "art"), ("CoT acc", "cot_acc"))


def _ci_cell(group: dict[str, Any] | None, measure: str) -> str:
    ci = None if group is None else group.get("ci", {}).get(measure)
    if ci is None or ci["mean"] is None:
        return "-"
    return f"{ci['mean']:.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}]"


def format_paper_table(results: dict[str, Any]) -> str:
    """Markdown tables laid out like the paper's ablation: one row per method with Ins / Con / Nat / Art / CoT acc
    (mean [95 % bootstrap interval]), then Ins per meta-task and per category (rows) and method (columns)."""
    methods = results["methods"]
    names = list(methods)
    lines = ["Ground-truth columns (all higher is better; mean [95 % bootstrap interval]; see README "
             "'Evaluation columns')", "", "| method | n | " + " | ".join(c for c, _ in PAPER_COLUMNS) + " |",
             "|---" * (len(PAPER_COLUMNS) + 2) + "|"]
    for name in names:
        overall = methods[name]["overall"]
        lines.append(f"| {name} | {methods[name]['n']} | "
                     + " | ".join(_ci_cell(overall, m) for _, m in PAPER_COLUMNS) + " |")
    for level, title in (("meta_task", "meta-task"), ("category", "category")):
        keys = sorted({k for m in methods.values() for k in m[level]})
        lines += ["", f"Ins per {title}", "", f"| {title} | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(_ci_cell(methods[n][level].get(key), "ins") for n in names) + " |")
    return "\n".join(lines) + "\n"
