"""Render and submit SLURM jobs for metacot's stages (the library behind ``metacot launch slurm``).

A job is rendered from a template in ``launch/slurm/`` (``<stage>.sbatch``) by filling three blocks: the
``#SBATCH`` lines (resources, ``--requeue``, ``--open-mode=append``, ``--signal=B:USR1@<lead>``), the job's
variables (bash assignments), and ``launch/slurm/lib.sh`` (signal forwarding, requeue on preemption, helpers), so
the rendered script is self-contained. Nothing cluster-specific is in the templates: partition, account, qos and
time come from the request (or SLURM's own ``SBATCH_*`` environment variables), the environment activation is
the venv of the Python that renders (or a ``--setup`` file the job sources), and caches, data folders and NCCL
settings pass through the submitting environment (``--export=ALL``; NCCL_* and METACOT_VLLM_PYTHON are also
written into the script so a requeued run uses the same values).

Training stages (sft, grpo) validate the stage config with :func:`metacot.config.load_config`, make
``output_dir`` absolute and write the resolved config next to the script; the job runs that frozen file with
``train.resume=true``, so a requeue (same script) resumes from the newest checkpoint instead of starting over.
The other stages (calibrate, eval, export) have small job configs declared here, loaded the same way.

Bad requests fail at submit, never as a job pending forever: config errors (``???`` keys, inconsistent values),
process counts that do not divide the batch, more nodes / GPUs / CPUs than the partition has (``sinfo``), then
``sbatch --test-only`` for everything else SLURM knows (account, qos, limits).

Left out on purpose: heterogeneous jobs (judge nodes must look like trainer nodes), job monitoring beyond the
printed log paths, and clusters without ``scontrol``/``sinfo`` on the submit host.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import MISSING

from metacot.config import check, load_config, to_yaml
from metacot.launch_files import LAUNCH_DIR
from metacot.run import latest_checkpoint

TEMPLATE_DIR = LAUNCH_DIR / "slurm"
ACCELERATE_CONFIG = LAUNCH_DIR / "accelerate" / "deepspeed.yaml"
SIGNAL_LEAD_S = 600  # SIGUSR1 this long before the time limit: room to finish a step and save (less for short jobs)
JUDGE_WAIT_S = 1800  # bounded wait for a judge's /health before training (loading a large VLM takes minutes)
RECORDED_ENV = re.compile(r"^(NCCL_\w+|TORCH_NCCL_\w+|METACOT_VLLM_PYTHON)$")


class SlurmError(RuntimeError):
    """A launch request cannot be rendered or would not run; the message says what to change."""


# -- job configs of the stages that have no config schema of their own ----------------------------------------------

@dataclass
class ExportJob:
    run: str = MISSING  # run folder to export (its final/ must exist when the job starts, e.g. after --dependency)
    out: str = MISSING  # export folder
    args: list[str] = field(default_factory=list)  # further `metacot export` arguments, verbatim


@dataclass
class EvalJob:
    data: str = MISSING  # evaluation data (`metacot eval --data`)
    out: str = MISSING  # each model writes OUT/<name>/
    models: dict[str, str] = field(default_factory=dict)  # name (--method) -> model folder; one array task each
    args: list[str] = field(default_factory=list)  # further `metacot eval` arguments, e.g. ["--steps", "20"]

    def __post_init__(self) -> None:
        check(bool(self.models), "models", "name at least one model, e.g. models={sft: runs/sft/final}")


@dataclass
class CalibrateJob:
    labels: str = MISSING  # human labels JSONL (`metacot reward label`)
    samples: str = MISSING  # the labelled samples to score (`metacot reward score --in`)
    judge_model: str = MISSING  # judge model folder, served by vLLM in each array task
    out: str = MISSING  # calibration folder (calibration.json); scripts, logs and scores go to OUT.slurm/
    prompts: list[str] = field(default_factory=lambda: ["cec_v1"])  # prompt variants, one array task each
    mode: str = "choice"  # score reading of `metacot reward score`
    min_r: float = 0.8
    max_mae: float = 2.5

    def __post_init__(self) -> None:
        check(bool(self.prompts), "prompts", "name at least one prompt variant, e.g. prompts=[cec_v1]")
        check(len(set(self.prompts)) == len(self.prompts), "prompts", "variants must be distinct")


@dataclass(frozen=True)
class StageSpec:
    schema: str  # "module:Class" of the stage's config
    template: str  # file in launch/slurm/
    default_gpus: int  # --gpus-per-node when not given
    preset_stage: str | None = None  # prefix of presets for bare names (`--config tiny` -> sft_tiny.yaml)
    # CPUs per GPU (or per job without GPUs) when --cpus-per-node is not given; None = whole nodes (--exclusive).
    cpus_per_gpu: int | None = None


STAGES: dict[str, StageSpec] = {
    "sft": StageSpec("metacot.sft.config:SFTConfig", "sft.sbatch", 8, "sft"),
    "grpo": StageSpec("metacot.flow_grpo.config:GRPOConfig", "grpo.sbatch", 8, "grpo"),
    "calibrate": StageSpec("metacot.slurm:CalibrateJob", "calibrate.sbatch", 1, cpus_per_gpu=8),
    "eval": StageSpec("metacot.slurm:EvalJob", "eval.sbatch", 1, cpus_per_gpu=8),
    "export": StageSpec("metacot.slurm:ExportJob", "export.sbatch", 0, cpus_per_gpu=8),
}


@dataclass
class Request:
    """What ``metacot launch slurm`` was asked for (None = the stage's default or SLURM's)."""

    stage: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int | None = None
    cpus_per_node: int | None = None  # None = the stage's default (whole nodes for training)
    judge_nodes: int = 0
    judge_gpus: int | None = None
    judge_model: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    dependency: str | None = None
    array: str | None = None
    setup: str | None = None  # shell file sourced at job start; None = put this Python's venv first on PATH
    python: str = sys.executable

    @property
    def gpus(self) -> int:
        return STAGES[self.stage].default_gpus if self.gpus_per_node is None else self.gpus_per_node

    @property
    def cpus(self) -> int | None:
        """CPUs per node; None = whole nodes (training: every core and all memory of the node)."""
        per_gpu = STAGES[self.stage].cpus_per_gpu
        if self.cpus_per_node is not None or per_gpu is None:
            return self.cpus_per_node
        return per_gpu * max(1, self.gpus)


@dataclass
class Job:
    """A rendered job script. ``after_previous``: submitted with afterok on the job before it in the plan."""

    name: str
    script: Path
    log: Path  # with SLURM's %j / %A / %a patterns
    text: str
    after_previous: bool = False


@dataclass
class Plan:
    """What one request renders: one job, or an array job and the job that merges its results."""

    stage: str
    job_dir: Path
    jobs: list[Job]
    config_path: Path | None = None  # the frozen stage config (training stages)
    notes: list[str] = field(default_factory=list)


# -- small pure helpers ----------------------------------------------------------------------------------------------

def parse_time_s(spec: str) -> int | None:
    """Seconds of a SLURM time spec (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``); None = no limit.

    Raises:
        SlurmError: not a SLURM time spec.
    """
    spec = spec.strip()
    if spec.upper() in {"UNLIMITED", "INFINITE"}:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec)
    if not match:
        raise SlurmError(f"--time {spec!r} is not a SLURM time; use minutes, H:M:S or D-H:M:S (e.g. 2-00:00:00)")
    days, a, b, c = (int(x) if x else None for x in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        parts = [a, b or 0, c or 0]
        return days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if b is None:
        return a * 60  # M
    if c is None:
        return a * 60 + b  # M:S
    return a * 3600 + b * 60 + c  # H:M:S


def signal_lead_s(time_spec: str | None) -> int:
    """Seconds before the time limit at which SLURM sends SIGUSR1: :data:`SIGNAL_LEAD_S`, at most a fifth of it."""
    limit = parse_time_s(time_spec) if time_spec else None
    return SIGNAL_LEAD_S if limit is None else max(10, min(SIGNAL_LEAD_S, limit // 5))


def parse_gpus(gres: str) -> int:
    """GPU count of a ``sinfo %G`` field: ``gpu:4``, ``gpu:a100:8(S:0-1)``, ``gpu:2,mps:100``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def bash_value(value: Any) -> str:
    """A bash assignment's right-hand side: lists become arrays, everything else one quoted word."""
    if isinstance(value, (list, tuple)):
        return "(" + " ".join(shlex.quote(str(v)) for v in value) + ")"
    return shlex.quote(str(value))


def runtime_path(path: Path) -> str:
    """Double-quoted bash string for a log path whose %j / %A / %a SLURM fills in (known only inside the job)."""
    text = str(path)
    if re.search(r'["$`\\]', text):
        raise SlurmError(f"{text}: job folders may not contain quotes, '$', '`' or '\\'; choose another output folder")
    for pattern, var in (("%j", "${SLURM_JOB_ID}"), ("%A", "${SLURM_ARRAY_JOB_ID}"), ("%a", "${SLURM_ARRAY_TASK_ID}")):
        text = text.replace(pattern, var)
    return f'"{text}"'


def render_template(template: str, blocks: dict[str, str]) -> str:
    """Fill the ``{{NAME}}`` blocks of a template.

    Raises:
        SlurmError: a block is missing from the template, or the template has a block nobody fills.
    """
    found = set(re.findall(r"\{\{(\w+)\}\}", template))
    if found != set(blocks):
        raise SlurmError(f"template blocks {sorted(found)} do not match the rendered ones {sorted(blocks)}; "
                         f"launch/slurm/ and metacot/slurm.py disagree")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: blocks[m.group(1)], template)


def _schema(stage: str) -> type:
    module, _, name = STAGES[stage].schema.partition(":")
    return getattr(importlib.import_module(module), name)


def _stamp(job_dir: Path, stage: str) -> str:
    base = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    stamp, n = base, 1
    while (job_dir / f"{stamp}.sbatch").exists():
        n += 1
        stamp = f"{base}-{n}"
    return stamp


# -- rendering -------------------------------------------------------------------------------------------------------

def sbatch_header(req: Request, *, name: str, log: Path, nodes: int, gpus: int, cpus: int | None,
                  array: str | None = None) -> str:
    """The ``#SBATCH`` lines of a job. One task per node: the job steps start each node's processes."""
    opts = [f"--job-name=metacot-{name}", f"--output={log}", "--open-mode=append", "--requeue",
            f"--signal=B:USR1@{signal_lead_s(req.time)}", f"--nodes={nodes}", "--ntasks-per-node=1",
            f"--chdir={Path.cwd()}", "--export=ALL"]
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    # Whole nodes by default: training wants every core and all memory of its nodes.
    opts += [f"--cpus-per-task={cpus}"] if cpus else ["--exclusive", "--mem=0"]
    for flag, value in (("partition", req.partition), ("account", req.account), ("qos", req.qos),
                        ("time", req.time), ("dependency", req.dependency), ("array", array)):
        if value:
            opts.append(f"--{flag}={value}")
    return "\n".join(f"#SBATCH {opt}" for opt in opts)


def environment_block(req: Request) -> list[str]:
    """Bash lines that make ``python`` the project's and record NCCL / judge settings of the submitting shell."""
    if req.setup:
        setup = Path(req.setup).expanduser().resolve()
        if not setup.is_file():
            raise SlurmError(f"--setup {req.setup}: no such file; pass a shell file that activates the project env")
        lines = [f"source {shlex.quote(str(setup))}"]
    else:
        lines = [f'export PATH={shlex.quote(str(Path(req.python).parent))}:"$PATH"']
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if RECORDED_ENV.match(k)]
    return lines


def render_job(req: Request, *, name: str, template: str, job_dir: Path, stamp: str, nodes: int,
               variables: dict[str, Any], gpus: int | None = None, cpus: int | None = None,
               array: str | None = None, after_previous: bool = False) -> Job:
    """Render one job script into ``job_dir`` (written, executable) and return it."""
    script = job_dir / f"{stamp}.sbatch"
    log = job_dir / (f"{name}-%A_%a.log" if array else f"{name}-%j.log")
    gpus = req.gpus if gpus is None else gpus
    cpus = req.cpus if cpus is None else cpus
    values = {"METACOT_SCRIPT": str(script), "METACOT_JOB_DIR": str(job_dir),
              "METACOT_SIGNAL_LEAD_S": signal_lead_s(req.time), **variables}
    lines = [f"{key}={bash_value(value)}" for key, value in values.items()]
    lines.append(f"METACOT_LOG={runtime_path(log)}")
    lines += environment_block(req)
    text = render_template((TEMPLATE_DIR / template).read_text(), {
        "SBATCH": sbatch_header(req, name=name, log=log, nodes=nodes, gpus=gpus, cpus=cpus, array=array),
        "VARIABLES": "\n".join(lines),
        "LIB": (TEMPLATE_DIR / "lib.sh").read_text().rstrip("\n"),
    })
    script.write_text(text)
    script.chmod(0o755)
    return Job(name=name, script=script, log=log, text=text, after_previous=after_previous)


def _check_sft_world(cfg: Any, world: int) -> str | None:
    if cfg.batch_size % (cfg.micro_batch_size * world):
        return (f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size x processes = "
                f"{cfg.micro_batch_size} x {world}; change batch_size, micro_batch_size or the node / GPU counts")
    return None


def _check_grpo_world(cfg: Any, world: int) -> str | None:
    per_rank = cfg.samples_per_iteration // world
    if cfg.rollout.prompts_per_iteration % world or per_rank % (cfg.policy.micro_batch_size
                                                                * cfg.policy.updates_per_epoch):
        return (f"rollout.prompts_per_iteration={cfg.rollout.prompts_per_iteration} must be a multiple of the {world} "
                f"processes (a group never spans ranks) and each rank's {per_rank} samples must split into "
                f"policy.updates_per_epoch x policy.micro_batch_size; change them or the node / GPU counts")
    return None


WORLD_CHECKS: dict[str, Callable[[Any, int], str | None]] = {"sft": _check_sft_world, "grpo": _check_grpo_world}


JUDGE_URL_IN_JOB = "http://judge-served-in-the-job:0"  # placeholder in the frozen config; each node overrides it


def _judge_overrides(req: Request) -> list[str]:
    """Overrides that let a GRPO config validate when the job serves the judge itself (--judge-model).

    ``judge.url`` is only known inside the job (each trainer node is given its judge's URL), so the frozen config
    holds a placeholder; ``judge.model`` (the served name) defaults to the judge folder's name, the name
    ``metacot launch slurm calibrate`` reports under, unless the config or an override names it.
    """
    if req.stage != "grpo" or not req.judge_model:
        return []
    if any(o.startswith("judge.url=") for o in req.overrides):
        raise SlurmError("judge.url=... and --judge-model both given: the job either serves the judge itself "
                         "(--judge-model) or uses a running server (judge.url); drop one")
    from omegaconf import OmegaConf

    from metacot.config import resolve_config_path

    merged = OmegaConf.structured(_schema("grpo"))
    if req.config is not None:
        merged = OmegaConf.merge(merged, OmegaConf.load(resolve_config_path(req.config, "grpo")))
    named = OmegaConf.select(merged, "judge.model", default=None, throw_on_missing=False) not in (None, "") or any(
        o.startswith("judge.model=") for o in req.overrides)
    extra = [f"judge.url={JUDGE_URL_IN_JOB}"]
    return extra if named else [*extra, f"judge.model={Path(req.judge_model).name}"]


def _judge_plan(req: Request, cfg: Any) -> dict[str, Any]:
    """How a GRPO job gets its judge: none, shared (on trainer nodes' spare GPUs) or dedicated nodes."""
    from metacot.flow_grpo.gate import uses_vlm_judge

    uses_judge = uses_vlm_judge(cfg.rewards)
    if not req.judge_model:
        if req.judge_nodes or req.judge_gpus is not None:
            raise SlurmError("--judge-nodes / --judge-gpus need --judge-model DIR (the judge to serve in the job)")
        if uses_judge and not cfg.judge.url:
            raise SlurmError("a reward uses the VLM judge (cec_vlm) and judge.url is unset: pass --judge-model DIR "
                             "to serve it inside the job, or set judge.url=http://HOST:PORT (a running server)")
        return {"METACOT_JUDGE": "none", "METACOT_JUDGE_NODES": 0}
    if not uses_judge:
        raise SlurmError("--judge-model given but no reward of this config uses the VLM judge (cec_vlm); drop "
                         "--judge-model / --judge-nodes / --judge-gpus or add the cec_vlm reward")
    model = Path(req.judge_model).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise SlurmError(f"--judge-model {req.judge_model}: no config.json there; pass a local model folder")
    mode = "dedicated" if req.judge_nodes else "shared"
    judge_gpus = req.judge_gpus if req.judge_gpus is not None else (min(1, req.gpus) if mode == "shared" else req.gpus)
    if mode == "shared" and req.gpus and not 0 < judge_gpus < req.gpus:
        raise SlurmError(f"--judge-gpus {judge_gpus} with --gpus-per-node {req.gpus}: a node shared by judge and "
                         f"trainer needs 1..{req.gpus - 1} judge GPUs; or use --judge-nodes K for dedicated nodes")
    return {"METACOT_JUDGE": mode, "METACOT_JUDGE_NODES": req.judge_nodes, "METACOT_JUDGE_GPUS": judge_gpus,
            "METACOT_JUDGE_MODEL": str(model), "METACOT_JUDGE_NAME": cfg.judge.model,
            "METACOT_JUDGE_WAIT_S": JUDGE_WAIT_S}


def plan_trainer(req: Request) -> Plan:
    """sft / grpo: validate and freeze the stage config, then render the trainer job."""
    spec = STAGES[req.stage]
    if req.array:
        raise SlurmError(f"--array is for calibrate and eval; {req.stage} runs as one (multi-node) job")
    if req.stage != "grpo" and (req.judge_nodes or req.judge_model or req.judge_gpus is not None):
        raise SlurmError("--judge-nodes / --judge-model / --judge-gpus are for grpo")
    overrides = [*req.overrides, *_judge_overrides(req)]
    cfg = load_config(_schema(req.stage), req.config, overrides, stage=spec.preset_stage)
    if not cfg.train.resume:
        raise SlurmError("train.resume=false: a requeued job re-runs the same script and must resume from its "
                         "checkpoints; drop train.resume=false (use a fresh output_dir to start over)")
    if cfg.train.device == "cuda" and not req.gpus:
        raise SlurmError("train.device=cuda with --gpus-per-node 0: ask for GPUs or set train.device=auto/cpu")
    out = Path(cfg.output_dir).expanduser().resolve()
    cfg.output_dir = str(out)  # fixed: a requeue must find this run's checkpoints, whatever the working directory
    judge = _judge_plan(req, cfg) if req.stage == "grpo" else {"METACOT_JUDGE": "none", "METACOT_JUDGE_NODES": 0}
    procs = max(1, req.gpus - (judge.get("METACOT_JUDGE_GPUS", 0) if judge["METACOT_JUDGE"] == "shared" else 0))
    problem = WORLD_CHECKS[req.stage](cfg, req.nodes * procs)
    if problem:
        raise SlurmError(problem)
    job_dir = out / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(job_dir, req.stage)
    config_path = job_dir / f"{stamp}.yaml"
    config_path.write_text(to_yaml(cfg))
    load_config(_schema(req.stage), config_path)  # the frozen file must load as it will inside the job
    variables = {"METACOT_NODES": req.nodes, "METACOT_PROCS_PER_NODE": procs, "METACOT_GPUS_PER_NODE": req.gpus,
                 "METACOT_CONFIG": str(config_path), "METACOT_ACCELERATE_CONFIG": str(ACCELERATE_CONFIG), **judge}
    job = render_job(req, name=req.stage, template=spec.template, job_dir=job_dir, stamp=stamp,
                     nodes=req.nodes + req.judge_nodes, variables=variables)
    notes = []
    latest = latest_checkpoint(out / "checkpoints")
    if latest is not None:
        notes.append(f"{out} already holds checkpoints up to {latest.name}: the job continues that run "
                     f"(choose a new output_dir to start over)")
    return Plan(req.stage, job_dir, [job], config_path=config_path, notes=notes)


def _array_spec(req: Request, n: int, what: str) -> str:
    """The job array of ``n`` tasks, or the user's ``--array`` after checking its indices exist."""
    if not req.array:
        return f"0-{n - 1}"
    indices = [int(x) for x in re.findall(r"\d+", req.array.split("%")[0])]
    if not indices or max(indices) >= n:
        raise SlurmError(f"--array {req.array}: this job has {n} {what} (indices 0..{n - 1})")
    return req.array


def _single_node(req: Request) -> None:
    if req.nodes != 1 or req.judge_nodes or req.judge_model or req.judge_gpus is not None:
        raise SlurmError(f"{req.stage} jobs run on one node each: drop --nodes / --judge-* options")


def _existing(path: str, what: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise SlurmError(f"{what} {path} does not exist (looked at {resolved})")
    return resolved


def plan_calibrate(req: Request) -> Plan:
    """calibrate: an array job scoring one prompt variant per task, then a merge job (afterok) writing the report."""
    _single_node(req)
    cfg = load_config(CalibrateJob, req.config, req.overrides)
    labels, samples = _existing(cfg.labels, "labels"), _existing(cfg.samples, "samples")
    model = _existing(cfg.judge_model, "judge_model")
    out = Path(cfg.out).expanduser().resolve()
    job_dir = out.parent / f"{out.name}.slurm"  # not inside OUT: the report folder is replaced atomically
    scores = job_dir / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(job_dir, "calibrate")
    array = _array_spec(req, len(cfg.prompts), "prompt variants")
    score_job = render_job(req, name="calibrate", template="calibrate.sbatch", job_dir=job_dir, stamp=stamp,
                           nodes=1, array=array, variables={
                               "METACOT_PROMPTS": cfg.prompts, "METACOT_JUDGE_MODEL": str(model),
                               "METACOT_SAMPLES": str(samples), "METACOT_SCORES_DIR": str(scores),
                               "METACOT_MODE": cfg.mode, "METACOT_JUDGE_WAIT_S": JUDGE_WAIT_S})
    merge_req = dataclasses.replace(req, dependency=None)
    merge_job = render_job(merge_req, name="calibrate_merge", template="calibrate_merge.sbatch", job_dir=job_dir,
                           stamp=f"{stamp}-merge", nodes=1, gpus=0, cpus=1, after_previous=True, variables={
                               "METACOT_LABELS": str(labels), "METACOT_OUT": str(out),
                               "METACOT_SCORE_FILES": [str(scores / f"{p}.jsonl") for p in cfg.prompts],
                               "METACOT_JUDGE_NAME": model.name, "METACOT_MIN_R": cfg.min_r,
                               "METACOT_MAX_MAE": cfg.max_mae})
    return Plan("calibrate", job_dir, [score_job, merge_job])


def plan_eval(req: Request) -> Plan:
    """eval: an array job, one model per task, each into OUT/<name>/."""
    _single_node(req)
    cfg = load_config(EvalJob, req.config, req.overrides)
    out = Path(cfg.out).expanduser().resolve()
    job_dir = out / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    names = list(cfg.models)
    job = render_job(req, name="eval", template="eval.sbatch", job_dir=job_dir, stamp=_stamp(job_dir, "eval"),
                     nodes=1, array=_array_spec(req, len(names), "models"), variables={
                         "METACOT_METHODS": names, "METACOT_MODELS": [cfg.models[n] for n in names],
                         "METACOT_DATA": cfg.data, "METACOT_OUT": str(out), "METACOT_ARGS": list(cfg.args)})
    return Plan("eval", job_dir, [job])


def plan_export(req: Request) -> Plan:
    """export: one job running ``metacot export RUN --out DIR``; scripts and logs go to RUN/slurm/."""
    _single_node(req)
    if req.array:
        raise SlurmError("--array is for calibrate and eval; export runs as one job")
    cfg = load_config(ExportJob, req.config, req.overrides)
    run = Path(cfg.run).expanduser().resolve()
    job_dir = run / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    job = render_job(req, name="export", template="export.sbatch", job_dir=job_dir,
                     stamp=_stamp(job_dir, "export"), nodes=1, variables={
                         "METACOT_RUN": str(run), "METACOT_OUT": str(Path(cfg.out).expanduser().resolve()),
                         "METACOT_ARGS": list(cfg.args)})
    return Plan("export", job_dir, [job])


PLANNERS: dict[str, Callable[[Request], Plan]] = {
    "sft": plan_trainer, "grpo": plan_trainer, "calibrate": plan_calibrate, "eval": plan_eval, "export": plan_export}


def render(req: Request) -> Plan:
    """Validate a request and write its job script(s) (and frozen config) into the job folder.

    Raises:
        SlurmError: the request cannot run as asked; metacot.config.ConfigError: the stage config is invalid.
    """
    if req.stage not in STAGES:
        raise SlurmError(f"unknown stage {req.stage!r}; choose one of {', '.join(STAGES)}")
    if req.nodes < 1 or req.gpus < 0 or req.judge_nodes < 0 or (req.cpus_per_node is not None
                                                                and req.cpus_per_node < 1):
        raise SlurmError(f"--nodes ({req.nodes}) and --cpus-per-node ({req.cpus_per_node}) must be >= 1, "
                         f"--gpus-per-node ({req.gpus}) and --judge-nodes ({req.judge_nodes}) >= 0")
    if req.time:
        parse_time_s(req.time)
    return PLANNERS[req.stage](req)


# -- checks against the cluster and submission ---------------------------------------------------------------------

def _slurm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise SlurmError(f"{args[0]} not found: run metacot launch slurm on a host with the SLURM client commands") \
            from exc


def partition_nodes(partition: str | None) -> tuple[str, list[tuple[str, int, int]]]:
    """(partition name, [(node, cpus, gpus)]) of the partition a job would use (its default one when None).

    Raises:
        SlurmError: sinfo fails, or the partition does not exist.
    """
    part = partition or os.environ.get("SBATCH_PARTITION")
    if not part:
        listing = _slurm("sinfo", "-h", "-o", "%P")
        defaults = [p.rstrip("*") for p in listing.stdout.split() if p.endswith("*")]
        if listing.returncode != 0 or not defaults:
            raise SlurmError(f"cannot find the default partition (sinfo: {listing.stderr.strip() or 'no default'}); "
                             f"pass --partition")
        part = defaults[0]
    done = _slurm("sinfo", "-h", "-N", "-p", part, "-o", "%N %c %G")
    if done.returncode != 0:
        raise SlurmError(f"sinfo -p {part} failed: {done.stderr.strip()}")
    nodes = {}
    for line in done.stdout.splitlines():
        name, cpus, gres = (line.split() + ["", "", ""])[:3]
        nodes[name] = (name, int(cpus.rstrip("+") or 0), parse_gpus(gres))
    if not nodes:
        raise SlurmError(f"partition {part!r} does not exist or has no nodes; `sinfo -s` lists the partitions")
    return part, list(nodes.values())


def check_resources(req: Request, plan: Plan) -> None:
    """Refuse what the partition cannot ever give: more nodes, GPUs or CPUs per node than it has.

    Raises:
        SlurmError: naming the partition, what it has and what to change.
    """
    part, nodes = partition_nodes(req.partition)
    needed = req.nodes + req.judge_nodes
    if needed > len(nodes):
        raise SlurmError(f"the job needs {needed} node(s) ({req.nodes} --nodes + {req.judge_nodes} --judge-nodes) but "
                         f"partition {part!r} has {len(nodes)}; lower the counts or choose another --partition")
    gpus = 0 if plan.stage == "export" else req.gpus
    if gpus:
        fit = [n for n in nodes if n[2] >= gpus]
        if len(fit) < needed:
            most = max(n[2] for n in nodes)
            raise SlurmError(f"the job needs {needed} node(s) with {gpus} GPUs but partition {part!r} has {len(fit)} "
                             f"(at most {most} GPUs per node); change --gpus-per-node (0 = CPU only) or --partition")
    if req.cpus:
        most = max(n[1] for n in nodes)
        if req.cpus > most:
            raise SlurmError(f"{req.cpus} CPUs per node asked (--cpus-per-node) but partition {part!r} has at most "
                             f"{most} per node; pass a smaller --cpus-per-node")


def check_dependency(spec: str | None) -> None:
    """Refuse a dependency SLURM could never satisfy: an unknown job, or ``afterok`` on a job that already failed.

    SLURM would otherwise keep the new job pending (DependencyNeverSatisfied) or silently drop the condition.

    Raises:
        SlurmError: naming the job and its state.
    """
    for kind, ids in re.findall(r"(\w+):([\d:_]+)", spec or ""):
        for job_id in filter(None, ids.split(":")):
            done = _slurm("scontrol", "-o", "show", "job", job_id.split("_")[0])
            state = re.search(r"JobState=(\S+)", done.stdout)
            if done.returncode != 0 or not state:
                raise SlurmError(f"--dependency {spec}: job {job_id} is unknown to SLURM (it never existed or ended "
                                 f"long ago); check the id with squeue")
            if kind == "afterok" and state.group(1) in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                        "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL", "PREEMPTED"}:
                raise SlurmError(f"--dependency {spec}: job {job_id} already ended {state.group(1)}, so this job "
                                 f"would never start; fix and resubmit that job first")


def sbatch_test_only(job: Job) -> None:
    """``sbatch --test-only``: SLURM's own verdict (limits, account, qos, dependency) without queueing anything.

    Raises:
        SlurmError: sbatch refused the job; its message is included.
    """
    done = _slurm("sbatch", "--test-only", str(job.script))
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused {job.script.name}: {done.stderr.strip() or done.stdout.strip()}; fix the "
                         f"request (partition, account, qos, time, resources) and submit again")


@dataclass
class Submitted:
    job: Job
    job_id: str

    @property
    def log(self) -> str:
        """The log path: %j / %A filled with the job id, %a left as * (one log per array task)."""
        return str(self.job.log).replace("%j", self.job_id).replace("%A", self.job_id).replace("%a", "*")


def submit(req: Request, plan: Plan) -> list[Submitted]:
    """Check a rendered plan against the cluster, then submit its jobs in order (a merge job after its array).

    Raises:
        SlurmError: a check or sbatch failed (when a check fails, nothing of the plan is queued).
    """
    check_resources(req, plan)
    check_dependency(req.dependency)
    for job in plan.jobs:
        sbatch_test_only(job)
    out: list[Submitted] = []
    for job in plan.jobs:
        cmd = ["sbatch", "--parsable"]
        if job.after_previous and out:
            cmd.append(f"--dependency=afterok:{out[-1].job_id}")
        done = _slurm(*cmd, str(job.script))
        if done.returncode != 0:
            raise SlurmError(f"sbatch {job.script} failed: {done.stderr.strip()}")
        out.append(Submitted(job, done.stdout.strip().split(";")[0]))
    return out
