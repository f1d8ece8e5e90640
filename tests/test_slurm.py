"""Rendering SLURM jobs (metacot.slurm, ``metacot launch slurm --dry-run``): no cluster needed.

Every rendered script is checked with ``bash -n``; what the jobs do on a real cluster is in test_slurm_jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metacot.config import ConfigError, load_config
from metacot.launch_cli import main as launch_main
from metacot.slurm import (
    JUDGE_URL_IN_JOB,
    Request,
    SlurmError,
    parse_gpus,
    parse_time_s,
    render,
    signal_lead_s,
)

SFT = ["model=models/pipe", "data.train=data/train.jsonl", "output_dir=runs/sft", "batch_size=8",
       "micro_batch_size=2"]
GRPO = ["model=runs/sft/final", "data.train=data/train.jsonl", "output_dir=runs/grpo"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "METACOT_VLLM_PYTHON"):
        monkeypatch.delenv(var, raising=False)


def sbatch_opts(text: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)


def variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(METACOT_[A-Z_]+)=(.*)$", text, flags=re.M))


def bash_syntax_ok(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def judge_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    return path


def test_sft_script_has_the_requested_resources_and_preemption_settings(tmp_path: Path) -> None:
    plan = render(Request("sft", "tiny", [*SFT, "batch_size=16"], nodes=2, gpus_per_node=4, partition="gpu",
                          account="proj", qos="high", time="1:00:00"))
    job = plan.jobs[0]
    assert job.script.parent == tmp_path / "runs" / "sft" / "slurm" and job.script.read_text() == job.text
    opts = sbatch_opts(job.text)
    for expected in ("--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4", "--partition=gpu", "--account=proj",
                     "--qos=high", "--time=1:00:00", "--requeue", "--open-mode=append", "--signal=B:USR1@600",
                     "--exclusive", "--mem=0", f"--chdir={tmp_path}", f"--output={job.log}"):
        assert expected in opts, (expected, opts)
    assert job.log == tmp_path / "runs" / "sft" / "slurm" / "sft-%j.log"
    got = variables(job.text)
    assert (got["METACOT_NODES"], got["METACOT_PROCS_PER_NODE"]) == ("2", "4")
    assert "accelerate.commands.launch" in job.text and "--machine_rank \"$SLURM_NODEID\"" in job.text
    assert "{{" not in job.text.replace("{{...}}", "")
    bash_syntax_ok(job.script)


def test_frozen_config_fixes_an_absolute_output_dir_and_resume(tmp_path: Path) -> None:
    from metacot.sft.config import SFTConfig

    plan = render(Request("sft", "tiny", [*SFT, "train.max_steps=7"], gpus_per_node=0, cpus_per_node=2))
    assert plan.config_path is not None and variables(plan.jobs[0].text)["METACOT_CONFIG"] == str(plan.config_path)
    cfg = load_config(SFTConfig, plan.config_path)
    assert cfg.output_dir == str(tmp_path / "runs" / "sft")  # relative at submit, absolute in the job
    assert cfg.train.resume and cfg.train.max_steps == 7 and cfg.model == "models/pipe"
    opts = sbatch_opts(plan.jobs[0].text)
    assert "--cpus-per-task=2" in opts and "--exclusive" not in opts and not any("gres" in o for o in opts)
    assert not plan.notes
    ckpt = tmp_path / "runs" / "sft" / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    (ckpt / "metacot_complete.json").write_text("{}")
    again = render(Request("sft", "tiny", SFT, gpus_per_node=0))
    assert again.jobs[0].script != plan.jobs[0].script and "up to step-4: the job continues" in again.notes[0]


def test_time_limit_shortens_the_warning_signal_and_parses_slurm_formats() -> None:
    assert [parse_time_s(s) for s in ("30", "5:30", "1:00:00", "2-00", "1-2:03", "1-00:00:10")] == [
        1800, 330, 3600, 172800, 93780, 86410]
    assert parse_time_s("UNLIMITED") is None
    assert (signal_lead_s(None), signal_lead_s("30"), signal_lead_s("4:00:00"), signal_lead_s("0:20")) == (
        600, 360, 600, 10)
    with pytest.raises(SlurmError, match="not a SLURM time"):
        parse_time_s("2h")


def test_gres_counts() -> None:
    assert [parse_gpus(g) for g in ("gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,mps:100", "(null)", "gpu:h100:4,gpu:a100:2")] \
        == [4, 8, 2, 0, 6]


def test_missing_required_key_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.train"):
        render(Request("sft", "tiny", ["model=m", "output_dir=runs/sft"], gpus_per_node=0))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, kwargs, message", [
    (["train.resume=false"], {}, "train.resume=false"),
    ([], {"nodes": 2, "gpus_per_node": 4}, "not a multiple of micro_batch_size x processes = 2 x 8"),
    ([], {"array": "0-3"}, "--array is for calibrate and eval"),
    (["train.device=cuda"], {"gpus_per_node": 0}, "train.device=cuda"),
    ([], {"judge_model": "judge"}, "are for grpo"),
    ([], {"nodes": 0}, "--nodes"),
    ([], {"time": "2 hours"}, "not a SLURM time"),
])
def test_bad_sft_requests_are_refused_with_the_fix(extra: list[str], kwargs: dict, message: str) -> None:
    with pytest.raises(SlurmError, match=re.escape(message)):
        render(Request("sft", "tiny", [*SFT, *extra], **kwargs))


def test_grpo_judge_on_spare_gpus_of_trainer_nodes(tmp_path: Path) -> None:
    judge = judge_folder(tmp_path / "models" / "judge-vl")
    plan = render(Request("grpo", "tiny", [*GRPO, "rewards.cec_vlm.weight=1.0", "rollout.prompts_per_iteration=6",
                                           "policy.micro_batch_size=8", "policy.updates_per_epoch=1"],
                          nodes=2, gpus_per_node=4, judge_model=str(judge)))
    got = variables(plan.jobs[0].text)
    assert (got["METACOT_JUDGE"], got["METACOT_PROCS_PER_NODE"], got["METACOT_JUDGE_GPUS"]) == ("shared", "3", "1")
    assert got["METACOT_JUDGE_MODEL"] == str(judge) and got["METACOT_JUDGE_NAME"] == "judge-vl"
    assert "--nodes=2" in sbatch_opts(plan.jobs[0].text)
    from metacot.flow_grpo.config import GRPOConfig

    cfg = load_config(GRPOConfig, plan.config_path)
    assert (cfg.judge.url, cfg.judge.model) == (JUDGE_URL_IN_JOB, "judge-vl")  # URL given per node in the job
    bash_syntax_ok(plan.jobs[0].script)
    text = plan.jobs[0].text
    # The shared layout's judge binds 127.0.0.1 (its clients are on its node) and is probed from that node.
    assert 'JUDGE_BIND=127.0.0.1; JUDGE_KEY_ENV=""' in text and '--host "$7"' in text and "0.0.0.0 --port" not in text
    assert 'metacot_wait_http "$url" "$JUDGE_PID" "$METACOT_JUDGE_WAIT_S" "$on"' in text


def test_network_judge_requires_a_per_job_key_passed_through_the_environment(tmp_path: Path) -> None:
    """Dedicated judge nodes listen on the network: a random key made in the job, exported, and only its variable's
    name on command lines (`--api-key-env`, `judge.api_key_env`), never the key."""
    judge = judge_folder(tmp_path / "judge")
    plan = render(Request("grpo", "tiny", [*GRPO, "rewards.cec_vlm.weight=1.0"], nodes=1, gpus_per_node=0,
                          judge_nodes=1, judge_model=str(judge)))
    text = plan.jobs[0].text
    assert "JUDGE_BIND=0.0.0.0" in text and "secrets.token_urlsafe(32)" in text and "export METACOT_JUDGE_KEY" in text
    assert '${8:+--api-key-env "$8"}' in text and '"judge.api_key_env=METACOT_JUDGE_KEY"' in text
    assert "--api-key " not in text and "--api-key=" not in text and "$METACOT_JUDGE_KEY" not in text
    bash_syntax_ok(plan.jobs[0].script)


def test_grpo_dedicated_judge_nodes_validate_the_real_preset(tmp_path: Path) -> None:
    judge = judge_folder(tmp_path / "Qwen2.5-VL-72B")
    overrides = [*GRPO, "data.eval=data/eval.jsonl", "judge.calibration=runs/calib", "judge.model=qwen-judge"]
    plan = render(Request("grpo", "grpo_qwen_image_edit", overrides, nodes=2, gpus_per_node=8, judge_nodes=1,
                          judge_model=str(judge)))
    got = variables(plan.jobs[0].text)
    assert (got["METACOT_JUDGE"], got["METACOT_JUDGE_NODES"], got["METACOT_PROCS_PER_NODE"]) == ("dedicated", "1", "8")
    assert got["METACOT_JUDGE_NAME"] == "qwen-judge"  # the config's name wins over the folder's
    assert "--nodes=3" in sbatch_opts(plan.jobs[0].text)  # 2 trainer + 1 judge node
    bash_syntax_ok(plan.jobs[0].script)


@pytest.mark.parametrize("extra, kwargs, message", [
    (["rewards.cec_vlm.weight=1.0"], {}, "pass --judge-model DIR"),
    ([], {"judge_model": "JUDGE"}, "no reward of this config uses the VLM judge"),
    ([], {"judge_nodes": 1}, "need --judge-model"),
    (["rewards.cec_vlm.weight=1.0", "judge.url=http://h:1"], {"judge_model": "JUDGE"}, "drop one"),
    (["rewards.cec_vlm.weight=1.0"], {"judge_model": "JUDGE", "gpus_per_node": 2, "judge_gpus": 2}, "1..1 judge GPUs"),
    (["rollout.prompts_per_iteration=4"], {"nodes": 3, "gpus_per_node": 1}, "multiple of the 3 processes"),
])
def test_bad_grpo_requests_are_refused(tmp_path: Path, extra: list[str], kwargs: dict, message: str) -> None:
    if kwargs.get("judge_model") == "JUDGE":
        kwargs["judge_model"] = str(judge_folder(tmp_path / "judge"))
    with pytest.raises(SlurmError, match=re.escape(message)):
        render(Request("grpo", "tiny", [*GRPO, *extra], **kwargs))


def test_calibrate_is_an_array_per_prompt_then_a_merge_job(tmp_path: Path) -> None:
    for name in ("labels.jsonl", "samples.jsonl"):
        (tmp_path / name).write_text("")
    judge = judge_folder(tmp_path / "judge")
    overrides = ["labels=labels.jsonl", "samples=samples.jsonl", f"judge_model={judge}", "out=runs/calib",
                 "prompts=[cec_v1,cec_v2,cec_v3]"]
    plan = render(Request("calibrate", None, overrides, dependency="afterok:7"))
    score, merge = plan.jobs
    assert plan.job_dir == tmp_path / "runs" / "calib.slurm"
    assert "--array=0-2" in sbatch_opts(score.text) and "--dependency=afterok:7" in sbatch_opts(score.text)
    assert {"--gres=gpu:1", "--cpus-per-task=8"} <= set(sbatch_opts(score.text))
    assert score.log.name == "calibrate-%A_%a.log" and "--cpus-per-task=1" in sbatch_opts(merge.text)
    assert variables(score.text)["METACOT_PROMPTS"] == "(cec_v1 cec_v2 cec_v3)"
    assert merge.after_previous and not any(o.startswith(("--dependency", "--array", "--gres"))
                                            for o in sbatch_opts(merge.text))
    files = variables(merge.text)["METACOT_SCORE_FILES"]
    assert files.count("calib.slurm/scores/cec_v") == 3 and variables(merge.text)["METACOT_JUDGE_NAME"] == "judge"
    for job in plan.jobs:
        bash_syntax_ok(job.script)
    with pytest.raises(SlurmError, match=r"3 prompt variants \(indices 0..2\)"):
        render(Request("calibrate", None, overrides, array="0-5%2"))
    with pytest.raises(SlurmError, match="labels nope.jsonl does not exist"):
        render(Request("calibrate", None, [*overrides, "labels=nope.jsonl"]))


def test_eval_array_runs_one_model_per_task_and_export_one_job(tmp_path: Path) -> None:
    plan = render(Request("eval", None, ["data=test.jsonl", "out=runs/eval", "models={sft: a/final, grpo: b/final}",
                                         "args=[--steps,20]"]))
    got = variables(plan.jobs[0].text)
    assert (got["METACOT_METHODS"], got["METACOT_MODELS"], got["METACOT_ARGS"]) == (
        "(sft grpo)", "(a/final b/final)", "(--steps 20)")
    assert "--array=0-1" in sbatch_opts(plan.jobs[0].text)
    export = render(Request("export", None, ["run=runs/grpo", "out=exports/m"]))
    assert export.job_dir == tmp_path / "runs" / "grpo" / "slurm"
    opts = sbatch_opts(export.jobs[0].text)
    assert "--cpus-per-task=8" in opts and not any(o.startswith(("--gres", "--exclusive")) for o in opts)
    for job in (*plan.jobs, *export.jobs):
        bash_syntax_ok(job.script)
    with pytest.raises(SlurmError, match="one node each"):
        render(Request("export", None, ["run=r", "out=o"], nodes=2))
    with pytest.raises(ConfigError, match="models"):
        render(Request("eval", None, ["data=d", "out=o"]))


def test_environment_setup_and_nccl_settings_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    plain = render(Request("sft", "tiny", SFT, gpus_per_node=0)).jobs[0].text
    assert "export NCCL_SOCKET_IFNAME=ib0" in plain and re.search(r"^export PATH=\S+/bin:", plain, flags=re.M)
    setup = tmp_path / "env.sh"
    setup.write_text("module load cuda\n")
    custom = render(Request("sft", "tiny", SFT, gpus_per_node=0, setup=str(setup))).jobs[0].text
    assert f"source {setup}" in custom and "export PATH=" not in custom
    with pytest.raises(SlurmError, match="--setup"):
        render(Request("sft", "tiny", SFT, gpus_per_node=0, setup="missing.sh"))


def test_cli_dry_run_prints_the_script_and_bad_requests_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert launch_main(["slurm", "sft", "--config", "tiny", "--gpus-per-node", "0", "--dry-run", *SFT]) == 0
    out = capsys.readouterr().out
    script = next((tmp_path / "runs" / "sft" / "slurm").glob("sft-*.sbatch"))
    assert script.read_text() in out and "nothing submitted" in out
    assert launch_main(["slurm", "sft", "--config", "tiny", "--dry-run", "model=m", "output_dir=o"]) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and err.count("\n") == 1
    assert launch_main(["sbatch"]) == 2


@pytest.mark.parametrize("visible, first, count, expected", [
    ("4,5,6,7", 0, 3, "4,5,6"), ("4,5,6,7", 3, 1, "7"), ("0,1", 1, 1, "1"), ("", 0, 1, "")])
def test_gpu_slice_splits_a_node_between_trainer_and_judge(visible: str, first: int, count: int,
                                                            expected: str) -> None:
    lib = (Path(__file__).parent.parent / "launch" / "slurm" / "lib.sh").read_text()
    function = re.search(r"^metacot_gpu_slice\(\) \{\n.*?^\}\n", lib, flags=re.M | re.S).group(0)
    done = subprocess.run(["bash", "-c", f'{function}metacot_gpu_slice "$1" "$2"', "-", str(first), str(count)],
                          env={"CUDA_VISIBLE_DEVICES": visible, "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr


def test_a_wheel_install_renders_jobs_without_the_repository(tmp_path: Path) -> None:
    """A non-editable wheel of this checkout, installed into a folder of its own and run outside the repository:
    `metacot launch slurm --dry-run` renders a job from the templates shipped in the wheel, and the DeepSpeed and
    accelerate configs resolve inside the installed package (before, they were looked up beside the package, in a
    repository a wheel user does not have)."""
    repo = Path(__file__).resolve().parents[1]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip"]
    done = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(repo)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import metacot, metacot.slurm as s, metacot.training as t; "
                            "print(metacot.__file__, s.TEMPLATE_DIR, s.ACCELERATE_CONFIG, t.DEEPSPEED_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).resolve().is_relative_to(site) and Path(p).exists() for p in where), where
    done = subprocess.run([sys.executable, "-m", "metacot.cli", "launch", "slurm", "sft", "--config", "tiny",
                           "--gpus-per-node", "0", "--dry-run", *SFT], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    script = next((tmp_path / "runs" / "sft" / "slurm").glob("sft-*.sbatch"))
    assert "nothing submitted" in done.stdout and "metacot_on_signal" in script.read_text()
    bash_syntax_ok(script)
