"""SLURM fixtures: real local clusters (marker ``slurm``), started once per session and stopped by PID.

``slurm_cluster``: this host as one node with 2 CPUs. ``slurm_cluster_2n``: two virtual nodes on 127.0.0.1 with
2 CPUs and 2 fake GPUs each (multi-node rendezvous, judge on another node). The packages are installed with
apt-get when missing (root); without root or apt the tests skip locally and fail under ``CI=true``. The
function-scoped ``slurm`` / ``slurm_2n`` point the SLURM client commands of the test (and of the jobs it submits,
which inherit the environment) at a cluster and set the jobs' environment (:func:`job_environment`).
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

from tests.conftest import require
from tests.slurm_cluster import LocalCluster, ensure_installed, start_cluster


def _cluster(**kwargs: int) -> Iterator[LocalCluster]:
    require(os.geteuid() == 0, "the local SLURM cluster runs its daemons as root")
    reason = ensure_installed()
    require(reason is None, reason or "")
    cluster = start_cluster(**kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    """One node (this host, 2 CPUs, no GPUs)."""
    yield from _cluster(nodes=1, cpus_per_node=2)


@pytest.fixture(scope="session")
def slurm_cluster_2n() -> Iterator[LocalCluster]:
    """Two virtual nodes on this host, 2 CPUs and 2 fake GPUs each."""
    yield from _cluster(nodes=2, cpus_per_node=2, gpus_per_node=2, prefix="mctn")


def job_environment(cluster: LocalCluster) -> dict[str, str]:
    """Variables the tests set for their jobs (which inherit the submitting environment).

    One CPU thread per process keeps runs bitwise comparable. DeepSpeed JIT-builds a small CPU op into
    TORCH_EXTENSIONS_DIR; the default folder is shared by every venv on the machine, and two venvs with different
    include paths rebuild it in turn (about a minute each time), so these jobs get a folder of their own venv.
    """
    return {"SLURM_CONF": str(cluster.conf), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions")}


def _use(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    for key, value in job_environment(cluster).items():
        monkeypatch.setenv(key, value)
    for var in ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_QOS"):
        monkeypatch.delenv(var, raising=False)
    return cluster


@pytest.fixture
def slurm(slurm_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    """The one-node cluster for this test; jobs still queued when the test ends are cancelled."""
    yield _use(slurm_cluster, monkeypatch)
    slurm_cluster.cancel_all()


@pytest.fixture
def slurm_2n(slurm_cluster_2n: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    """The two-node cluster for this test; jobs still queued when the test ends are cancelled."""
    yield _use(slurm_cluster_2n, monkeypatch)
    slurm_cluster_2n.cancel_all()
