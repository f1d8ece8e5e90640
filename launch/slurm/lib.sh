# metacot SLURM job library: inlined into every job script that `metacot launch slurm` renders (the rendered
# script is self-contained, so a requeued job runs exactly what was submitted even if this file changes later).
#
# What it gives the stage templates:
#   - the environment: the setup the launcher rendered (venv on PATH or a sourced setup file), unbuffered output;
#   - METACOT_HOSTS (the allocation's nodes in order) and per-job ports (a requeued job keeps its ports; two jobs
#     sharing a node do not collide unless their ids differ by a multiple of 10000);
#   - signal handling: SIGUSR1 (sent by SLURM before the time limit through `--signal=B:USR1@S`, or by
#     `scancel --batch --signal=USR1`) and SIGTERM are forwarded to the running step; the trainers finish the current
#     step, save a checkpoint and exit 75 (metacot.training.PREEMPTED_EXIT_CODE);
#   - metacot_run: run a step in the background and wait through signals (bash defers traps while a foreground
#     child runs, so a foreground srun would swallow the warning until the job is killed);
#   - metacot_finish: requeue after a stop for preemption (exit 75, or any exit after SIGUSR1), or fail with the
#     step's code and the log path. After SIGTERM (scancel, preemption by SLURM) it does not requeue: SLURM decides.
# Left out: retries of failed steps (a failure is reported, not hidden) and accounting queries.
set -uo pipefail
export PYTHONUNBUFFERED=1
# The torchrun agent inside `accelerate launch` forwards these signals to its ranks and waits this long for them
# to checkpoint before killing them (its default, 30 s, is shorter than a large checkpoint save).
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${METACOT_SIGNAL_LEAD_S}"

metacot_log() { echo "[metacot $(date +%H:%M:%S)] $*"; }

metacot_log "job ${SLURM_JOB_ID} (run $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on ${SLURM_JOB_NODELIST}: ${METACOT_SCRIPT}"
metacot_log "log: ${METACOT_LOG}"
if ! python -c "import metacot" 2>/dev/null; then
    metacot_log "FAILED: 'python' ($(command -v python || echo 'not on PATH')) cannot import metacot; fix the" \
        "environment setup (--setup FILE or the venv metacot launch was run from)"
    exit 2
fi

mapfile -t METACOT_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
METACOT_MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 10000 ))
METACOT_JUDGE_PORT=$(( 30000 + SLURM_JOB_ID % 10000 ))

METACOT_STOP=""
METACOT_STEP_PID=""
METACOT_RC=0

metacot_on_signal() {
    METACOT_STOP=$1
    if [[ -n "$METACOT_STEP_PID" ]]; then
        metacot_log "received SIG$1: forwarding it to the running step (it checkpoints and exits)"
        kill -s "$1" "$METACOT_STEP_PID" 2>/dev/null
    else
        metacot_log "received SIG$1 before the step started"
    fi
}
trap 'metacot_on_signal USR1' USR1
trap 'metacot_on_signal TERM' TERM

# metacot_run CMD...: run CMD (an srun) in the background and wait for it through trapped signals; sets METACOT_RC.
metacot_run() {
    if [[ -n "$METACOT_STOP" ]]; then  # stopped while waiting for a judge: do not start training now
        METACOT_RC=75
        return
    fi
    "$@" &
    METACOT_STEP_PID=$!
    while :; do
        wait "$METACOT_STEP_PID"
        METACOT_RC=$?
        if (( METACOT_RC > 128 )) && kill -0 "$METACOT_STEP_PID" 2>/dev/null; then
            continue  # `wait` was interrupted by a trapped signal; the step is still running
        fi
        break
    done
    # If the step ended while a trap ran, `wait` returned the signal's code; bash kept the step's real status.
    wait "$METACOT_STEP_PID" 2>/dev/null
    local saved=$?
    if [[ $saved != 127 ]]; then METACOT_RC=$saved; fi
    METACOT_STEP_PID=""
}

# metacot_finish: end the job according to METACOT_RC and the signal received, if any.
metacot_finish() {
    local rc=$METACOT_RC
    if [[ $rc == 0 ]]; then
        metacot_log "done"
        exit 0
    fi
    if [[ "$METACOT_STOP" == TERM ]]; then
        metacot_log "stopped by SIGTERM (scancel, preemption or the time limit): exit $rc, no requeue from here"
        exit "$rc"
    fi
    if [[ $rc == 75 || "$METACOT_STOP" == USR1 ]]; then
        metacot_log "stopped for preemption (step exit $rc): requeueing job ${SLURM_JOB_ID};" \
            "the next run resumes from the newest complete checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        metacot_log "FAILED: scontrol requeue ${SLURM_JOB_ID} was refused; resubmit the same script to resume"
        exit "$rc"
    fi
    metacot_log "FAILED: the step exited with code $rc; see this log: ${METACOT_LOG}"
    exit "$rc"
}

# metacot_gpu_slice FIRST COUNT: the COUNT GPUs from position FIRST of this task's CUDA_VISIBLE_DEVICES (used when
# the judge and the trainer share a node's GPUs). Exported: srun tasks call it inside `bash -c`.
metacot_gpu_slice() {
    local devices
    IFS=, read -ra devices <<< "${CUDA_VISIBLE_DEVICES:-}"
    local IFS=,
    echo "${devices[*]:$1:$2}"
}
export -f metacot_gpu_slice

# metacot_wait_http URL PID SECONDS [NODE]: wait until URL answers 2xx while the step PID lives, at most SECONDS;
# with NODE, probe from that node (a server bound to 127.0.0.1 there answers nobody else).
metacot_wait_http() {
    local url=$1 pid=$2 deadline=$(( SECONDS + $3 )) node=${4:-}
    local probe=(python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$url")
    if [[ -n "$node" ]]; then
        probe=(srun --overlap --nodes=1 --ntasks=1 --cpus-per-task=1 --nodelist="$node" "${probe[@]}")
    fi
    until "${probe[@]}" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            metacot_log "FAILED: the judge step exited before ${url} answered; see its server.log in the job folder"
            return 1
        fi
        if (( SECONDS > deadline )); then
            metacot_log "FAILED: ${url} did not answer within $3 s"
            return 1
        fi
        sleep 5
    done
    metacot_log "healthy: ${url}"
}

# metacot_stop_step PID: stop a background step (a judge server) with SIGTERM, then SIGKILL after 60 s.
metacot_stop_step() {
    local pid=$1
    kill -s TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
        sleep 1
    done
    kill -s KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
