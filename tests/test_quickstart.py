"""A reduced quickstart end to end (few steps): every artifact exists, the export loads with plain diffusers in a
process that never imports metacot, and the report only references images that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metacot.config import load_config
from metacot.experiments.quickstart import QuickstartConfig, run_quickstart

REDUCED = ["samples=120", "chains=6", "sft_steps=4", "sft_batch=8", "grpo_iterations=2", "grpo_group=2",
           "grpo_prompts=2", "rollout_steps=4", "window_size=1", "window_max=2", "eval_steps=2", "eval_samples=6",
           "calibration_samples=22",
           # 4 SFT steps write CoTs the rule judge cannot parse: the reduced GRPO scores nothing, which would stop it.
           "grpo_extra=[judge.min_scored_share=0]"]

PLAIN_LOAD = """
import sys, torch
from diffusers import DiffusionPipeline
from PIL import Image
assert not any(m == 'metacot' or m.startswith('metacot.') for m in sys.modules)
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
print(type(pipe).__name__, type(pipe.text_encoder).__name__)
assert not any(m == 'metacot' or m.startswith('metacot.') for m in sys.modules), 'metacot was imported'
"""


@pytest.mark.slow
def test_reduced_quickstart(tiny_models, session_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "qs"
    # Reuse the session's tiny models: the quickstart's own build is covered by the models tests.
    (out / "models").mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_models.pipeline, out / "models" / "pipeline")
    q = load_config(QuickstartConfig, "quickstart", [f"out={out}", *REDUCED])
    report = run_quickstart(q)
    for path in ("data/manifest.json", "sft/final/model_index.json", "sft/report/loss.png",
                 "sft_nocot/final/metacot.json",
                 "calibration/calibration.json", "calibration/scatter.png", "grpo/final/model_index.json",
                 "grpo/gate.json", "grpo/report/reward.png", "export/pipeline/model_index.json",
                 "export/understanding", "export/README.md", "export/metacot.json", "eval/results.json",
                 "eval/table.md", "timings.json"):
        assert (out / path).exists(), path
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"copy", "erase", "sft_nocot", "sft", "grpo"} <= set(results["methods"])
    assert json.loads((out / "sft_nocot" / "final" / "metacot.json").read_text())["no_cot"] is True
    assert json.loads((out / "calibration" / "calibration.json").read_text())["simulated"] is True
    page = report.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == ["grid.png", "loss.png", "reward.png", "scatter.png"], images
    for src in images:
        assert (report.parent / src).is_file(), src
    assert "simulated annotators" in page and "Reproduce at real scale" in page
    # GRPO and eval used each model's own Meta-CoT (cot_source: model), and the report says so.
    assert "own understanding expert wrote it" in page and "(cot_source=model)" in page
    assert "cot_unparsed" in json.loads((out / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    rows = [json.loads(x) for x in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {r["cot_source"] for r in rows if r["method"] in ("sft", "grpo")} == {"model"}
    assert {r["cot_source"] for r in rows if r["method"] == "sft_nocot"} == {"none"}
    # The verdict compares Meta-CoT with no CoT and RL with SFT in plain words.
    assert "Meta-CoT (vs no CoT)" in page and "Flow-GRPO (vs SFT)" in page and "CoT acc" in page
    env_clean = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "export" / "pipeline")],
                               capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert env_clean.returncode == 0, env_clean.stderr[-2000:]
    assert "QwenImageEditPipeline" in env_clean.stdout
