"""``OUT/report/index.html`` of the ablation: the paper-style table, reward and held-out curves, a grid per arm.

Everything is read back from the run folders and ``OUT/eval/<split>/`` (``results.json``, ``samples.jsonl``), so the
page can be rebuilt without training: ``python -m metacot.experiments.ablation_report OUT``.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from metacot.jsonl import read_dicts

COLUMNS = (("ins", "Ins"), ("con", "Con"), ("nat", "Nat"), ("art", "Art"), ("cot_acc", "CoT acc"))


def _cell(ci: dict[str, Any] | None) -> str:
    if not ci or ci.get("mean") is None:
        return "-"
    lo, hi = ci.get("lo"), ci.get("hi")
    return f"{ci['mean']:.3f}" + (f" <small>[{lo:.2f}, {hi:.2f}]</small>" if lo is not None else "")


def paper_table(results: dict[str, Any], arms: dict[str, str]) -> str:
    """HTML table: one row per method (arms, then baselines), the paper's columns with 95% bootstrap intervals."""
    methods = results["methods"]
    order = [m for m in arms if m in methods] + [m for m in methods if m not in arms]
    head = "".join(f"<th>{label}</th>" for _, label in COLUMNS)
    rows = []
    for m in order:
        cells = "".join(f"<td>{_cell(_ci(methods[m], key))}</td>" for key, _ in COLUMNS)
        name = f"({m}) {html.escape(arms[m])}" if m in arms else f"baseline: {html.escape(m)}"
        rows.append(f"<tr><td>{name}</td><td>{methods[m]['n']}</td>{cells}</tr>")
    return f"<table><tr><th>arm</th><th>n</th>{head}</tr>{''.join(rows)}</table>"


def _ci(entry: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The overall mean of ``key`` with its bootstrap interval (``metacot.eval.runner.aggregate``)."""
    overall = entry.get("overall", {})
    if key in overall.get("ci", {}):
        return overall["ci"][key]
    return None if overall.get(key) is None else {"mean": overall[key]}


def meta_task_table(results: dict[str, Any], arms: dict[str, str], key: str = "ins") -> str:
    methods = results["methods"]
    order = [m for m in arms if m in methods] + [m for m in methods if m not in arms]
    tasks = sorted({t for m in methods.values() for t in m["meta_task"]})
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for m in order:
        cells = "".join(f"<td>{_fmt(methods[m]['meta_task'].get(t, {}).get(key))}</td>" for t in tasks)
        rows.append(f"<tr><td>{html.escape(m)}</td>{cells}</tr>")
    return f"<table><tr><th>{key} by meta-task</th>{head}</tr>{''.join(rows)}</table>"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def curves(out: Path, path: Path) -> Path | None:
    """Reward (training prompts) and held-out measures of arms f and g against summed GPU seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {a: out / "arms" / a / "grpo" / "metrics.jsonl" for a in ("f", "g")}
    runs = {a: p for a, p in runs.items() if p.is_file()}
    if not runs:
        return None
    keys = ("reward_mean", "eval_reward", "eval_target_similarity")
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.4))
    for arm, p in runs.items():
        rows = read_dicts(p, torn_tail="drop")
        for ax, key in zip(axes, keys):
            pts = [(r.get("train_seconds", 0.0), r[key]) for r in rows if r.get(key) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=f"({arm})")
            ax.set_title(key + (" (held-out)" if key.startswith("eval") else " (training prompts)"))
            ax.set_xlabel("GPU seconds of GRPO iterations")
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def edit_grid(out: Path, split: str, arms: list[str], path: Path, k: int = 10, size: int = 80) -> Path | None:
    """Rows of held-out edits: source | each arm's edit | ground truth, with the instruction."""
    rows = read_dicts(out / "eval" / split / "samples.jsonl", torn_tail="drop")
    data = {r["id"]: r for r in read_dicts(out / "data" / "test.jsonl")}
    ids = list(dict.fromkeys(r["id"] for r in rows if r["method"] == arms[0]))[:k]
    by = {(r["id"], r["method"]): r for r in rows}
    label_w = 300
    grid = Image.new("RGB", (label_w + (len(arms) + 2) * size, 20 + len(ids) * size), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(["source", *arms, "target"]):
        draw.text((label_w + c * size + 4, 4), name, fill="black")
    for r, sid in enumerate(ids):
        rec, y = data[sid], 20 + r * size
        cells = [out / "data" / rec["source_image"]]
        cells += [out / "eval" / split / by[(sid, a)]["image"] if (sid, a) in by else None for a in arms]
        cells.append(out / "data" / rec["target_image"])
        for c, cell in enumerate(cells):
            if cell is not None and cell.is_file():
                with Image.open(cell) as img:
                    grid.paste(img.convert("RGB").resize((size - 4, size - 4), Image.Resampling.NEAREST),
                               (label_w + c * size, y))
        draw.text((4, y + 4), _wrap(rec["instruction"], 44), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line][:5])


def write_report(out: Path, q: Any, timings: dict[str, Any]) -> Path:
    from metacot.experiments.ablation import ARMS

    arms = {a: ARMS[a] for a in q.arms}
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>Meta-CoT ablation in miniature</h1><p>Preset: resolution {q.resolution}px, {q.samples} samples, "
             f"Stage 1 {q.sft_steps} steps x batch {q.sft_batch} in every arm, GRPO {q.grpo_iterations} iterations "
             f"(g: stopped at f's GPU seconds). Total {timings.get('total', 0) / 60:.1f} min "
             f"(setup {timings.get('setup', 0):.0f} s, Stage 1 {timings.get('sft', 0):.0f} s, GRPO "
             f"{timings.get('grpo', 0):.0f} s, eval {timings.get('eval', 0):.0f} s).</p>",
             "<p>Every arm is evaluated with <b>the model writing its own Meta-CoT</b> (arm a writes none); no table "
             "here uses the dataset's (oracle) CoT. Intervals are 95% bootstrap intervals over samples.</p>"]
    for split, title in (("single", "Held-out single meta-task edits"),
                         ("composed", "Generalisation: held-out composed tasks (swaps, 3-step chains; arms b and c "
                                      "never trained on any)")):
        res_path = out / "eval" / split / "results.json"
        if not res_path.is_file():
            continue
        results = json.loads(res_path.read_text())
        parts.append(f"<h2>{title}</h2>{paper_table(results, arms)}{meta_task_table(results, arms)}")
        grid = edit_grid(out, split, [a for a in arms], report / f"grid_{split}.png")
        if grid is not None:
            parts.append(f"<img src='{grid.name}'>")
    plot = curves(out, report / "grpo_curves.png")
    if plot is not None:
        parts.append(f"<h2>Flow-GRPO: reward and held-out measures against GPU seconds</h2><img src='{plot.name}'>")
    style = ("<style>body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse;"
             "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child{text-align:"
             "left}</style>")
    page = report / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>metacot ablation</title>{style}</head>"
                    f"<body>{''.join(parts)}</body></html>")
    return page


if __name__ == "__main__":  # pragma: no cover
    from metacot.config import load_config
    from metacot.experiments.ablation import AblationConfig

    root = Path(sys.argv[1]).resolve()
    cfg = load_config(AblationConfig, root / "ablation.yaml")
    write_report(root, cfg, json.loads((root / "timings.json").read_text()) if (root / "timings.json").is_file()
                 else {})
