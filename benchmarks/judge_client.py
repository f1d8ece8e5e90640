"""Benchmark the judge client: samples/s against the vLLM CPU server, sequential vs concurrent, and where time goes.

Usage::

    # against a running server (metacot reward serve ...)
    python benchmarks/judge_client.py --server http://127.0.0.1:8000 [--n 32] [--mode choice]
    # or start one on a model folder for the duration of the benchmark
    python benchmarks/judge_client.py --model DIR --python $METACOT_VLLM_PYTHON

It reports, per concurrency level: samples/s, mean client-observed latency per request, and the server's own
time per request from its Prometheus ``/metrics`` (end to end, then split into engine queue, prefill, decode and
the rest: the API server's pre/post-processing), so that client overhead = client latency - server time, and the
CPU time per sample of the server's processes and of the client. It also measures the client's own cost per
request with no server at all (an instant in-process stand-in): image encoding + JSON + the thread pool.
Writes nothing; prints a table and a JSON summary line.

Deliberately left out: GPU servers and real-size judge models (this measures the client and the CPU test server).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from rewards.cec import CECJudge
from rewards.client import ChatClient
from rewards.contract import RewardBatch


def noise(seed: int, size: int) -> Image.Image:
    return Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))


def make_batch(n: int, size: int, seed: int) -> RewardBatch:
    return RewardBatch(
        [noise(seed + i, size) for i in range(n)], [noise(seed + 10_000 + i, size) for i in range(n)],
        [f"turn object {i} blue" for i in range(n)],
        ["### Meta-task summary\nMeta-tasks: Replace\nTask: recolour\n### Target traversal\n- the circle: changed"] * n,
    )


SERVER_METRICS = {  # vLLM histogram -> what it measures, per request
    "e2e_request_latency_seconds": "arrival at the API server to the finished reply",
    "request_queue_time_seconds": "waiting in the engine's queue",
    "request_prefill_time_seconds": "prompt forward pass (image encoder included)",
    "request_decode_time_seconds": "generating the reply tokens",
    "request_prompt_tokens": "prompt length in tokens",
}


def server_totals(url: str) -> dict[str, float]:
    """Sum and count of vLLM's per-request histograms (``/metrics``), keyed ``<name>_sum`` / ``<name>_count``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals = {}
    for name in SERVER_METRICS:
        for part in ("sum", "count"):
            values = re.findall(rf"^vllm:{name}_{part}\{{[^}}]*\}} (\S+)", text, re.M)
            totals[f"{name}_{part}"] = sum(float(v) for v in values)
    return totals


def server_cpu_seconds(port: int) -> float | None:
    """CPU seconds used so far by the vLLM server on ``port`` (its whole process group: API server + engine)."""
    pgid = None
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if "vllm.entrypoints.openai.api_server" in cmdline and f"--port\0{port}\0" in cmdline:
                pgid = os.getpgid(int(proc.name))
                break
        except (OSError, ProcessLookupError):
            continue
    if pgid is None:
        return None  # not on this machine, or not started through rewards.serve
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime follow at 11 and 12
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def run_level(url: str, model: str | None, mode: str, concurrency: int, batch: RewardBatch) -> dict[str, Any]:
    judge = CECJudge(url, model, mode=mode, concurrency=concurrency)
    latencies: list[float] = []
    original = judge.client.chat_one

    def timed(request: Any, deadline: Any = None) -> Any:
        result = original(request, deadline)
        latencies.append(result.latency_s)
        return result

    judge.client.chat_one = timed  # type: ignore[method-assign]
    port = int(httpx.URL(url).port or 80)
    before, cpu_before, client_cpu = server_totals(url), server_cpu_seconds(port), time.process_time()
    t0 = time.perf_counter()
    scores = judge(batch)
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - client_cpu
    after, cpu_after = server_totals(url), server_cpu_seconds(port)
    judge.close()
    requests = int(after["e2e_request_latency_seconds_count"] - before["e2e_request_latency_seconds_count"])

    def per_request(name: str) -> float:
        return (after[f"{name}_sum"] - before[f"{name}_sum"]) / max(requests, 1)

    server = {name: per_request(name) for name in SERVER_METRICS}
    return {
        "concurrency": concurrency,
        "samples": len(batch),
        "requests": requests,
        "samples_per_s": len(batch) / wall,
        "client_latency_ms": 1000 * statistics.mean(latencies),
        "server_e2e_ms": 1000 * server["e2e_request_latency_seconds"],
        "queue_ms": 1000 * server["request_queue_time_seconds"],
        "prefill_ms": 1000 * server["request_prefill_time_seconds"],
        "decode_ms": 1000 * server["request_decode_time_seconds"],
        "prompt_tokens": server["request_prompt_tokens"],
        "server_cpu_ms_per_sample": None if cpu_before is None else 1000 * (cpu_after - cpu_before) / len(batch),
        "client_cpu_ms_per_sample": 1000 * client_cpu / len(batch),
        "wall_ms_per_sample": 1000 * wall / len(batch),
        "scored": sum(s is not None for s in scores),
    }


def client_overhead(n: int, size: int, mode: str) -> dict[str, float]:
    """Client cost per request against an instant in-process stand-in server (no network, no model)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "stub"}]})
        return httpx.Response(200, json={"choices": [{"message": {"content": "5"}, "finish_reason": "stop"}]})

    batch = make_batch(n, size, seed=1)
    judge = CECJudge("http://stub", mode="choice" if mode == "logprobs" else mode, concurrency=1,
                     transport=httpx.MockTransport(handler))
    t0 = time.perf_counter()
    requests = judge.build_requests(batch)
    encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    judge.client.chat(requests)
    send = time.perf_counter() - t0
    return {"encode_ms_per_sample": 1000 * encode / n, "send_ms_per_request": 1000 * send / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="URL of a running judge server")
    where.add_argument("--model", type=Path, help="model folder: start a server for the benchmark")
    parser.add_argument("--python", help="vLLM python (with --model; default $METACOT_VLLM_PYTHON)")
    parser.add_argument("--served-model", help="model name on --server (default: its only model)")
    parser.add_argument("--n", type=int, default=32, help="samples per measurement")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--mode", default="choice", choices=("parse", "choice", "logprobs"))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8], help="concurrency levels")
    args = parser.parse_args(argv)

    server = None
    if args.model:
        from rewards.serve import VLLMServer

        server = VLLMServer(args.model, python=args.python).start()
    url = args.server or server.url  # type: ignore[union-attr]
    try:
        model = ChatClient(url, args.served_model).model
        run_level(url, model, args.mode, max(args.levels), make_batch(8, args.image_size, seed=99))  # warm-up
        rows = [run_level(url, model, args.mode, c, make_batch(args.n, args.image_size, seed=7)) for c in args.levels]
    finally:
        if server is not None:
            server.stop()
    overhead = client_overhead(args.n, args.image_size, args.mode)

    print(f"judge client vs {url} ({model}), mode={args.mode}, {args.n} samples, {args.image_size}px images")
    print(f"{'concurrency':>11} {'samples/s':>10} {'client ms':>10} {'server ms':>10} {'queue':>7} {'prefill':>8} "
          f"{'decode':>7} {'other':>7}  (per request; other = API server pre/post-processing)")
    for r in rows:
        other = r["server_e2e_ms"] - r["queue_ms"] - r["prefill_ms"] - r["decode_ms"]
        print(f"{r['concurrency']:>11} {r['samples_per_s']:>10.1f} {r['client_latency_ms']:>10.1f} "
              f"{r['server_e2e_ms']:>10.1f} {r['queue_ms']:>7.1f} {r['prefill_ms']:>8.1f} {r['decode_ms']:>7.1f} "
              f"{other:>7.1f}")
    print(f"prompt length {rows[0]['prompt_tokens']:.0f} tokens; {rows[0]['requests']} requests for {args.n} samples")
    for r in rows:
        cpu = r["server_cpu_ms_per_sample"]
        print(f"concurrency {r['concurrency']}: per sample {r['wall_ms_per_sample']:.1f} ms wall, server CPU "
              f"{'n/a' if cpu is None else f'{cpu:.1f} ms'} (all its processes), client CPU "
              f"{r['client_cpu_ms_per_sample']:.1f} ms")
    speedup = rows[-1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"speed-up {rows[-1]['concurrency']} vs {rows[0]['concurrency']}: {speedup:.2f}x")
    print(f"client alone (no server): {overhead['encode_ms_per_sample']:.2f} ms/sample to encode the prompt and "
          f"images, {overhead['send_ms_per_request']:.2f} ms/request through the client")
    print(json.dumps({"levels": rows, "speedup": speedup, **overhead}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
