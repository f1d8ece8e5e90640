"""Shared test fixtures: prerequisites that fail under CI, tiny models built once per session, run helpers.

Under ``CI=true`` a missing prerequisite (a package, root, a server) fails the test instead of skipping it, so a
green CI means the tests ran. Locally it skips with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Tiny models: one intra-op thread is faster on a 2-core machine, and much faster while a judge server or a SLURM
# job shares the cores (spin-waiting OpenMP threads). Subprocesses keep their own defaults.
import torch  # noqa: E402

torch.set_num_threads(1)


# `make test` runs the suite on 2 pytest-xdist workers (one core each, see above). Tests that share a session-wide
# server run on one worker, so each server starts once: the vLLM judge (one per session, as on a single worker) and
# the local SLURM clusters (two clusters on one host would fight over their ports and state).
SHARED_SERVERS = {"vllm_server": "vllm", "slurm_cluster": "slurm", "slurm_cluster_2n": "slurm"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        groups = {group for fixture, group in SHARED_SERVERS.items() if fixture in item.fixturenames}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses the servers {sorted(groups)}: give them one xdist group")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("xdist_group"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    # The long chains first (each server's tests run one after another on one worker), then the slow tests, so the
    # workers finish together instead of one waiting for the other's last long test. The sort is stable.
    items.sort(key=rank)


def require(condition: bool, why: str) -> None:
    """Skip locally, fail under CI=true, when a test's prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI=true: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the whole test session (tiny models, datasets)."""
    return tmp_path_factory.mktemp("session")


# Area fixtures live in tests/fixtures_<area>.py; importing their public names here registers them for every test.
FIXTURE_MODULES = ("fixtures_models", "fixtures_data", "fixtures_runs", "fixtures_vllm", "fixtures_slurm")


def _register_fixture_modules() -> None:
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    for name in FIXTURE_MODULES:
        if not (Path(__file__).parent / f"{name}.py").is_file():
            continue
        module = importlib.import_module(name)
        globals().update({k: v for k, v in vars(module).items() if not k.startswith("_") and callable(v)
                          and getattr(v, "__module__", name) == name})


_register_fixture_modules()
