"""``metacot data hypothetical`` (instruction rewriting) against the shared real vLLM server (marker ``vllm``).

The tiny random model writes gibberish instructions; the test checks the plumbing: bounded structured output, the
rewritten records (images, ids and CoTs kept; instruction and category replaced), failures recorded, resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_recipes.cli import main
from data_recipes.hypothetical import HYPOTHETICAL_KINDS
from metacot.cot.schema import EditRecord, load_records
from tests.conftest import require

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server_url(vllm_server) -> str:  # noqa: ANN001 - the fixture's type lives in rewards.serve
    require(any("disable_any_whitespace" in arg for arg in vllm_server.command()),
            "the shared vllm_server must be started with --structured-outputs-config "
            "'{\"backend\": \"xgrammar\", \"disable_any_whitespace\": true}' (rewards/serve.py)")
    return vllm_server.url


def test_rewrite_keeps_images_and_cot(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_recipes.synth import generate

    generate(tmp_path / "synth", 8, 0)
    source = tmp_path / "synth" / "train.jsonl"
    originals = {r.id: r for r in load_records(source) if isinstance(r, EditRecord)}
    argv = ["hypothetical", "--in", str(source), "--out", str(tmp_path / "out"), "--server", server_url,
            "--workers", "2", "--limit", "5", "--max-tokens", "200"]
    assert main(argv) == 0
    assert "5 of 5 pending samples" in capsys.readouterr().out
    out = tmp_path / "out"
    rewritten = load_records(out / "train.jsonl") if (out / "train.jsonl").is_file() else []
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()] if (
        out / "failed.jsonl").is_file() else []
    assert len(rewritten) + len(failed) == 5 and len(rewritten) >= 3, failed
    assert all(isinstance(r, EditRecord) for r in rewritten)  # understanding records are not carried over
    for record in rewritten:
        original = originals[record.id]
        assert record.category in {f"hypothetical-{k}" for k in HYPOTHETICAL_KINDS}
        assert record.instruction != original.instruction and 8 <= len(record.instruction) <= 240
        assert (record.source_image, record.target_image, record.cot) == (
            original.source_image, original.target_image, original.cot)
    assert all(f["stage"] == "rewrite" and f["reason"] for f in failed)
    assert main(argv) == 0  # a rerun finds nothing left to do
    assert "0 of 0 pending samples" in capsys.readouterr().out
