"""Jobs on a real local SLURM cluster, submitted through ``metacot launch slurm`` (marker ``slurm``).

Tiny runs on CPU (tiny models, tiny synthetic data, DeepSpeed ZeRO-2 through one ``accelerate launch`` per node):

- SFT: a run to completion; both preemption paths (a hard ``scontrol requeue`` and ``scancel --batch
  --signal=USR1``), each ending with weights bitwise equal to the uninterrupted run's; a failing job; requests
  refused at submit (nothing queued); a two-node ZeRO-3 run meeting at the first node, requeued and resumed.
- The SFT -> GRPO -> export chain through ``--dependency afterok``; an eval job array (one task per model).
- With the vLLM environment (markers ``vllm``, ``slow``): GRPO with the judge served on a dedicated node, and the
  calibration array (one judge + prompt variant per task) followed by its merge job.

The uninterrupted reference run is submitted once and runs beside the preemption tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from metacot.launch_cli import main as launch_main
from metacot.run import is_complete
from tests.conftest import require
from tests.fixtures_slurm import job_environment
from tests.slurm_cluster import LocalCluster

pytestmark = pytest.mark.slurm

STEPS, SAVE_EVERY = 20, 4
JOB = ["--gpus-per-node", "0", "--cpus-per-node", "1"]
FAST = ["batch_size=2", "micro_batch_size=2", "data.understanding_ratio=0.5", "train.wandb_mode=disabled",
        "train.progress=false", "train.warmup_steps=0", "train.keep_checkpoints=0", "train.log_every=1"]


def sft_overrides(models, data: Path, out: Path, steps: int = STEPS, save_every: int = SAVE_EVERY) -> list[str]:
    return [f"model={models.pipeline}", f"data.train={data / 'train.jsonl'}", f"output_dir={out}",
            f"train.max_steps={steps}", f"train.save_every={save_every}", *FAST]


def submit(capsys: pytest.CaptureFixture, *args: str) -> list[tuple[str, str, Path]]:
    """Run ``metacot launch slurm ...``; return (name, job id, log path) of each submitted job."""
    code = launch_main(["slurm", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    jobs = re.findall(r"^submitted (\S+) job (\d+).*\n  script: .*\n  log:    (.*)$", out, flags=re.M)
    assert jobs, out
    return [(name, job_id, Path(log)) for name, job_id, log in jobs]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((run / "final").rglob("*.safetensors")):
        for key, value in load_file(path).items():
            tensors[f"{path.relative_to(run / 'final')}:{key}"] = value
    assert tensors, f"no safetensors under {run / 'final'}"
    return tensors


def assert_same_weights(run: Path, reference: Path) -> None:
    got, want = final_weights(run), final_weights(reference)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001 - a zero-argument callable
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def job_end(cluster: LocalCluster, job_id: str, log: Path, timeout: float = 400) -> dict[str, str]:
    info = cluster.wait_job(job_id, timeout)
    return {**info, "log_text": log.read_text() if log.exists() else ""}


@pytest.fixture(scope="module")
def reference(slurm_cluster: LocalCluster, tiny_models, tiny_dataset: Path, tmp_path_factory) -> Iterator[dict]:
    """The uninterrupted run, submitted once; tests wait for it only when they need its result."""
    from metacot.slurm import Request, render, submit

    out = tmp_path_factory.mktemp("slurm") / "reference"
    env = job_environment(slurm_cluster)  # what the `slurm` fixture sets; module scope has no monkeypatch
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        req = Request("sft", "tiny", sft_overrides(tiny_models, tiny_dataset, out), gpus_per_node=0, cpus_per_node=1)
        [job] = submit(req, render(req))
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    yield {"run": out, "job": job.job_id, "log": Path(job.log)}


def finished_reference(cluster: LocalCluster, reference: dict) -> Path:
    info = job_end(cluster, reference["job"], reference["log"])
    assert info["JobState"] == "COMPLETED", info["log_text"][-3000:]
    return reference["run"]


def test_hard_requeue_resumes_from_a_checkpoint(slurm: LocalCluster, reference: dict, tiny_models,
                                                tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "requeued"
    [(_, job_id, log)] = submit(capsys, "sft", "--config", "tiny", *JOB,
                                *sft_overrides(tiny_models, tiny_dataset, run))
    wait_for(lambda: is_complete(run / "checkpoints" / f"step-{SAVE_EVERY}"), 300, "the first periodic checkpoint")
    assert not (run / "final").exists(), "the run finished before it could be requeued; raise STEPS"
    slurm.cmd("scontrol", "requeue", job_id)
    info = job_end(slurm, job_id, log)
    assert info["JobState"] == "COMPLETED", info["log_text"][-3000:]
    text = info["log_text"]
    resumed = re.search(rf"resumed from {run}/checkpoints/step-(\d+) at step (\d+)", text)
    assert "(run 2)" in text and resumed and resumed.group(1) == resumed.group(2), text[-3000:]
    # SLURM sends SIGTERM before killing: the trainer saves then, else the newest periodic checkpoint is used.
    assert SAVE_EVERY <= int(resumed.group(1)) < STEPS
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))
    assert_same_weights(run, finished_reference(slurm, reference))


def test_killed_job_requeued_resumes_from_the_last_periodic_checkpoint(slurm: LocalCluster, reference: dict,
                                                                         tiny_models, tiny_dataset: Path,
                                                                         tmp_path: Path, capsys) -> None:
    """A hard stop (SIGKILL to every process of the job, as when a node dies), then a requeue."""
    run = tmp_path / "killed"
    [(_, job_id, log)] = submit(capsys, "sft", "--config", "tiny", *JOB,
                                *sft_overrides(tiny_models, tiny_dataset, run))
    wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["step"] > SAVE_EVERY for r in metrics(run)), 300,
             "a step after the first periodic checkpoint")
    # `scancel --signal=KILL` would be a cancel (SIGTERM first, and the trainer would save): kill the processes.
    listing = slurm.cmd("scontrol", "listpids", job_id).stdout.split("\n")[1:]
    pids = {int(line.split()[0]) for line in listing if line.split() and line.split()[0].isdigit()}
    assert pids, listing
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: slurm.job_info(job_id).get("JobState") not in {"RUNNING", "COMPLETING"}, 60, "the kill")
    assert not (run / "final").exists(), "the run finished before it was killed; raise STEPS"
    killed_at = max(r["step"] for r in metrics(run))
    slurm.cmd("scontrol", "requeue", job_id)
    info = job_end(slurm, job_id, log)
    assert info["JobState"] == "COMPLETED", info["log_text"][-3000:]
    resumed = re.search(rf"resumed from {run}/checkpoints/step-(\d+) at step", info["log_text"])
    assert resumed and int(resumed.group(1)) == killed_at // SAVE_EVERY * SAVE_EVERY, (resumed, killed_at)
    assert not any("stopped_by" in r for r in metrics(run)), "SIGKILL leaves no chance to save"
    assert_same_weights(run, finished_reference(slurm, reference))


def test_usr1_saves_and_requeues(slurm: LocalCluster, reference: dict, tiny_models, tiny_dataset: Path,
                                 tmp_path: Path, capsys) -> None:
    run = tmp_path / "usr1"
    [(_, job_id, log)] = submit(capsys, "sft", "--config", "tiny", *JOB,
                                *sft_overrides(tiny_models, tiny_dataset, run))
    wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in metrics(run)), 300,
             "two training steps")
    slurm.cmd("scancel", "--batch", "--signal=USR1", job_id)
    info = job_end(slurm, job_id, log)
    assert info["JobState"] == "COMPLETED", info["log_text"][-3000:]
    text = info["log_text"]
    assert "received SIGUSR1" in text and "requeueing job" in text and "(run 2)" in text, text[-3000:]
    stop = [r for r in metrics(run) if r.get("stopped_by") == "SIGUSR1"]
    assert len(stop) == 1 and 2 <= stop[0]["step"] < STEPS
    assert f"resumed from {run}/checkpoints/step-{stop[0]['step']} at step {stop[0]['step']}" in text
    assert_same_weights(run, finished_reference(slurm, reference))


def test_failing_job_reports_a_nonzero_state_and_its_log(slurm: LocalCluster, tiny_models, tiny_dataset: Path,
                                                         tmp_path: Path, capsys) -> None:
    run = tmp_path / "failing"
    missing = tmp_path / "no-such-data" / "train.jsonl"
    [(_, job_id, log)] = submit(capsys, "sft", "--config", "tiny", *JOB,
                                *sft_overrides(tiny_models, tiny_dataset, run), f"data.train={missing}")
    info = job_end(slurm, job_id, log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert str(missing) in info["log_text"]  # the trainer's own message
    assert f"FAILED: the step exited with code 1; see this log: {log}" in info["log_text"]
    assert "requeue" not in info["log_text"].split("FAILED")[-1]


def test_sft_job_runs_to_completion(slurm: LocalCluster, reference: dict) -> None:
    run = finished_reference(slurm, reference)
    info = slurm.finished_jobs().get(reference["job"]) or slurm.job_info(reference["job"])
    assert info.get("ExitCode", "0:0") == "0:0"
    assert is_complete(run / "final")
    assert sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if is_complete(p)) == list(
        range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    log = reference["log"].read_text()
    assert "accelerate" not in log.split("rendezvous")[0] and "] done" in log and "(run 1)" in log


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2"], "partition 'debug' has 1"),
    (["--gpus-per-node", "1"], "with 1 GPUs but partition 'debug' has 0"),
    (["--cpus-per-node", "64"], "has at most 2 per node"),
    (["--partition", "nope"], "partition 'nope' does not exist"),
    (["--time", "11:00:00"], "sbatch refused"),  # the partition's MaxTime is 10 h
    (["--dependency", "afterok:999999"], "job 999999 is unknown"),
])
def test_bad_requests_fail_at_submit(slurm: LocalCluster, tmp_path: Path, capsys, args: list[str],
                                     message: str) -> None:
    base = ["--gpus-per-node", "0", "--cpus-per-node", "1"]
    code = launch_main(["slurm", "sft", "--config", "tiny", *base, *args, "model=m", "data.train=d.jsonl",
                        f"output_dir={tmp_path / 'run'}", "batch_size=4", "micro_batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not slurm.cmd("squeue", "-h", "-o", "%i").stdout.split(), "a refused request must not leave a job"


def test_two_node_zero3_sft_meets_at_the_first_node_and_resumes_after_a_requeue(
        slurm_2n: LocalCluster, tiny_models, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """DeepSpeed ZeRO-3 across two nodes (one CPU rank each, gloo: the trainer asks for it on CPU, without which
    accelerate 1.15 gives every DeepSpeed rank process_index 0; GPU nodes use NCCL), hard-requeued after its first
    periodic checkpoint: it resumes and ends with the weights of the same run in one process (ZeRO-2, 1 rank; within
    1e-5, see tests/test_multirank.py for why not bitwise)."""
    from metacot.config import load_config
    from metacot.sft.config import SFTConfig
    from metacot.sft.trainer import train

    run, steps = tmp_path / "two-nodes", 8
    overrides = sft_overrides(tiny_models, tiny_dataset, run, steps=steps, save_every=2) + ["batch_size=4"]
    [(_, job_id, log)] = submit(capsys, "sft", "--config", "tiny", "--nodes", "2", *JOB, *overrides,
                                "train.deepspeed=zero3")
    wait_for(lambda: is_complete(run / "checkpoints" / "step-2"), 300, "the first periodic checkpoint")
    assert not (run / "final").exists(), "the run finished before it could be requeued; raise steps"
    slurm_2n.cmd("scontrol", "requeue", job_id)
    info = job_end(slurm_2n, job_id, log)
    assert info["JobState"] == "COMPLETED", info["log_text"][-3000:]
    text = info["log_text"]
    assert "rendezvous mctn1:" in text and "2 node(s) x 1 process(es)" in text
    assert "trainer on mctn1 (machine rank 0)" in text and "trainer on mctn2 (machine rank 1)" in text
    assert "(run 2)" in text and re.search(rf"resumed from {run}/checkpoints/step-\d+", text), text[-3000:]
    assert is_complete(run / "final") and {r["step"] for r in metrics(run) if "loss" in r} == set(range(1, steps + 1))
    one = tmp_path / "one-process"
    train(load_config(SFTConfig, "tiny", sft_overrides(tiny_models, tiny_dataset, one, steps=steps, save_every=0)
                      + ["batch_size=4", "train.deepspeed=zero2"], stage="sft"))
    got, want = final_weights(run), final_weights(one)
    assert got.keys() == want.keys()
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want if want[k].numel())
    assert worst <= 1e-5, worst


GRPO_FAST = ["train.wandb_mode=disabled", "train.progress=false", "train.max_steps=2", "train.save_every=1",
             "rollout.group_size=2", "rollout.prompts_per_iteration=2", "rollout.batch_size=4", "rollout.num_steps=2",
             "rollout.window_size=1", "rollout.window_max=1", "rollout.cfg_scale=1.0", "policy.micro_batch_size=2",
             "policy.updates_per_epoch=1", "eval.every=0", "eval.prompts=2", "eval.num_steps=2",
             "data.cot_source=oracle"]


def test_chain_sft_then_grpo_then_export(slurm: LocalCluster, tiny_models, tiny_dataset: Path, tmp_path: Path,
                                         capsys) -> None:
    sft, grpo, export = tmp_path / "sft", tmp_path / "grpo", tmp_path / "export"
    [(_, sft_id, _)] = submit(capsys, "sft", "--config", "tiny", *JOB,
                              *sft_overrides(tiny_models, tiny_dataset, sft, steps=2, save_every=0))
    [(_, grpo_id, grpo_log)] = submit(capsys, "grpo", "--config", "tiny", *JOB, "--dependency", f"afterok:{sft_id}",
                                      f"model={sft / 'final'}", f"data.train={tiny_dataset / 'train.jsonl'}",
                                      f"output_dir={grpo}", *GRPO_FAST)
    [(_, export_id, export_log)] = submit(capsys, "export", "--cpus-per-node", "1", "--dependency",
                                          f"afterok:{grpo_id}", f"run={grpo}", f"out={export}")
    info = job_end(slurm, export_id, export_log, timeout=600)
    grpo_text = grpo_log.read_text() if grpo_log.exists() else ""
    assert info["JobState"] == "COMPLETED", (info["log_text"][-2000:], grpo_text[-3000:])
    assert is_complete(grpo / "final") and {1, 2} <= {r["step"] for r in metrics(grpo)}
    assert export.is_dir() and any(export.rglob("*.safetensors"))


def test_eval_array_runs_one_task_per_model(slurm: LocalCluster, tiny_models, tiny_dataset: Path, tmp_path: Path,
                                             capsys) -> None:
    out = tmp_path / "eval"
    [(_, job_id, log)] = submit(capsys, "eval", *JOB, f"data={tiny_dataset / 'test.jsonl'}", f"out={out}",
                                f"models={{base: {tiny_models.pipeline}, again: {tiny_models.pipeline}}}",
                                "args=[--steps,2,--batch-size,12]")
    assert str(log).endswith(f"eval-{job_id}_*.log")
    deadline = time.monotonic() + 400
    for task in (0, 1):  # an array's tasks have their own ids; wait on each through its log
        path = Path(str(log).replace("*", str(task)))
        wait_for(lambda: path.exists() and re.search(r"\] (done|FAILED)", path.read_text()),
                 max(1.0, deadline - time.monotonic()), f"array task {task}")
        assert "] done" in path.read_text(), path.read_text()[-3000:]
    rows = {name: json.loads((out / name / "results.json").read_text())["methods"][name] for name in ("base", "again")}
    assert rows["base"]["n"] > 0 and rows["base"] == rows["again"]  # same model, same seeds: same numbers


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_with_the_judge_served_on_a_dedicated_node(slurm_2n: LocalCluster, tiny_models, tiny_dataset: Path,
                                                         judge_vlm: Path, vllm_python: Path, tmp_path: Path,
                                                         capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METACOT_VLLM_PYTHON", str(vllm_python))
    run = tmp_path / "grpo-judge"
    [(_, job_id, log)] = submit(
        capsys, "grpo", "--config", "tiny", *JOB, "--judge-nodes", "1", "--judge-model", str(judge_vlm),
        f"model={tiny_models.pipeline}", f"data.train={tiny_dataset / 'train.jsonl'}", f"output_dir={run}",
        *GRPO_FAST, "rewards={cec_vlm: {weight: 1.0}}", "judge.allow_uncalibrated=true", "judge.mode=choice")
    info = job_end(slurm_2n, job_id, log, timeout=900)
    text = info["log_text"]
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert re.search(r"healthy: http://mctn2:\d+/health", text) and "stopping the judge" in text
    assert "judge on mctn2" in text and "trainer on mctn1 (machine rank 0)" in text
    assert is_complete(run / "final") and {1, 2} <= {r["step"] for r in metrics(run)}
    server_logs = list((run / "slurm").glob(f"judge-{job_id}-mctn2/server.log"))
    assert server_logs and "POST /v1/chat/completions" in server_logs[0].read_text()


@pytest.mark.vllm
@pytest.mark.slow
def test_calibration_array_scores_each_prompt_then_merges(slurm: LocalCluster, judge_vlm: Path, vllm_python: Path,
                                                          tmp_path: Path, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from data_recipes.demo_samples import write_demo_samples
    from rewards.cli import SUBCOMMANDS
    from rewards.simulated import simulate_labels

    require("calibrate" in SUBCOMMANDS, "`metacot reward calibrate` is not wired in rewards.cli.SUBCOMMANDS")
    monkeypatch.setenv("METACOT_VLLM_PYTHON", str(vllm_python))
    samples = write_demo_samples(tmp_path / "demo", 10, resolution=32, seed=0)
    simulate_labels(samples, tmp_path / "labels.jsonl", n_annotators=2, seed=0)
    out = tmp_path / "calib"
    jobs = submit(capsys, "calibrate", *JOB, f"labels={tmp_path / 'labels.jsonl'}", f"samples={samples}",
                  f"judge_model={judge_vlm}", f"out={out}", "prompts=[cec_v1,cec_v2]")
    assert [name for name, _, _ in jobs] == ["calibrate", "calibrate_merge"]
    (_, array_id, _), (_, merge_id, merge_log) = jobs
    info = job_end(slurm, merge_id, merge_log, timeout=900)
    assert info["JobState"] in {"COMPLETED", "FAILED"} and "code 2" not in info["log_text"], info["log_text"]
    report = json.loads((out / "calibration.json").read_text())  # written whether or not the tiny judge passes
    assert {v["prompt"] for v in report["variants"]} == {"cec_v1", "cec_v2"}
    assert report["judge_model"] == judge_vlm.name
    for prompt in ("cec_v1", "cec_v2"):
        lines = (tmp_path / "calib.slurm" / "scores" / f"{prompt}.jsonl").read_text().splitlines()
        assert len(lines) == 10 and all(json.loads(line)["prompt"] == prompt for line in lines)
    assert len(list((tmp_path / "calib.slurm").glob(f"calibrate-{array_id}_*.log"))) == 2
