"""The quickstart's ``report/index.html``: one static page with the figures people would rather look at than read.

Everything it shows is copied or drawn from the stage folders: VAE reconstruction figures, SFT loss curves, the
Flow-GRPO reward curve beside the held-out measure, the calibration scatter, a grid of source / SFT / GRPO /
ground truth for the same test prompts, the per-meta-task table against the copy and erase baselines, and the
commands that reproduce each stage at real scale.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from metacot.jsonl import read_dicts

MEASURE_HELP = {
    "sim_changed": "agreement with the ground truth on the pixels the edit must change (the headline)",
    "sim_kept": "agreement on the pixels the edit must keep (over-editing shows here)",
    "sim": "agreement over the whole image",
    "psnr": "PSNR against the ground-truth target, dB",
}

REAL_SCALE = """# Stage 1 SFT (real weights by path; N GPUs through DeepSpeed):
metacot launch slurm sft --config sft_qwen_image_edit.yaml --nodes 2 --gpus-per-node 8 \\
    model=/models/Qwen-Image-Edit data.train=/data/metacot/train.jsonl output_dir=/runs/sft
# Calibrate the VLM judge against YOUR human labels (the shipped prompts are uncalibrated):
metacot reward serve --model /models/Qwen2.5-VL-7B-Instruct --port 8000 &
metacot reward label --samples /data/calib/samples.jsonl --out /data/calib/labels.jsonl
metacot reward calibrate --labels /data/calib/labels.jsonl --server http://127.0.0.1:8000 \\
    --prompts cec_v1 cec_v2 --out /runs/calibration
# Stage 2 Flow-GRPO on early steps with the CEC reward (judge nodes beside the trainers):
metacot launch slurm grpo --config grpo_qwen_image_edit.yaml --nodes 2 --judge-nodes 1 \\
    model=/runs/sft/final judge.calibration=/runs/calibration/calibration.json ...
# Export and evaluate:
metacot export /runs/grpo --out /releases/metacot-qwen-image-edit
metacot eval --model /releases/metacot-qwen-image-edit/pipeline --data /data/metacot/test.jsonl --out /runs/eval"""


def _grid(out: Path, ids: list[str], names: tuple[str, ...], size: int = 96) -> Path | None:
    """report/grid.png: one row per test sample: source | each eval method in ``names`` | ground truth."""
    data = {r["id"]: r for r in read_dicts(out / "data" / "test.jsonl")}
    rows = []
    for sid in ids:
        rec = data[sid]
        cells = [out / "data" / rec["source_image"], *(out / "eval" / "images" / n / f"{sid}.png" for n in names),
                 out / "data" / rec["target_image"]]
        if all(c.is_file() for c in cells):
            rows.append((rec["instruction"], cells))
    if not rows:
        return None
    label_w = 330
    heads = ("source", *names, "ground truth")
    grid = Image.new("RGB", (label_w + len(heads) * size, 22 + len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(heads):
        draw.text((label_w + col * size + 4, 4), name[:16], fill="black")
    for r, (instruction, cells) in enumerate(rows):
        y = 22 + r * size
        draw.text((4, y + size // 2 - 6), instruction[:52], fill="black")
        for col, path in enumerate(cells):
            with Image.open(path) as img:
                grid.paste(img.convert("RGB").resize((size, size), Image.Resampling.NEAREST), (label_w + col * size, y))
    path = out / "report" / "grid.png"
    grid.save(path)
    return path


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _table(results: dict[str, Any], measure: str, names: tuple[str, ...]) -> str:
    methods = [m for m in ("copy", "erase", *names) if m in results["methods"]]
    tasks = sorted({t for m in methods for t in results["methods"][m]["meta_task"]})
    head = "".join(f"<th>{m}</th>" for m in methods)
    body = []
    for task in tasks:
        cells = "".join(f"<td>{_fmt(results['methods'][m]['meta_task'].get(task, {}).get(measure))}</td>"
                        for m in methods)
        n = results["methods"][methods[-1]]["meta_task"].get(task, {}).get("n", "")
        body.append(f"<tr><td>{html.escape(task)}</td><td>{n}</td>{cells}</tr>")
    cells = "".join(f"<td><b>{_fmt(results['methods'][m]['overall'].get(measure))}</b></td>" for m in methods)
    body.append(f"<tr><td><b>overall</b></td><td>{results['methods'][methods[-1]]['n']}</td>{cells}</tr>")
    return (f"<p class=note><b>{html.escape(measure)}</b>: {html.escape(MEASURE_HELP.get(measure, ''))}; higher is "
            f"better. copy = return the source; erase = blank the edited region.</p>"
            f"<table><tr><th>meta-task</th><th>n</th>{head}</tr>{''.join(body)}</table>")


def _img(path: Path | None, out: Path, alt: str) -> str:
    if path is None or not path.is_file():
        return f"<p class=note>({html.escape(alt)}: not produced)</p>"
    dest = out / "report" / path.name if path.parent != out / "report" else path
    if dest != path:
        shutil.copyfile(path, dest)
    return f'<img src="{dest.name}" alt="{html.escape(alt)}">'


def _verdict(results: dict[str, Any], names: tuple[str, ...]) -> str:
    """Plain sentences on what the run shows: Meta-CoT vs no CoT, RL vs SFT, the model vs erasing (the numbers are
    whatever the run measured; a difference inside the bootstrap intervals is called no difference)."""
    methods = results["methods"]

    def ins(name: str) -> tuple[float, float, float]:
        ci = methods[name]["overall"]["ci"]["ins"]
        return ci["mean"] or 0.0, ci["lo"] or 0.0, ci["hi"] or 0.0

    def compare(a: str, b: str, what: str) -> str:
        (ma, la, ha), (mb, lb, hb) = ins(a), ins(b)
        if la > hb:
            return f"{what} raised Ins from {mb:.2f} to {ma:.2f} (intervals apart)"
        if ha < lb:
            return f"{what} lowered Ins from {mb:.2f} to {ma:.2f} (intervals apart)"
        return f"{what} made no difference we can see on Ins ({mb:.2f} vs {ma:.2f}, overlapping intervals)"

    nocot, sft, grpo = names
    erase = methods["erase"]["overall"]["sim_changed"] or 0.0
    best = max((sft, grpo), key=lambda n: methods[n]["overall"]["sim_changed"] or 0.0)
    edits = ("its edits beat erasing the edited region on changed pixels"
             if (methods[best]["overall"]["sim_changed"] or 0.0) > erase else
             "its edits do not yet beat simply erasing the edited region on changed pixels")
    return (f"{compare(sft, nocot, 'Meta-CoT (vs no CoT)')}; {compare(grpo, sft, 'Flow-GRPO (vs SFT)')}; "
            f"{edits}. Look at the grid before trusting any number.")


def _paper_table(results: dict[str, Any], names: tuple[str, ...]) -> str:
    """The paper's columns (metacot.eval.scene_metrics) with 95 % bootstrap intervals, one row per method."""
    cols = (("ins", "Ins"), ("con", "Con"), ("nat", "Nat"), ("art", "Art"), ("cot_acc", "CoT acc"))
    rows = []
    for m in ("copy", "erase", *names):
        ci = results["methods"][m]["overall"]["ci"]
        cells = "".join(f"<td>{_fmt(ci[k]['mean'])} [{_fmt(ci[k]['lo'])}, {_fmt(ci[k]['hi'])}]</td>"
                        if k in ci and ci[k]["mean"] is not None else "<td>–</td>" for k, _ in cols)
        rows.append(f"<tr><td>{html.escape(m)}</td>{cells}</tr>")
    head = "".join(f"<th>{label}</th>" for _, label in cols)
    return (f"<p class=note>Ins: every changed object ended as the ground truth says; Con: every other object kept; "
            f"Nat / Art: palette statistics against the target; CoT acc: the written Meta-CoT's meta-tasks, targets "
            f"and traversal match (README, Evaluation columns).</p><table><tr><th>method</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def _cot_note(out: Path, q: Any, grpo_rows: list[dict[str, Any]], names: tuple[str, ...]) -> str:
    """Which Meta-CoT the GRPO rollouts and each eval table used, and how many written ones did not parse."""
    from metacot.cot import parse_lenient

    if q.cot_source == "oracle":
        return ("<p class=warn>Every number below used the <b>dataset's (oracle) Meta-CoT</b> (cot_source=oracle), "
                "not the one the model writes itself: an upper bound a deployed model never has.</p>")
    shares = [r["cot_unparsed_share"] for r in grpo_rows if "cot_unparsed_share" in r]
    rows = read_dicts(out / "eval" / "samples.jsonl", torn_tail="drop")
    evals = []
    for name in names:
        texts = [r.get("cot_text") for r in rows if r["method"] == name]
        bad = sum(t is None or parse_lenient(t).cot is None for t in texts)
        evals.append(f"{name}: {bad} of {len(texts)} did not parse")
    grpo = f"{sum(shares) / len(shares):.0%} of rollout prompts on average" if shares else "not recorded"
    return (f"<p>Meta-CoT: each model's <b>own understanding expert wrote it</b> (cot_source=model), in the GRPO "
            f"rollouts (unparsable: {grpo}; the rule judge gives those no score) and in both eval tables "
            f"({html.escape('; '.join(evals))}). A written CoT that does not parse still conditions the generator "
            f"as written.</p>")


def write_report(out: Path, q: Any, stages: list[dict[str, Any]], total_s: float) -> Path:
    """Write ``OUT/report/index.html`` (and its images) from the stage folders; returns its path."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "eval" / "results.json").read_text())
    calib = json.loads((out / "calibration" / "calibration.json").read_text())
    vae = json.loads((out / "models" / "pipeline" / "vae_report.json").read_text())
    grpo_rows = read_dicts(out / "grpo" / "metrics.jsonl", torn_tail="drop")
    evals = [r for r in grpo_rows if "eval_reward" in r]
    from metacot.eval.runner import method_label

    names = ("sft_nocot", method_label("sft", q.cot_source), method_label("grpo", q.cot_source))
    sft_o, grpo_o = results["methods"][names[1]]["overall"], results["methods"][names[2]]["overall"]
    first_ids = [r["id"] for r in read_dicts(out / "eval" / "samples.jsonl", torn_tail="drop")
                 if r["method"] == names[2]][:8]
    timing = "".join(f"<tr><td>{s['stage']}</td><td>{s['seconds']:.0f} s{' (reused)' if s['reused'] else ''}</td>"
                     f"</tr>" for s in stages)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>metacot quickstart report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}}
h2{{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}} table{{border-collapse:collapse;margin:8px 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%;border:1px solid #eee}} .note{{color:#555;font-size:90%}} pre{{background:#f6f6f6;padding:10px;
overflow-x:auto;font-size:85%}} .warn{{background:#fff4e0;padding:8px;border-left:4px solid #e0a030}}</style></head>
<body><h1>metacot quickstart</h1>
<p>Tiny models on {html.escape(q.device)} at {q.resolution} px, seed {q.seed}: {q.samples} synthetic edits, SFT
{q.sft_steps} steps, Flow-GRPO {q.grpo_iterations} iterations (window of {q.window_size} within the first
{q.window_max} of {q.rollout_steps} steps), evaluated on {results['methods'][names[2]]['n']} held-out test edits.
Total {total_s / 60:.1f} min.</p>
<h2>Before vs after (held-out test split, ground truth)</h2>
<p>Changed-pixel agreement: SFT {_fmt(sft_o['sim_changed'])} → GRPO {_fmt(grpo_o['sim_changed'])}; kept pixels
{_fmt(sft_o['sim_kept'])} → {_fmt(grpo_o['sim_kept'])}; whole image {_fmt(sft_o['sim'])} → {_fmt(grpo_o['sim'])}.
Baselines: copy {_fmt(results['methods']['copy']['overall']['sim_changed'])}, erase
{_fmt(results['methods']['erase']['overall']['sim_changed'])} (changed pixels).</p>
<p><b>{html.escape(_verdict(results, names))}</b></p>
{_paper_table(results, names)}
{_cot_note(out, q, grpo_rows, names[1:])}
{_table(results, 'sim_changed', names)}
{_table(results, 'sim_kept', names)}
<h3>Same test prompts: source | no-CoT SFT | Meta-CoT SFT | GRPO | ground truth</h3>
{_img(_grid(out, first_ids, names), out, 'grid')}
<h2>Stage 1 SFT: losses</h2>{_img(out / 'sft' / 'report' / 'loss.png', out, 'SFT loss curves')}
<h2>Stage 2 Flow-GRPO: training reward beside the held-out measure</h2>
<p class=note>reward_mean is the CEC rule judge on rollouts (what RL optimises); eval_reward and eval_target_similarity
are measured on fixed held-out prompts with deterministic sampling. A training reward that rises while the held-out
measure does not is reward hacking. Held-out target similarity: {_fmt(evals[0].get('eval_target_similarity')) if evals
else '–'} → {_fmt(evals[-1].get('eval_target_similarity')) if evals else '–'}.</p>
{_img(out / 'grpo' / 'report' / 'reward.png', out, 'GRPO reward curve')}
<h2>CEC judge calibration</h2>
<p class=warn>Labels here come from <b>simulated annotators</b> (a pixel measurement against the ground truth, plus
per-annotator bias and noise), not people. Calibrate a real judge with your own human labels.</p>
<p>Judge {html.escape(str(calib['judge_model']))}, best prompt {html.escape(str(calib['best_prompt']))}:
Pearson r {_fmt(calib['pearson_r'])}, Spearman {_fmt(calib['spearman_rho'])}, MAE {_fmt(calib['mae'])} over
n={calib['n']}: <b>{'passed' if calib['passed'] else 'FAILED'}</b> (r ≥ 0.8, MAE ≤ 2.5).</p>
{_img(out / 'calibration' / 'scatter.png', out, 'calibration scatter')}
<h2>Tiny VAE reconstruction</h2><pre>{html.escape(json.dumps(vae, indent=2))}</pre>
<h2>Stage timings</h2><table><tr><th>stage</th><th>time</th></tr>{timing}</table>
<h2>Reproduce at real scale</h2><pre>{html.escape(REAL_SCALE)}</pre>
<p class=note>Folders: models/, data/, sft/, calibration/, grpo/, export/ (pipeline/ + understanding/), eval/.</p>
</body></html>"""
    path = rep / "index.html"
    path.write_text(page)
    return path
