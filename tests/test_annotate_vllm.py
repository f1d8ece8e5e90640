"""``metacot data annotate`` against the shared real vLLM server (tiny random Qwen2-VL on CPU; marker ``vllm``).

A random model writes gibberish, but structured outputs force it into the bounded Meta-CoT schema, so what is
tested is the plumbing: schema-valid records, resume after a kill, the verify threshold, failures with reasons.
The server must run with ``disable_any_whitespace`` (else vLLM's JSON grammar lets a random model write
whitespace until ``max_tokens``; see data_recipes/annotate.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import data_recipes.annotate as annotate_module
from data_recipes.annotate import annotate
from data_recipes.importers import load_dataset_records, write_dataset_records
from metacot.cot.schema import EditRecord, UnderstandingRecord, load_records
from tests.conftest import require
from tests.fixtures_vllm import JUDGE_MODEL_NAME

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 400  # the shared server's context is 1024 tokens; the prompt with two small images takes ~600


@pytest.fixture(scope="module")
def server_url(vllm_server) -> str:  # noqa: ANN001 - the fixture's type lives in rewards.serve
    require(any("disable_any_whitespace" in arg for arg in vllm_server.command()),
            "the shared vllm_server must be started with --structured-outputs-config "
            "'{\"backend\": \"xgrammar\", \"disable_any_whitespace\": true}' (rewards/serve.py)")
    return vllm_server.url


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic edits with their CoTs stripped (as an importer writes them) + 24 understanding records."""
    from data_recipes.synth import generate

    root = tmp_path_factory.mktemp("annotate")
    generate(root / "synth", 24, 0)
    records = [r for split in ("train", "val", "test") for r in load_records(root / "synth" / f"{split}.jsonl")]
    stripped = [dataclasses.replace(r, cot=None, meta_tasks=()) if isinstance(r, EditRecord) else r for r in records]
    write_dataset_records(root / "synth" / "bare.jsonl", stripped)
    return root / "synth" / "bare.jsonl"


def edit_ids(folder: Path) -> list[str]:
    ids = []
    for split in ("train", "val", "test"):
        if (folder / f"{split}.jsonl").is_file():
            ids += [r.id for r in load_records(folder / f"{split}.jsonl") if isinstance(r, EditRecord)]
    return ids


def test_annotates_20_samples_into_schema_valid_records(server_url: str, bare: Path, tmp_path: Path) -> None:
    summary, manifest = annotate(bare, tmp_path / "out", server_url, model=JUDGE_MODEL_NAME, workers=4, limit=20,
                                 max_tokens=MAX_TOKENS)
    assert summary.status["kept"] == 20 and summary.status["failed"] == 0, summary.line()
    annotated = [r for split in ("train", "val", "test") if (tmp_path / "out" / f"{split}.jsonl").is_file()
                 for r in load_records(tmp_path / "out" / f"{split}.jsonl")]  # the strict schema: CoTs required
    edits = [r for r in annotated if isinstance(r, EditRecord)]
    assert len(edits) == 20 and all(r.cot is not None and r.meta_tasks == r.cot.meta_tasks for r in edits)
    assert sum(isinstance(r, UnderstandingRecord) for r in annotated) == 24  # passed through
    assert len({json.dumps(dataclasses.asdict(r.cot), default=str) for r in edits}) > 1  # the images reach the model
    settings = manifest["settings"]
    assert settings["model"] == JUDGE_MODEL_NAME and settings["annotate_prompt"].startswith("annotate_v1@")
    assert manifest["runs"][-1]["samples_per_s"] > 0


def test_resume_after_kill_skips_done_ids(server_url: str, bare: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "metacot.cli", "data", "annotate", "--in", str(bare), "--out", str(out),
           "--server", server_url, "--workers", "1", "--max-tokens", str(MAX_TOKENS)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            if (out / "train.jsonl").is_file() and (out / "train.jsonl").read_text().count('"cot":{') >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"annotate ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    before = set(edit_ids_lenient(out))
    assert 3 <= len(before) < 24
    with open(out / "train.jsonl", "a") as handle:  # what a kill in the middle of a write would leave
        handle.write('{"type":"edit","id":"e000023","source_image":"../')
    messages: list[str] = []
    summary, _ = annotate(bare, out, server_url, workers=2, max_tokens=MAX_TOKENS, log=messages.append)
    assert any("torn last line" in m for m in messages), messages
    assert summary.pending == 24 - len(before) and summary.passed_through == 0
    ids = edit_ids(out)  # every file loads under the strict schema: no torn or CoT-less record survived
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 24


def edit_ids_lenient(folder: Path) -> list[str]:
    """Ids of annotated edits in a folder a kill may have left with a torn last line (which is not counted)."""
    ids = []
    for split in ("train", "val", "test"):
        path = folder / f"{split}.jsonl"
        if path.is_file():
            ids += [json.loads(line)["id"] for line in path.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and '"type":"edit"' in line]
    return ids


def test_verify_threshold_splits_kept_and_filtered(server_url: str, bare: Path, tmp_path: Path) -> None:
    annotate(bare, tmp_path / "all", server_url, verify=True, threshold=0.0, workers=4, limit=10,
             max_tokens=MAX_TOKENS)
    scores = {json.loads(x)["id"]: json.loads(x)["score"] for x in (tmp_path / "all" / "scores.jsonl").read_text()
              .splitlines()}
    assert len(scores) == 10 and all(0 <= s <= 10 for s in scores.values())
    distinct = sorted(set(scores.values()))
    assert len(distinct) >= 3, f"the tiny judge gave too few distinct scores to split: {distinct}"
    gaps = [(b - a, (a + b) / 2) for a, b in zip(distinct[1:-2], distinct[2:-1], strict=True)] or [(0, distinct[1])]
    threshold = max(gaps)[1]  # the widest gap away from the ends, so run-to-run float noise cannot cross it
    summary, manifest = annotate(bare, tmp_path / "split", server_url, verify=True, threshold=threshold,
                                 workers=4, limit=10, max_tokens=MAX_TOKENS)
    kept = set(edit_ids(tmp_path / "split"))
    filtered = {r.id for r in load_records(tmp_path / "split" / "filtered.jsonl")}
    assert kept == {i for i, s in scores.items() if s >= threshold}
    assert filtered == {i for i, s in scores.items() if s < threshold} and kept and filtered
    assert manifest["counts"]["filtered"] == len(filtered) and manifest["settings"]["verify_prompt"]


def test_failures_are_recorded_with_reasons(server_url: str, bare: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    records = [r for r in load_dataset_records(bare, check_images=False) if isinstance(r, EditRecord)][:3]
    Image.new("RGB", (2, 600)).save(tmp_path / "thin.png")  # Qwen2-VL's processor refuses aspect ratios > 200
    records[1] = dataclasses.replace(records[1], source_image=str(tmp_path / "thin.png"), scene_before=None)
    write_dataset_records(tmp_path / "in.jsonl", records)
    summary, manifest = annotate(tmp_path / "in.jsonl", tmp_path / "out", server_url, workers=2,
                                 max_tokens=MAX_TOKENS)
    failed = [json.loads(x) for x in (tmp_path / "out" / "failed.jsonl").read_text().splitlines()]
    assert [(f["id"], f["stage"]) for f in failed] == [(records[1].id, "annotate")]
    assert failed[0]["reason"].startswith("refused: ") and "HTTP 400" in failed[0]["reason"]
    assert summary.status == {"kept": 2, "failed": 1} and manifest["counts"]["failure_reasons"] == {"refused": 1}

    schema = annotate_module.cot_json_schema()  # force a schema violation: the server obeys an invalid enum
    schema["properties"]["meta_tasks"]["items"]["enum"] = ["Teleport"]
    monkeypatch.setattr(annotate_module, "cot_json_schema", lambda: schema)
    summary, manifest = annotate(tmp_path / "in.jsonl", tmp_path / "forced", server_url, workers=2,
                                 max_tokens=MAX_TOKENS, limit=1)
    (failed,) = [json.loads(x) for x in (tmp_path / "forced" / "failed.jsonl").read_text().splitlines()]
    # the greedy attempt reads as an invalid Meta-CoT; the sampled retries may fail otherwise (e.g. run long)
    assert failed["attempts"][0].startswith("invalid Meta-CoT") and "Teleport" in failed["attempts"][0]
    assert len(failed["attempts"]) == annotate_module.ATTEMPTS and failed["reason"] == failed["attempts"][-1]
    assert summary.status == {"failed": 1} and not edit_ids(tmp_path / "forced")
