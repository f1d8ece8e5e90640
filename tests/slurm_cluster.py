"""A real SLURM cluster on this machine, for the ``slurm`` tests: install, configure, start, query, stop by PID.

Debian's ``slurmctld slurmd slurm-client munge`` run as root without systemd or cgroups
(shared/notes/slurm.md has the config this follows and the pitfalls it avoids). Everything a cluster writes lives
in one private folder: config, munge key and socket, state, spool, logs. Ports are picked free at start, so a
cluster never collides with another one on the same machine. Daemons are started in their own sessions and
stopped by the PIDs recorded here (jobs cancelled first: stopping slurmd would leave running steps behind).

Variants: one node named after this host (``nodes=1``), or ``nodes=N`` virtual nodes ``<prefix>1..N`` that all
live on 127.0.0.1 (one slurmd each, on its own port; names mapped in /etc/hosts) with optional fake GPUs
(character devices standing in for /dev/nvidia*, so jobs get ``CUDA_VISIBLE_DEVICES``). What this leaves out:
accounting (slurmdbd), cgroups, and real GPUs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# metacot-test-slurm"
MAX_TIME_MIN = 600  # the partition's time limit, minutes


def ensure_installed() -> str | None:
    """Install the SLURM and munge packages with apt-get when missing (root only).

    Returns:
        None when every command is available, else the reason it is not (for ``require``).
    """
    missing = sorted({pkg for cmd, pkg in COMMANDS.items() if shutil.which(cmd) is None})
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM packages missing ({' '.join(missing)}) and cannot apt-get them here (needs root + apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
    still = [cmd for cmd in COMMANDS if shutil.which(cmd) is None]
    return f"still missing after apt-get: {still}" if still else None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in socks:
        sock.close()
    return ports


class ClusterError(RuntimeError):
    """The local cluster did not start or answer; the message names the log to read."""


@dataclass
class LocalCluster:
    """A running local cluster. Use :func:`start_cluster`; stop with :meth:`stop`."""

    base: Path
    nodes: list[str]
    cpus_per_node: int
    gpus_per_node: int
    partition: str = "debug"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    hosts_added: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment under which SLURM commands talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; raise with its output when ``check`` and it fails."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    # -- state ---------------------------------------------------------------------------------------------------
    def node_states(self) -> dict[str, str]:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (or mixed/allocated: up and answering)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s.rstrip("*") == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise ClusterError(f"nodes not idle after {timeout:.0f}s: {states}; see {self.base / 'log'}")

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields of a job still known to the controller; {} once it has been purged."""
        done = self.cmd("scontrol", "-o", "show", "job", job_id, check=False)
        if done.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for token in done.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """Final records from the job completion log (job id -> fields such as JobState, ExitCode, NodeCnt)."""
        path = self.base / "log" / "jobcomp.log"
        records: dict[str, dict[str, str]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                fields = dict(tok.partition("=")[::2] for tok in line.split() if "=" in tok)
                if "JobId" in fields:
                    records[fields["JobId"]] = fields  # a requeued job appears once per run; the last one wins
        return records

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait for a job to end (for good: a requeue is not an end); returns its ``scontrol`` or jobcomp fields."""
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info:
                last = info
                state = info.get("JobState", "")
                if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED"}:
                    return info
            elif job_id in self.finished_jobs():
                return self.finished_jobs()[job_id]
            time.sleep(0.5)
        raise ClusterError(f"job {job_id} did not end within {timeout:.0f}s; last seen {last.get('JobState')}")

    def wait_running(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") == "RUNNING":
                return info
            time.sleep(0.3)
        raise ClusterError(f"job {job_id} not running within {timeout:.0f}s (state {info.get('JobState')})")

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until the queue is empty (running steps must end before slurmd stops)."""
        ids = self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:
            self.cmd("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split():
                return
            time.sleep(0.5)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}; see logs in {self.base / 'log'}")

    # -- teardown ------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel jobs, then stop slurmd(s), slurmctld and munged by PID; remove /etc/hosts lines it added."""
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
            for name in order:
                proc = self.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            _remove_hosts(self.hosts_added)
            shutil.rmtree(self.base, ignore_errors=True)


def _add_hosts(names: list[str]) -> list[str]:
    """Map ``names`` to 127.0.0.1 in /etc/hosts where they do not resolve yet; return the names added."""
    added = []
    for name in names:
        try:
            socket.gethostbyname(name)
            continue
        except OSError:
            added.append(name)
    if added:
        with HOSTS_FILE.open("a") as fh:
            fh.writelines(f"127.0.0.1 {name} {HOSTS_MARK}\n" for name in added)
    return added


def _remove_hosts(names: list[str]) -> None:
    if not names:
        return
    lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    drop = {f"127.0.0.1 {name} {HOSTS_MARK}\n" for name in names}
    HOSTS_FILE.write_text("".join(line for line in lines if line not in drop))


def _config(c: LocalCluster, host: str, ctld_port: int, node_ports: list[int], munge_socket: Path) -> str:
    base = c.base
    lines = [
        f"ClusterName=mc{ctld_port}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        # cred_expire also delays a requeued job's restart (default 120 s): keep the tests short.
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket},cred_expire=5",
        "MpiDefault=none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill", "SchedulerParameters=batch_sched_delay=0",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SlurmdParameters=config_overrides",
        # A request beyond the partition is refused at submit instead of pending forever.
        "EnforcePartLimits=ALL", "ReturnToService=2", "MinJobAge=5", "MailProg=/bin/true",
        "KillWait=30", "InactiveLimit=0",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={base}/log/jobcomp.log",
        f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool/%n",
        f"SlurmctldPidFile={base}/run/slurmctld.pid", f"SlurmdPidFile={base}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={base}/log/slurmctld.log", f"SlurmdLogFile={base}/log/slurmd-%n.log",
    ]
    cores = f"CPUs={c.cpus_per_node} Boards=1 SocketsPerBoard=1 CoresPerSocket={c.cpus_per_node} ThreadsPerCore=1"
    gres = ""
    if c.gpus_per_node:
        lines.append("GresTypes=gpu")
        gres = f" Gres=gpu:{c.gpus_per_node}"
    if len(c.nodes) == 1 and c.nodes[0] == host:
        lines.append(f"NodeName={host} NodeAddr=127.0.0.1 Port={node_ports[0]} {cores} RealMemory=4000{gres}")
    else:
        for name, port in zip(c.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {cores} "
                         f"RealMemory=4000{gres}")
    # A time limit, so that asking beyond it can be tested (refused at submit under EnforcePartLimits=ALL).
    lines.append(f"PartitionName={c.partition} Nodes=ALL Default=YES MaxTime={MAX_TIME_MIN} State=UP")
    return "\n".join(lines) + "\n"


def _start(c: LocalCluster, name: str, args: list[str], **kwargs: object) -> None:
    log = open(c.base / "log" / f"{name}.stdout", "ab")
    c.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, "SLURM_CONF": str(c.conf)},
                                     **kwargs)  # type: ignore[call-overload]


def _start_munge(c: LocalCluster) -> Path:
    """munged as user munge with its own key, socket and files under the cluster folder."""
    import pwd

    mdir = c.base / "munge"
    mdir.mkdir()
    mdir.chmod(0o755)  # munged requires a socket folder that everyone can traverse, writable by it alone
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    user = pwd.getpwnam("munge")
    for path in (mdir, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    sock = mdir / "munge.sock"
    _start(c, "munged", ["munged", "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={mdir}/munged.pid",
                         f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"],
           user="munge", group="munge", extra_groups=[])
    deadline = time.monotonic() + 20
    while not sock.exists():
        c._check_alive()
        if time.monotonic() > deadline:
            raise ClusterError(f"munged did not create {sock} in 20s; see {mdir / 'munged.log'}")
        time.sleep(0.1)
    return sock


def _fake_gpus(c: LocalCluster) -> None:
    """Character devices standing in for GPUs (regular files and /dev/null are refused by slurmd)."""
    dev = c.base / "dev"
    dev.mkdir()
    for i in range(c.gpus_per_node):
        os.mknod(dev / f"gpu{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    last = c.gpus_per_node - 1
    files = f"{dev}/gpu0" if last == 0 else f"{dev}/gpu[0-{last}]"
    (c.base / "gres.conf").write_text(f"NodeName={','.join(c.nodes)} Name=gpu File={files}\n")


def start_cluster(*, nodes: int = 1, cpus_per_node: int = 2, gpus_per_node: int = 0, prefix: str = "mcn",
                  timeout: float = 60) -> LocalCluster:
    """Write a config into a fresh folder and start munged, slurmctld and one slurmd per node; wait for idle.

    Args:
        nodes: 1 = this host as the only node; more = virtual nodes ``<prefix>1..N`` on 127.0.0.1.
        cpus_per_node: CPUs each node advertises (several virtual nodes share the real cores).
        gpus_per_node: fake GPUs per node (0 = none).
        prefix: virtual node name prefix (mapped to 127.0.0.1 in /etc/hosts while the cluster runs).
        timeout: seconds to wait for the nodes to become idle.

    Raises:
        ClusterError: a daemon exited or the nodes did not become idle; the message names the logs.
    """
    host = socket.gethostname()
    base = Path(tempfile.mkdtemp(prefix="metacot-slurm-", dir="/tmp"))
    base.chmod(0o755)  # munged (user munge) must traverse into its folder
    names = [host] if nodes == 1 else [f"{prefix}{i}" for i in range(1, nodes + 1)]
    c = LocalCluster(base=base, nodes=names, cpus_per_node=cpus_per_node, gpus_per_node=gpus_per_node)
    try:
        for sub in ("state", "spool", "log", "run"):
            (base / sub).mkdir()
        if nodes > 1:
            c.hosts_added = _add_hosts(names)
        if gpus_per_node:
            _fake_gpus(c)
        ctld_port, *node_ports = _free_ports(1 + len(names))
        sock = _start_munge(c)
        c.conf.write_text(_config(c, host, ctld_port, node_ports, sock))
        _start(c, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(c.conf)])
        for name in names:
            (base / "spool" / name).mkdir()
            _start(c, f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(c.conf)])
        c.wait_idle(timeout)
    except BaseException:
        c.stop()
        raise
    return c
