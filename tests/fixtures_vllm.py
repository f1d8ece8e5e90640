"""Session fixtures for tests that need a real vLLM judge server (marker ``vllm``).

One server per test session, on 127.0.0.1 and a free port, serving the tiny random Qwen2-VL that
``metacot.models.tiny.build_tiny_vlm`` writes; every test that needs a judge shares it. The vLLM python comes from
``$METACOT_VLLM_PYTHON`` (build a venv with ``launch/vllm_env.sh DIR`` and export ``DIR/bin/python``); without it
the tests skip locally and fail under ``CI=true``. The server is stopped (whole process group) when the session
ends, and dies with the test process if that is killed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from rewards.serve import VLLMServer
from tests.conftest import require

JUDGE_MODEL_NAME = "tiny-judge"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the vLLM venv, from ``$METACOT_VLLM_PYTHON``."""
    value = os.environ.get("METACOT_VLLM_PYTHON", "")
    require(bool(value), "METACOT_VLLM_PYTHON is unset: build a vLLM venv with launch/vllm_env.sh DIR and export "
                         "METACOT_VLLM_PYTHON=DIR/bin/python")
    path = Path(value)
    require(path.is_file(), f"METACOT_VLLM_PYTHON={value} does not exist: rebuild it with launch/vllm_env.sh")
    return path


@pytest.fixture(scope="session")
def judge_vlm(session_dir: Path) -> Path:
    """A tiny random Qwen2-VL folder (head size 32: vLLM's CPU attention refuses smaller)."""
    try:
        from metacot.models.tiny import build_tiny_vlm
    except ImportError as exc:  # the models helper's module is not there yet
        require(False, f"metacot.models.tiny.build_tiny_vlm is unavailable ({exc})")
    return build_tiny_vlm(session_dir / "judge-vlm", arch="qwen2_vl")


@pytest.fixture(scope="session")
def vllm_server(vllm_python: Path, judge_vlm: Path, session_dir: Path) -> Iterator[VLLMServer]:
    """The shared judge server, started once per session."""
    server = VLLMServer(
        judge_vlm, python=vllm_python, served_model_name=JUDGE_MODEL_NAME, work_dir=session_dir / "vllm-shared",
        # A tiny BPE spends more tokens on the judge prompt than a real tokenizer; KV memory is no concern here.
        max_model_len=4096,
        startup_timeout_s=600,  # 26-77 s alone; more when other jobs share the two cores
    )
    with server:
        yield server
