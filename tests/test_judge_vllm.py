"""The judge client and CECJudge against a real vLLM server (tiny random Qwen2-VL on CPU; marker ``vllm``).

The shared server comes from tests/fixtures_vllm.py. A random model writes gibberish, so scores are read through
the constraint ("choice") or the logprobs; what is tested is the plumbing: range, determinism, concurrency, order,
refusals, and what happens when the server dies mid-run (on a second, short-lived server started through
``metacot reward serve``).
"""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from rewards.cec import CECJudge, Judgement
from rewards.cli import main, score_file
from rewards.client import ChatClient, ChatRequest, JudgeError, RequestRefused, ServerUnavailable, image_part
from rewards.contract import RewardBatch
from rewards.serve import VLLMServer, free_port
from tests.fixtures_vllm import JUDGE_MODEL_NAME

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))


def batch(n: int, seed: int = 0) -> RewardBatch:
    sources = [noise(seed + i) for i in range(n)]
    edited = [noise(seed + 1000 + i) for i in range(n)]
    instructions = [f"turn object {i} blue" for i in range(n)]
    return RewardBatch(sources, edited, instructions, ["### Task thinking\nrecolour"] * n,
                       {"ids": [f"s{i}" for i in range(n)]})


def write_samples(folder: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        noise(i).save(folder / f"src{i}.png")
        noise(500 + i).save(folder / f"edit{i}.png")
        rows.append({"id": f"e{i}", "source_image": f"src{i}.png", "edited_image": f"edit{i}.png",
                     "instruction": f"remove object {i}", "cot": None})
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_constrained_scores_land_in_0_to_10(vllm_server: VLLMServer) -> None:
    judge = CECJudge(vllm_server.url, JUDGE_MODEL_NAME, prompt="cec_v1", mode="choice")
    scores = judge(batch(8))
    assert all(s is not None and s == int(s) and 0 <= s <= 10 for s in scores), scores
    assert (judge.stats.samples, judge.stats.scored) == (8, 8)
    # The same model free-running in "parse" mode writes gibberish: no score, counted, never a default.
    free = CECJudge(vllm_server.url, JUDGE_MODEL_NAME, prompt="cec_v2", mode="parse", max_tokens=12)
    parsed = free(batch(4))
    assert all(s is None or 0 <= s <= 10 for s in parsed)
    assert free.stats.no_score == sum(s is None for s in parsed) and free.stats.samples == 4


def test_logprob_scores_are_in_range_and_deterministic(vllm_server: VLLMServer) -> None:
    judge = CECJudge(vllm_server.url, JUDGE_MODEL_NAME, mode="logprobs", concurrency=1)
    first = judge(batch(6, seed=7))
    second = judge(batch(6, seed=7))
    assert all(s is not None and 0 <= s <= 10 for s in first), first
    assert first == second
    assert any(s != int(s) for s in first), "an expectation over several scores is rarely an integer"
    assert judge.stats.scored == 12


def test_32_concurrent_requests_come_back_in_order(vllm_server: VLLMServer) -> None:
    client = ChatClient(vllm_server.url, JUDGE_MODEL_NAME, concurrency=8)
    # The constraint makes the random model echo a tag unique to each request: order is checkable.
    requests = [
        ChatRequest([{"role": "user", "content": [image_part(noise(i, 32)), {"type": "text", "text": f"#{i}"}]}],
                    max_tokens=12, choice=[f"sample-{i}"])
        for i in range(32)
    ]
    seen: list[int] = []
    results = client.chat(requests, on_result=lambda i, r: seen.append(i))
    assert [r.text for r in results] == [f"sample-{i}" for i in range(32)]
    assert sorted(seen) == list(range(32))
    judge = CECJudge(client=client, mode="choice")
    scores = judge(batch(32, seed=3))
    assert len(scores) == 32 and all(s is not None and 0 <= s <= 10 for s in scores)
    assert judge.stats.samples == 32


def test_refusals_from_the_real_server_are_clear(vllm_server: VLLMServer) -> None:
    client = ChatClient(vllm_server.url, JUDGE_MODEL_NAME)
    with pytest.raises(RequestRefused, match=r"HTTP 400.*20"):
        client.chat_one(ChatRequest([{"role": "user", "content": "hi"}], top_logprobs=50))
    with pytest.raises(JudgeError, match=rf"serves \['{JUDGE_MODEL_NAME}'\], not 'gpt'"):
        ChatClient(vllm_server.url, "gpt")


def test_cli_score_writes_one_line_per_sample(vllm_server: VLLMServer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    samples = write_samples(tmp_path, 5)
    out = tmp_path / "scores.jsonl"
    code = main(["score", "--server", vllm_server.url, "--in", str(samples), "--out", str(out), "--prompt", "cec_v2",
                 "--mode", "logprobs"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"e{i}" for i in range(5)]
    assert all(r["prompt"] == "cec_v2" and 0 <= r["score"] <= 10 for r in rows)
    assert "scored 5 samples" in capsys.readouterr().out


class _StopAfter(CECJudge):
    """Holds new requests after ``n`` results until ``gone`` is set, so the server dies mid-run deterministically."""

    def __init__(self, *args: Any, n: int, on_nth: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n, self.on_nth, self.count = n, on_nth, 0
        self.stopping, self.gone = threading.Event(), threading.Event()

    def judge(self, batch: RewardBatch, on_result: Any = None) -> list[Judgement]:
        def hook(index: int, result: Judgement) -> None:
            on_result(index, result)
            self.count += 1
            if self.count == self.n:
                self.stopping.set()
                self.on_nth()
                self.gone.set()

        return super().judge(batch, hook)

    def _judge_one(self, request: ChatRequest, deadline: Any) -> Judgement:
        if self.stopping.is_set():
            self.gone.wait(120)
        return super()._judge_one(request, deadline)


def _read_lines(stream: Any, out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


def test_server_stopped_mid_run_gives_a_clear_error_and_no_lost_or_duplicate_records(
    vllm_server: VLLMServer, vllm_python: Path, judge_vlm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second server also checks API keys end to end: it is started with one.
    monkeypatch.setenv("METACOT_TEST_JUDGE_KEY", "s3cret")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = subprocess.Popen(
        [sys.executable, "-m", "rewards.cli", "serve", "--model", str(judge_vlm), "--port", str(port), "--python",
         str(vllm_python), "--served-model-name", JUDGE_MODEL_NAME, "--work-dir", str(tmp_path / "second"),
         "--api-key", "s3cret"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(cli.stdout, lines), daemon=True).start()
    output = []
    try:
        end = time.monotonic() + 600
        while not any("judge server ready" in line for line in output):
            assert time.monotonic() < end and cli.poll() is None, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                pass

        def stop_second_server() -> None:
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(timeout=60) == 0

        with pytest.raises(RequestRefused, match="API key"):
            ChatClient(url, JUDGE_MODEL_NAME)
        samples = write_samples(tmp_path, 24)
        out = tmp_path / "scores.jsonl"
        judge = _StopAfter(url, JUDGE_MODEL_NAME, concurrency=4, retries=2, timeout_s=10, n=5,
                           on_nth=stop_second_server, api_key_env="METACOT_TEST_JUDGE_KEY")
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match=rf"127.0.0.1:{port}.*(ConnectError|refused)"):
            score_file(judge, samples, out)
        assert time.monotonic() - t0 < 120
    finally:
        if cli.poll() is None:
            cli.kill()
    while not lines.empty():
        output.append(lines.get())
    assert any("stopped the judge server" in line for line in output), "".join(output)
    with pytest.raises(httpx.TransportError):  # the vLLM process group is gone with the CLI
        httpx.get(f"{url}/health", timeout=2)
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).count(f"--port\0{port}\0")]
    assert leftovers == []

    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole
    ids = [r["id"] for r in rows]
    assert 5 <= len(ids) < 24 and len(set(ids)) == len(ids)

    # Resume on the shared server (same model, same name): every sample exactly once in the end.
    resumed = CECJudge(vllm_server.url, JUDGE_MODEL_NAME)
    counts = score_file(resumed, samples, out)
    assert counts["skipped"] == len(ids) and counts["scored"] + counts["no_score"] == 24 - len(ids)
    final = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(final) == sorted(f"e{i}" for i in range(24))


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
