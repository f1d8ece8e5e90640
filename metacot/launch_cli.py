"""``metacot launch slurm STAGE ...``: render a stage's SLURM job, write it into the run folder, submit it.

Examples::

    # Stage 1 on 4 nodes x 8 GPUs, 48 h, preemption-safe (SIGUSR1 10 min before the limit -> checkpoint -> requeue)
    metacot launch slurm sft --config sft_qwen_image_edit.yaml --nodes 4 --gpus-per-node 8 --partition gpu \\
        --time 2-00:00:00 model=/models/Qwen-Image-Edit data.train=/data/train.jsonl output_dir=/runs/sft
    # Stage 2 after it: 2 trainer nodes + 1 judge node serving the calibrated VLM judge
    metacot launch slurm grpo --config grpo_qwen_image_edit.yaml --nodes 2 --judge-nodes 1 \\
        --judge-model /models/Qwen2.5-VL-72B-Instruct --dependency afterok:<sft job> model=/runs/sft/final ...
    # then the export
    metacot launch slurm export run=/runs/grpo out=/exports/metacot --dependency afterok:<grpo job>
    # judge calibration (one array task per prompt variant, then the report) and evaluation (one task per model)
    metacot launch slurm calibrate labels=labels.jsonl samples=samples.jsonl judge_model=/models/judge \\
        out=/runs/calib prompts=[cec_v1,cec_v2]
    metacot launch slurm eval data=test.jsonl out=/runs/eval models="{sft: /runs/sft/final, grpo: /runs/grpo/final}"

The script (and the frozen stage config) is written into the job folder (OUTPUT_DIR/slurm/ for training) and
printed; ``--dry-run`` stops there. Partition, account, qos and time default to SLURM's own (``SBATCH_PARTITION``
and friends). The job's Python is the one running this command (its venv goes first on PATH) unless ``--setup FILE``
names a shell file the job sources instead (modules, conda, a venv on the cluster's filesystem).
"""

from __future__ import annotations

import argparse
import sys

from metacot.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    slurm = argparse.ArgumentParser(prog="metacot launch slurm", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    slurm.add_argument("stage", choices=("sft", "grpo", "calibrate", "eval", "export"))
    slurm.add_argument("--config", default=None, help="stage config: YAML file or preset name (tiny, ...)")
    slurm.add_argument("--nodes", type=int, default=1, help="trainer nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node (default 8 for sft/grpo, 1 for calibrate/eval, 0 for export; 0 = CPU)")
    slurm.add_argument("--cpus-per-node", type=int, default=None,
                       help="CPUs per node (default: whole nodes for sft/grpo; 8 per GPU for the others)")
    slurm.add_argument("--judge-nodes", type=int, default=0,
                       help="grpo: nodes that only serve the judge (default 0: the judge shares trainer nodes)")
    slurm.add_argument("--judge-gpus", type=int, default=None,
                       help="grpo: GPUs of each shared node given to the judge (default 1)")
    slurm.add_argument("--judge-model", default=None, help="grpo: judge model folder to serve with vLLM in the job")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--qos", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 4:00:00 or 2-00:00:00")
    slurm.add_argument("--dependency", default=None, help="e.g. afterok:1234 (chain sft -> grpo -> export)")
    slurm.add_argument("--array", default=None, help="calibrate/eval: a subset or throttle, e.g. 0-3%%2")
    slurm.add_argument("--setup", default=None, help="shell file the job sources to get the project environment")
    slurm.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    slurm.add_argument("overrides", nargs="*", help="stage config key=value overrides")
    return slurm


def main(argv: list[str] | None = None) -> int:
    """Entry of ``metacot launch``. Returns 0 when submitted (or rendered with --dry-run), 2 on a bad request."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "slurm":
        # One backend today; the word keeps room for others without changing the command line.
        print("usage: metacot launch slurm STAGE [options] [key=value ...]  (see metacot launch slurm --help)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    # Options and key=value overrides may be interleaved (stage, then options, then overrides, or any mix).
    args = _parser().parse_intermixed_args(argv[1:])
    from metacot.slurm import Request, SlurmError, render, submit

    req = Request(stage=args.stage, config=args.config, overrides=list(args.overrides), nodes=args.nodes,
                  gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, judge_nodes=args.judge_nodes,
                  judge_gpus=args.judge_gpus, judge_model=args.judge_model, partition=args.partition,
                  account=args.account, qos=args.qos, time=args.time, dependency=args.dependency, array=args.array,
                  setup=args.setup)
    try:
        plan = render(req)
        for job in plan.jobs:
            print(f"# ---- {job.script} ----\n{job.text}")
        if plan.config_path is not None:
            print(f"config (frozen for this job and its requeues): {plan.config_path}")
        for note in plan.notes:
            print(f"note: {note}")
        if args.dry_run:
            print(f"dry run: nothing submitted; scripts in {plan.job_dir}")
            return 0
        submitted = submit(req, plan)
    except (SlurmError, ConfigError) as exc:
        print(f"metacot launch slurm {args.stage}: {exc}", file=sys.stderr)
        return 2
    for sub in submitted:
        after = " (runs after the job above succeeds)" if sub.job.after_previous else ""
        print(f"submitted {sub.job.name} job {sub.job_id}{after}\n  script: {sub.job.script}\n  log:    {sub.log}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
