"""Calibrate a judge against human labels before it may serve as a Flow-GRPO reward.

``metacot reward calibrate --labels LABELS.jsonl (--scores S1.jsonl [S2 ...] | --server URL --prompts P1 [P2 ...])
--out DIR [--min-r 0.8] [--max-mae 2.5] [--judge-model NAME]``

Labels come from :mod:`rewards.labeling` (format there). Scores are JSONL lines ``{"id", "score", "prompt"?}`` (the
output of ``metacot reward score``; ``prompt`` names the judge's prompt variant, "default" when absent; ``score``
null = the judge gave no score). Several score files are merged, e.g. the shards of a SLURM array sweeping prompts.
With ``--server`` the labelled samples are scored here by :class:`rewards.cec.CECJudge`, once per prompt variant.

For every prompt variant, over the labelled samples it scored (human score = mean over annotators, scale 0-10):

- Pearson r; Spearman rho (Pearson r of ranks, ties get their average rank); MAE = mean |judge - human|;
- 95% intervals from a seeded percentile bootstrap over samples (:data:`N_BOOTSTRAP` resamples, seed
  :data:`BOOTSTRAP_SEED`; resamples whose scores are constant are left out of r / rho);
- the same three numbers per category (no intervals).

A variant passes when n >= :data:`MIN_SAMPLES`, coverage (scored / labelled) >= :data:`MIN_COVERAGE`, r >= min_r
and MAE <= max_mae, all on the point estimates. Why these floors: even with 10 pairs a Pearson r of 0.8 has a 95%
interval reaching down to 0.34 (Fisher z), and fewer says less still; a judge that abstains on more than 10% of the
samples could pass by scoring only the easy ones, while in training its abstentions silently shrink the groups.
The best variant is the passing one with the highest r, or the highest-r one when none passes.

Prompt versions: score lines may carry ``prompt_sha`` (the prompt file's content hash, which ``metacot reward
score`` writes and ``--server`` records); it is kept per variant, and the gate can insist on it, because a prompt
file edited after calibration is another judge. ``--server`` scores in CECJudge's default mode.

Inter-annotator agreement, when samples carry several annotators' scores (named annotators across lines, or list
positions ``#1``, ``#2``... within a line): the mean over annotator pairs of Pearson r on their shared samples
(pairs sharing at least 3 samples with non-constant scores), the mean absolute difference between two annotators'
scores of the same sample, and the mean per-sample standard deviation. We do not compute Krippendorff's alpha.

Bad input is refused with the file and line (see :func:`rewards.labeling.load_labels` and :func:`load_scores`);
what is legal but leaves samples out is counted in the report per variant: scored ids that have no label
(``scores_without_label``), labelled ids the variant never scored (``labels_without_score``) and null scores
(``unscored``). Output: ``DIR/calibration.json`` and ``DIR/scatter.png`` (and ``DIR/scores.jsonl`` with
``--server``), written atomically. Exit code 0 when a variant passes, 1 when none does, 2 on bad input.

:func:`find_passing_calibration` is the gate Flow-GRPO calls before it trains on a judge. What this module leaves
out: choosing the judge's prompt text (rewards/prompts) and correcting judge bias (no rescaling is fitted).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from metacot.jsonl import JSONLError, read_rows
from rewards.labeling import LabelError, LabelledItem, check_score, load_labels, normalize_id

if TYPE_CHECKING:  # pragma: no cover
    from rewards.contract import RewardBatch

MIN_SAMPLES = 10
MIN_COVERAGE = 0.9
N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
DEFAULT_VARIANT = "default"
REPORT_NAME = "calibration.json"

Scores = dict[str, dict[str, float | None]]  # prompt variant -> sample id -> score (None = no score)


class CalibrationError(ValueError):
    """Calibration input is unusable, or no passing calibration exists; the message says what to do."""


# -- statistics ---------------------------------------------------------------------------------------------------
def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (e.g. [5, 1, 5] -> [2.5, 1, 2.5])."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant (the correlation is undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum()))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson r of average ranks); None when either side is constant."""
    return pearson(average_ranks(x), average_ranks(y))


def mean_abs_error(x: Sequence[float], y: Sequence[float]) -> float:
    """Mean absolute difference."""
    return float(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)).mean())


def bootstrap_intervals(human: Sequence[float], judge: Sequence[float], *, n_resamples: int = N_BOOTSTRAP,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, list[float] | None]:
    """Percentile 95% intervals of r, rho and MAE from resampling (human, judge) pairs with replacement.

    Returns:
        ``{"pearson_r": [lo, hi] | None, "spearman_rho": ..., "mae": ...}``; None when fewer than half of the
        resamples had a defined statistic (nearly constant scores).
    """
    h, j = np.asarray(human, dtype=np.float64), np.asarray(judge, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(h), size=(n_resamples, len(h)))
    stats: dict[str, list[float | None]] = {"pearson_r": [], "spearman_rho": [], "mae": []}
    for row in idx:
        hs, js = h[row], j[row]
        stats["pearson_r"].append(pearson(hs, js))
        stats["spearman_rho"].append(spearman(hs, js))
        stats["mae"].append(mean_abs_error(hs, js))
    out: dict[str, list[float] | None] = {}
    for name, values in stats.items():
        defined = np.array([v for v in values if v is not None])
        out[name] = (None if len(defined) < n_resamples / 2
                     else [float(np.percentile(defined, 2.5)), float(np.percentile(defined, 97.5))])
    return out


def annotator_agreement(items: Sequence[LabelledItem]) -> dict[str, Any] | None:
    """Agreement between annotators (see the module docstring); None when no sample has two annotators."""
    multi = [it for it in items if len(it.scores) >= 2]
    if not multi:
        return None
    names = sorted({a for it in items for a in it.scores})
    pairs = []
    for a, b in itertools.combinations(names, 2):
        shared = [it for it in items if a in it.scores and b in it.scores]
        r = pearson([it.scores[a] for it in shared], [it.scores[b] for it in shared]) if len(shared) >= 3 else None
        pairs.append({"annotators": [a, b], "n": len(shared), "pearson_r": r})
    rs = [p["pearson_r"] for p in pairs if p["pearson_r"] is not None]
    diffs = [np.mean([abs(x - y) for x, y in itertools.combinations(it.scores.values(), 2)]) for it in multi]
    return {
        "n_annotators": len(names),
        "n_samples_multi": len(multi),
        "mean_pairwise_pearson_r": float(np.mean(rs)) if rs else None,
        "mean_pairwise_abs_diff": float(np.mean(diffs)),
        "mean_sample_std": float(np.mean([np.std(list(it.scores.values())) for it in multi])),
        "pairs": pairs,
        "method": "mean pairwise Pearson r over annotator pairs sharing >= 3 samples; mean |a - b| within "
                  "samples; mean per-sample population std. Not Krippendorff's alpha.",
    }


# -- inputs -------------------------------------------------------------------------------------------------------
def load_scores(paths: Sequence[str | Path]) -> tuple[Scores, dict[str, str | None]]:
    """Merge score files into ``{variant: {id: score | None}}`` and ``{variant: prompt_sha | None}``.

    ``prompt_sha`` (written by ``metacot reward score``: the prompt file's content hash) is optional, but when
    lines carry it, all lines of one variant must agree: two versions of one prompt file are two judges.

    Raises:
        CalibrationError: listing every bad line: not JSON, no id, score not a number / NaN / outside 0-10
            (null is allowed: no score), prompt not a string, the same (prompt, id) twice across all files,
            differing prompt_sha within a variant.
    """
    scores: Scores = {}
    shas: dict[str, str | None] = {}
    where_first: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            problems.append(f"{path}: score file does not exist")
            continue
        try:
            rows = read_rows(path, objects=False)
        except JSONLError as exc:
            problems += exc.problems
            continue
        for lineno, row in rows:
            where = f"{path}:{lineno}"
            sid = normalize_id(row.get("id")) if isinstance(row, dict) else None
            if sid is None:
                problems.append(f"{where}: needs an 'id' (string or integer)")
                continue
            variant = row.get("prompt", DEFAULT_VARIANT)
            if not isinstance(variant, str) or not variant:
                problems.append(f"{where}: 'prompt' must be a non-empty string")
                continue
            raw = row.get("score", "<missing>")
            score = None if raw is None else check_score(raw)
            if raw is not None and score is None:
                problems.append(f"{where}: 'score' must be a number in 0-10 or null (no score), got {raw!r}")
                continue
            if (variant, sid) in where_first:
                problems.append(f"{where}: duplicate score for id {sid!r}, prompt {variant!r} "
                                f"(first at {where_first[variant, sid]})")
                continue
            sha = row.get("prompt_sha")
            if variant in shas and shas[variant] != sha:
                problems.append(f"{where}: prompt_sha {sha!r} differs from {shas[variant]!r} seen earlier for prompt "
                                f"{variant!r}: the prompt file changed between runs; score all samples with one "
                                f"version")
                continue
            shas[variant] = sha
            where_first[variant, sid] = where
            scores.setdefault(variant, {})[sid] = score
    if problems:
        shown = "\n  ".join(problems[:50])
        raise CalibrationError(f"{len(problems)} problem(s) in the score files:\n  {shown}\n"
                               f"Fix them; no score was skipped.")
    if not scores:
        raise CalibrationError(f"the score files {[str(p) for p in paths]} hold no scores")
    return scores, shas


def batch_from_items(items: Sequence[LabelledItem]) -> "RewardBatch":
    """A :class:`rewards.contract.RewardBatch` of labelled samples: images loaded, Meta-CoTs parsed.

    Extras: ``ids``, ``categories``, and ``target_images``, ``scene_before``, ``scene_after`` where the samples
    carry them (None for samples without).

    Raises:
        CalibrationError: a sample lacks its source or edited image path, an image cannot be read, or its CoT
            text does not parse.
    """
    from PIL import Image

    from metacot.cot import CoTParseError, from_dict, parse
    from rewards.contract import RewardBatch

    missing = [it.id for it in items if not all(isinstance(it.fields.get(k), str)
                                                 for k in ("source_image", "edited_image"))]
    if missing:
        raise CalibrationError(f"scoring needs source_image and edited_image paths in the labels; missing for ids "
                               f"{missing[:5]}")

    def load(path: Any) -> Any:
        if not isinstance(path, str):
            return None
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise CalibrationError(f"cannot read image {path} named in the labels ({exc})") from exc

    cots = []
    for it in items:
        cot = it.fields.get("cot")
        try:
            cots.append(from_dict(cot) if isinstance(cot, dict) else parse(cot) if isinstance(cot, str) else None)
        except (CoTParseError, ValueError) as exc:
            raise CalibrationError(f"sample {it.id!r}: its 'cot' does not parse as a Meta-CoT ({exc})") from exc
    return RewardBatch(
        source_images=[load(it.fields["source_image"]) for it in items],
        edited_images=[load(it.fields["edited_image"]) for it in items],
        instructions=[str(it.fields.get("instruction", "")) for it in items],
        cots=cots,
        extras={"ids": [it.id for it in items], "categories": [it.category for it in items],
                "target_images": [load(it.fields.get("target_image")) for it in items],
                "scene_before": [it.fields.get("scene_before") for it in items],
                "scene_after": [it.fields.get("scene_after") for it in items]},
    )


def score_with_reward(items: Sequence[LabelledItem], reward: Any) -> dict[str, float | None]:
    """Score labelled samples with any reward callable (e.g. ``CECRuleJudge()``): ``{id: score | None}``."""
    return {it.id: s for it, s in zip(items, reward(batch_from_items(items)))}


def score_with_server(items: Sequence[LabelledItem], server: str, prompts: Sequence[str],
                      judge_model: str | None) -> tuple[Scores, dict[str, str | None], str]:
    """Score the labelled samples with :class:`rewards.cec.CECJudge` (its default mode) once per prompt variant.

    Returns:
        (scores by variant, prompt file hash by variant, the model name the server serves).
    """
    from rewards.cec import CECJudge
    from rewards.client import JudgeError

    scores: Scores = {}
    shas: dict[str, str | None] = {}
    served = judge_model
    for prompt in prompts:
        try:
            judge = CECJudge(url=server, model=judge_model, prompt=prompt)
        except (FileNotFoundError, ValueError, JudgeError) as exc:
            raise CalibrationError(f"cannot set up the judge for prompt {prompt!r} at {server}: {exc}") from exc
        try:
            served = judge.model
            scores[judge.prompt.name] = score_with_reward(items, judge)
            shas[judge.prompt.name] = judge.prompt.sha
        except JudgeError as exc:
            raise CalibrationError(f"the judge at {server} failed while scoring prompt {prompt!r}: {exc}") from exc
        finally:
            judge.close()
    return scores, shas, str(served)


# -- the report ---------------------------------------------------------------------------------------------------
def _stats(human: list[float], judge: list[float]) -> dict[str, Any]:
    return {"n": len(human), "pearson_r": pearson(human, judge) if len(human) >= 2 else None,
            "spearman_rho": spearman(human, judge) if len(human) >= 2 else None,
            "mae": mean_abs_error(human, judge) if human else None}


def variant_report(variant: str, items: dict[str, LabelledItem], scored: dict[str, float | None], *,
                   min_r: float, max_mae: float) -> dict[str, Any]:
    """Statistics, exclusions and the pass/fail decision (with its reasons) of one prompt variant."""
    ids = [sid for sid in items if scored.get(sid) is not None]
    human = [items[sid].human_score for sid in ids]
    judge = [float(scored[sid]) for sid in ids]  # type: ignore[arg-type]
    without_label = sorted(set(scored) - set(items))
    excluded = {
        "scores_without_label": len(without_label), "scores_without_label_ids": without_label[:10],
        "labels_without_score": sum(sid not in scored for sid in items),
        "unscored": sum(sid in scored and scored[sid] is None for sid in items),
    }
    report = {"prompt": variant, **_stats(human, judge), "coverage": len(ids) / len(items), "excluded": excluded}
    reasons = []
    if len(ids) < MIN_SAMPLES:
        reasons.append(f"only {len(ids)} scored labelled samples (< {MIN_SAMPLES})")
    if report["coverage"] < MIN_COVERAGE:
        reasons.append(f"coverage {report['coverage']:.2f} < {MIN_COVERAGE} (judge scored too few labelled samples)")
    if report["pearson_r"] is None and ids:
        reasons.append("Pearson r undefined (judge or human scores are constant)")
    elif report["pearson_r"] is not None and report["pearson_r"] < min_r:
        reasons.append(f"Pearson r {report['pearson_r']:.3f} < {min_r}")
    if report["mae"] is not None and report["mae"] > max_mae:
        reasons.append(f"MAE {report['mae']:.3f} > {max_mae}")
    report["passed"] = not reasons
    report["reason"] = "; ".join(reasons) or "passes all thresholds"
    report.update({f"{k}_ci95": None for k in ("pearson_r", "spearman_rho", "mae")})
    if len(ids) >= 2:
        for key, ci in bootstrap_intervals(human, judge).items():
            report[f"{key}_ci95"] = ci
    categories: dict[str, tuple[list[float], list[float]]] = {}
    for sid, h, j in zip(ids, human, judge):
        hs, js = categories.setdefault(items[sid].category or "uncategorized", ([], []))
        hs.append(h)
        js.append(j)
    report["per_category"] = {c: _stats(hs, js) for c, (hs, js) in sorted(categories.items())}
    report["pairs"] = [{"id": sid, "human": h, "judge": j} for sid, h, j in zip(ids, human, judge)]
    return report


def calibrate(items: dict[str, LabelledItem], scores: Scores, *, judge_model: str, min_r: float = 0.8,
              max_mae: float = 2.5, prompt_shas: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The whole report (see the module docstring); ``report["passed"]`` is the verdict of the best variant."""
    variants = [{**variant_report(v, items, s, min_r=min_r, max_mae=max_mae),
                 "prompt_sha": (prompt_shas or {}).get(v)} for v, s in sorted(scores.items())]
    if all(v["n"] == 0 for v in variants):
        raise CalibrationError(f"no score id matches a label id (labels e.g. {list(items)[:3]}, scores e.g. "
                               f"{[sid for s in scores.values() for sid in s][:3]}): are these the right files?")
    passing = [v for v in variants if v["passed"]]
    pool = passing or variants
    best = max(pool, key=lambda v: -np.inf if v["pearson_r"] is None else v["pearson_r"])
    n_sim = sum(it.simulated for it in items.values())
    return {
        "passed": bool(passing), "best_prompt": best["prompt"], "reason": best["reason"],
        "pearson_r": best["pearson_r"], "spearman_rho": best["spearman_rho"], "mae": best["mae"], "n": best["n"],
        "pearson_r_ci95": best["pearson_r_ci95"], "mae_ci95": best["mae_ci95"],
        "judge_model": judge_model,
        "thresholds": {"min_r": min_r, "max_mae": max_mae, "min_samples": MIN_SAMPLES, "min_coverage": MIN_COVERAGE},
        "simulated": n_sim > 0, "n_simulated_labels": n_sim, "n_labelled": len(items),
        "annotator_agreement": annotator_agreement(list(items.values())),
        "bootstrap": {"resamples": N_BOOTSTRAP, "seed": BOOTSTRAP_SEED, "interval": "percentile 2.5-97.5"},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "variants": variants,
    }


def plot_scatter(report: dict[str, Any], path: Path) -> None:
    """Judge vs human score per variant, identity line dashed, r / MAE / verdict in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    cols = min(3, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.2 * cols), 4.2 * rows), squeeze=False)
    for ax, v in zip(axes.flat, variants):
        ax.scatter([p["human"] for p in v["pairs"]], [p["judge"] for p in v["pairs"]], s=18, alpha=0.5)
        ax.plot([0, 10], [0, 10], "k--", linewidth=1, label="judge = human")
        r = "n/a" if v["pearson_r"] is None else f"{v['pearson_r']:.2f}"
        mae = "n/a" if v["mae"] is None else f"{v['mae']:.2f}"
        ax.set_title(f"{v['prompt']}: r={r} MAE={mae} n={v['n']} {'PASS' if v['passed'] else 'FAIL'}", fontsize=10)
        ax.set(xlim=(-0.5, 10.5), ylim=(-0.5, 10.5), xlabel="human score (mean of annotators)", ylabel="judge score")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    simulated = " (SIMULATED annotators)" if report["simulated"] else ""
    fig.suptitle(f"judge {report['judge_model']} vs human labels{simulated}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | Path, scores: Scores | None = None) -> Path:
    """Write ``calibration.json``, ``scatter.png`` (and ``scores.jsonl`` when given) into ``out_dir`` atomically.

    An existing ``out_dir`` is replaced only when it is itself a calibration folder (holds calibration.json).

    Raises:
        CalibrationError: ``out_dir`` exists, is not empty and is not a calibration folder.
    """
    from metacot.run import atomic_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / REPORT_NAME).is_file():
        raise CalibrationError(f"--out {out_dir} exists and is not a calibration folder; choose a new folder")
    with atomic_dir(out_dir, overwrite=True, meta={"kind": "calibration"}) as tmp:
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        plot_scatter(report, tmp / "scatter.png")
        if scores is not None:  # reusable with --scores: same format as `metacot reward score` writes
            shas = {v["prompt"]: v.get("prompt_sha") for v in report["variants"]}
            lines = [json.dumps({"id": sid, "score": s, "prompt": v, "prompt_sha": shas.get(v)})
                     for v, per in scores.items() for sid, s in per.items()]
            (tmp / "scores.jsonl").write_text("".join(line + "\n" for line in lines))
    return out_dir / REPORT_NAME


def find_passing_calibration(calib_dir_or_file: str | Path, judge_model: str, prompt: str, *,
                             prompt_sha: str | None = None, allow_simulated: bool = False) -> dict[str, Any]:
    """The calibration gate: return the passing variant's record for (judge model, prompt), or refuse.

    Args:
        calib_dir_or_file: a calibration folder (holding calibration.json) or the JSON file itself.
        judge_model: the model name the judge server serves.
        prompt: the judge's prompt variant name.
        prompt_sha: the content hash of the prompt file the judge uses now (``CECJudge.prompt.sha``); when given,
            the report must have recorded the same one (a prompt edited after calibration is a new judge).
        allow_simulated: accept a report made with simulated annotators (demos and tests only: simulated labels
            measure agreement with the ground truth, not with people).

    Returns:
        The variant's statistics plus ``judge_model``, ``simulated``, ``thresholds`` and ``report`` (path).

    Raises:
        CalibrationError: no report, another judge model, no such prompt variant, another prompt file version,
            the variant failed, or simulated labels without ``allow_simulated``; the message says which and what
            to run.
    """
    path = Path(calib_dir_or_file)
    path = path / REPORT_NAME if path.is_dir() else path
    how = (f"run `metacot reward calibrate --labels LABELS.jsonl --server URL --prompts {prompt} --out DIR` "
           f"and pass that DIR")
    if not path.is_file():
        raise CalibrationError(f"no calibration report at {path}; {how}")
    report = json.loads(path.read_text())
    if report.get("judge_model") != judge_model:
        raise CalibrationError(f"{path} calibrates judge model {report.get('judge_model')!r}, not {judge_model!r}; "
                               f"{how}")
    variant = next((v for v in report.get("variants", []) if v.get("prompt") == prompt), None)
    if variant is None:
        known = [v.get("prompt") for v in report.get("variants", [])]
        raise CalibrationError(f"{path} has no prompt variant {prompt!r} (it has {known}); {how}")
    if prompt_sha is not None and variant.get("prompt_sha") != prompt_sha:
        raise CalibrationError(f"{path} calibrated prompt {prompt!r} with file hash {variant.get('prompt_sha')!r}, "
                               f"but the judge now uses {prompt_sha!r} (the prompt file changed, or the scores did "
                               f"not record it); {how}")
    if not variant.get("passed"):
        raise CalibrationError(f"judge {judge_model!r} with prompt {prompt!r} failed calibration in {path}: "
                               f"{variant.get('reason')}; improve the prompt or judge and calibrate again")
    if report.get("simulated") and not allow_simulated:
        raise CalibrationError(f"{path} was calibrated against SIMULATED annotators, which measure agreement with "
                               f"the synthetic ground truth, not with people; label real samples and {how}")
    return {**{k: v for k, v in variant.items() if k != "pairs"}, "judge_model": judge_model,
            "simulated": bool(report.get("simulated")), "thresholds": report.get("thresholds"), "report": str(path)}


def calibrate_main(argv: list[str]) -> int:
    """``metacot reward calibrate``. Returns 0 when a variant passes, 1 when none does, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="metacot reward calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, help="labels JSONL (metacot reward label writes it)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", nargs="+", help="score JSONL files (id, score, prompt), merged")
    source.add_argument("--server", help="judge server URL: score the labelled samples with CECJudge")
    parser.add_argument("--prompts", nargs="+", help="with --server: the prompt variants to compare")
    parser.add_argument("--out", required=True, help="output folder for calibration.json and scatter.png")
    parser.add_argument("--min-r", type=float, default=0.8, help="Pearson r a variant needs (default 0.8)")
    parser.add_argument("--max-mae", type=float, default=2.5, help="MAE on 0-10 a variant may have (default 2.5)")
    parser.add_argument("--judge-model", help="the judge's model name (required with --scores)")
    from metacot.cli_config import parse_args

    args = parse_args(parser, argv)  # flags, or --config FILE and key=value (metacot.cli_config)
    try:
        if not 0 < args.min_r <= 1 or not 0 < args.max_mae <= 10:
            raise CalibrationError(f"--min-r must be in (0, 1] and --max-mae in (0, 10]; got {args.min_r}, "
                                   f"{args.max_mae}")
        if args.server and not args.prompts:
            raise CalibrationError("--server needs --prompts P1 [P2 ...] (the prompt variants to compare)")
        if args.scores and not args.judge_model:
            raise CalibrationError("--scores needs --judge-model NAME: the gate matches reports by judge model")
        items = load_labels(args.labels)
        if args.scores:
            (scores, shas), judge_model, fresh = load_scores(args.scores), args.judge_model, None
        else:
            scores, shas, judge_model = score_with_server(list(items.values()), args.server, args.prompts,
                                                          args.judge_model)
            fresh = scores
        report = calibrate(items, scores, judge_model=judge_model, min_r=args.min_r, max_mae=args.max_mae,
                           prompt_shas=shas)
        report["inputs"] = {"labels": str(Path(args.labels).resolve()),
                            "scores": [str(Path(p).resolve()) for p in args.scores or []], "server": args.server}
        path = write_report(report, args.out, fresh)
    except (CalibrationError, LabelError) as exc:
        print(f"metacot reward calibrate: {exc}", file=sys.stderr)
        return 2
    for v in report["variants"]:
        r = "n/a" if v["pearson_r"] is None else f"{v['pearson_r']:.3f}"
        mae = "n/a" if v["mae"] is None else f"{v['mae']:.3f}"
        print(f"{v['prompt']}: n={v['n']} r={r} MAE={mae} {'PASS' if v['passed'] else 'FAIL: ' + v['reason']}")
    sim = " (simulated annotators)" if report["simulated"] else ""
    if report["passed"]:
        print(f"passed{sim}: best prompt {report['best_prompt']!r} for {judge_model!r}; report {path}")
        return 0
    print(f"calibration FAILED{sim}: no prompt variant passes; best {report['best_prompt']!r}: {report['reason']}; "
          f"report {path}", file=sys.stderr)
    return 1
