# slurm/common.sh - sourced by every job script; the boilerplate, so that a job script holds only
# its lesson. A job script sets STAGE (and DS_CONFIG, STAGE_ARGS where it has them), then:
#     source slurm/common.sh
#     workshop_job "$@"
# and workshop_job runs, once per training process:
#     python -m workshop train --stage $STAGE --run_dir logs/$STAGE/<run_id> \
#         [--deepspeed $DS_CONFIG] [STAGE_ARGS...] "$@"
# run_id is $SLURM_JOB_ID, or a timestamp without SLURM; a --run_dir among "$@" is used instead
# (that is how a run is resumed into its own folder by hand).
#
# Same script, two modes (printed at the start of every job):
#   sbatch: a SLURM job; counts come from the allocation (SLURM_JOB_NUM_NODES, the GPUs SLURM gave)
#   bash:   no SLURM (SLURM_JOB_ID unset): runs on this machine alone, with as many GPUs as the
#           script's `#SBATCH --gres=gpu:N` line asks for and this machine has
#
# Launcher, from the counts (one place decides, the job scripts never name one):
#   1 process                 python -m workshop train ...
#   1 node, several processes torchrun --standalone --nproc_per_node=N -m workshop train ...
#   several nodes             srun, one task per node, each running slurm/srun_task.sh:
#                             torchrun --node_rank=$SLURM_NODEID (expanded on that node) ...
# Processes per node: the GPUs of this node, or 1 without a GPU (the Python side picks gloo then).
#
# Environment variables a user may set (sbatch passes them on):
#   NPROC_PER_NODE        processes per node instead of the GPU count, e.g. 2 CPU processes:
#                         NPROC_PER_NODE=2 bash multi_node/multi_gpu.slurm --preset tiny
#   WORKSHOP_PYTHON       the Python interpreter (default: python on PATH, after slurm/env.sh)
#   LOG_INTERVAL          seconds between GPU/host memory samples (default 5)
#   MASTER_PORT           rendezvous port of a multi-node job (default: a free port on node 0)
#   WORKSHOP_MAX_REQUEUES times a job requeues itself after the time-limit warning (default 10)
#
# Time limit and preemption (#SBATCH --signal=B:USR1@600 --requeue in every job script): SLURM
# sends SIGUSR1 to this shell 10 minutes before the limit; it is forwarded to the training ranks
# (slurm/node.sh says how), which save a checkpoint and exit. If the run is not finished (its
# status.json does not say completed, failed or oom), the job requeues itself: same job id, same
# run folder, same arguments, and the training resumes from its newest checkpoint.
#
# Files: the environment log, pip-freeze.txt and the memory CSVs (slurm/node.sh) go into the run
# folder once `workshop train` has passed its checks; a run it refuses leaves nothing under logs/.
#
# How the job ends follows the run's status.json (written by this launch; "none" if it wrote none:
# refused on bad input, or killed before it began), whatever the launcher returned after that:
#     END <date> stage=<stage> status=<status> exit=<N> ...
#   completed -> exit 0 (SLURM: COMPLETED); anything else -> the launcher's non-zero status (FAILED),
#   1 if the launcher returned 0. A job that requeues itself ends this part with 0 (it goes on).

WORKSHOP_MAX_REQUEUES=${WORKSHOP_MAX_REQUEUES:-10}
export PYTHONUNBUFFERED=1   # the job's log shows progress as it happens

set +u   # module and conda scripts are rarely clean under `set -u`
source slurm/env.sh
set -u
source slurm/node.sh

_run_dir_arg() {   # the value of the last --run_dir X / --run_dir=X (or --run-dir) among the arguments
    local value= previous= arg
    for arg in "$@"; do
        case $previous in --run_dir | --run-dir) value=$arg ;; esac
        case $arg in --run_dir=* | --run-dir=*) value=${arg#*=} ;; esac
        previous=$arg
    done
    echo "$value"
}

_gpus_here() {   # the GPUs this process may use
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local ids=${CUDA_VISIBLE_DEVICES//,/ }
        set -- $ids
        echo $#
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

_gpus_asked_by_script() {   # N of the job script's `#SBATCH --gres=gpu[:type]:N` line, if any
    grep -m 1 -E '^#SBATCH[[:space:]]+--gres=gpu' "$0" 2>/dev/null \
        | grep -oE 'gpu(:[A-Za-z0-9_.-]+)?:[0-9]+' | grep -oE '[0-9]+$' || true
}

_default_nproc() {
    local gpus asked
    gpus=$(_gpus_here)
    if [ -z "${SLURM_JOB_ID:-}" ]; then   # locally, a one-GPU lesson stays on one GPU
        asked=$(_gpus_asked_by_script)
        [ -n "$asked" ] && [ "$asked" -lt "$gpus" ] && gpus=$asked
    fi
    [ "$gpus" -gt 0 ] && echo "$gpus" || echo 1
}

_free_port() {
    "$WORKSHOP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

_run_status() {   # the status in status.json if this launch wrote it, else "none"
    local status=
    if launch_wrote_status; then
        status=$(sed -n 's/.*"status": *"\([a-z_]*\)".*/\1/p' "$RUN_DIR/status.json" 2>/dev/null | head -n 1)
    fi
    echo "${status:-none}"
}

_job_status() {   # _job_status RC: the job's exit status from the run's status and the launcher's RC
    local rc=$1
    if [ "$RUN_STATUS" = completed ]; then
        [ "$rc" = 0 ] || echo "the launcher returned $rc after the run completed (status.json):" \
            "the job counts as completed; the lines above say what ended badly" >&2
        return 0
    fi
    [ "$rc" != 0 ] && return "$rc"
    [ "$RUN_STATUS" = none ] && return 0   # nothing ran (--help)
    return 1
}

_requeue_if_unfinished() {   # after the training ended on the time-limit warning
    [ "$WARNING_SIGNAL_SEEN" = 1 ] || return 0
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "stopped on SIGUSR1: to go on, run the same command again with --run_dir $RUN_DIR"
        return 0
    fi
    local restarts=${SLURM_RESTART_COUNT:-0}
    case $RUN_STATUS in
        completed | failed | oom)
            echo "not requeued: the run's status is $RUN_STATUS"
            return 0 ;;
    esac
    if [ "$restarts" -ge "$WORKSHOP_MAX_REQUEUES" ]; then
        echo "not requeued: already restarted $restarts times (WORKSHOP_MAX_REQUEUES=$WORKSHOP_MAX_REQUEUES)"
        return 0
    fi
    echo "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $WORKSHOP_MAX_REQUEUES):" \
        "it resumes in $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    JOB_REQUEUED=1
}

_job_exit() {
    local rc=$?
    # The job is ending: a signal now (SLURM's SIGTERM after a requeue or scancel) has nothing left
    # to stop, and a trap that runs while bash 5.2 parses a $(...) breaks that parse ("unexpected
    # EOF while looking for matching `)'"), which would lose the END line below.
    trap '' USR1 TERM INT
    stop_memory_loggers
    local status=$RUN_STATUS
    [ "$JOB_REQUEUED" = 1 ] && status=$status,requeued
    echo "END $(date '+%F %T') stage=$STAGE status=$status exit=$rc elapsed=$(($(date +%s) - JOB_START))s" \
        "run folder: $([ -n "${RUN_DIR:-}" ] && [ -d "$RUN_DIR" ] && echo "$RUN_DIR" || echo none)"
}

workshop_job() {
    : "${STAGE:?the job script sets STAGE before workshop_job}"
    # the training's time breakdown (time_breakdown_s) counts from here; a requeued part counts anew.
    # EPOCHREALTIME (bash 5) has microseconds, with the locale's decimal mark
    WORKSHOP_JOB_START=${EPOCHREALTIME:-$(date +%s)} && export WORKSHOP_JOB_START=${WORKSHOP_JOB_START/,/.}
    JOB_START=$(date +%s)
    JOB_REQUEUED=0
    RUN_STATUS=none
    echo "START $(date '+%F %T') stage=$STAGE"
    trap _job_exit EXIT

    if [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "mode: SLURM job $SLURM_JOB_ID${SLURM_RESTART_COUNT:+ (restart $SLURM_RESTART_COUNT)}," \
            "nodes ${SLURM_JOB_NODELIST:-?}, this shell on $NODE_NAME"
    else
        echo "mode: local (no SLURM job): running on this machine only ($(hostname))"
    fi

    RUN_ID=${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}
    RUN_DIR=$(_run_dir_arg "$@")
    local run_dir_args=()
    if [ -z "$RUN_DIR" ]; then
        RUN_DIR=logs/$STAGE/$RUN_ID
        run_dir_args=(--run_dir "$RUN_DIR")
    fi
    # status.json written by this launch, not by an earlier part of the run: anything in a folder that is
    # new (`workshop train` makes it once its checks pass), else newer than this stamp
    RUN_DIR_NEW=0 LAUNCH_STAMP=
    if [ -d "$RUN_DIR" ]; then
        LAUNCH_STAMP=$(mktemp "$RUN_DIR/.launch.XXXXXX" 2>/dev/null) || LAUNCH_STAMP=
    else
        RUN_DIR_NEW=1
    fi
    export RUN_DIR RUN_DIR_NEW LAUNCH_STAMP WORKSHOP_PYTHON LOG_INTERVAL

    NNODES=${SLURM_JOB_NUM_NODES:-1}
    # A process's place in a distributed run, inherited from the submitting shell (sbatch passes it
    # on), would make a single process start a process group on a port in use: the launchers below
    # set these for each rank. MASTER_PORT is yours to choose only for several nodes.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK MASTER_ADDR
    [ "$NNODES" -gt 1 ] || unset MASTER_PORT
    NPROC_PER_NODE=${NPROC_PER_NODE:-$(_default_nproc)}
    export NPROC_PER_NODE
    if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        # the node's CPUs shared between its processes (torchrun would set 1)
        OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / NPROC_PER_NODE))
        export OMP_NUM_THREADS=$((OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1))
    fi

    PROGRAM=(-m workshop train --stage "$STAGE" ${run_dir_args[@]+"${run_dir_args[@]}"})
    [ -n "${DS_CONFIG:-}" ] && PROGRAM+=(--deepspeed "$DS_CONFIG")
    PROGRAM+=(${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"} "$@")

    when_checks_passed log_pip_freeze "$RUN_DIR"
    local launcher
    if [ "$NNODES" -gt 1 ]; then
        launcher=srun
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        MASTER_PORT=${MASTER_PORT:-$(_free_port)}
        export MASTER_ADDR MASTER_PORT
        SRUN_ARGS=(--nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=60 --label)
        # srun does not take --cpus-per-task from the job in every SLURM version: pass it on
        [ -n "${SLURM_CPUS_PER_TASK:-}" ] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        # each node logs its environment and memory inside its own task
        LAUNCH=(srun "${SRUN_ARGS[@]}" bash slurm/srun_task.sh)
        echo "launcher: srun + torchrun, $NNODES nodes x $NPROC_PER_NODE processes" \
            "= world size $((NNODES * NPROC_PER_NODE)), rendezvous $MASTER_ADDR:$MASTER_PORT"
    else
        when_checks_passed log_environment "$RUN_DIR"
        start_memory_loggers "$RUN_DIR"
        if [ "$NPROC_PER_NODE" -gt 1 ]; then
            launcher=torchrun
            LAUNCH=("$WORKSHOP_PYTHON" -m torch.distributed.run   # = torchrun, with this python
                --standalone --nproc_per_node="$NPROC_PER_NODE")
            echo "launcher: torchrun, 1 node x $NPROC_PER_NODE processes = world size $NPROC_PER_NODE"
        else
            launcher=python
            LAUNCH=("$WORKSHOP_PYTHON")
            echo "launcher: python, 1 process"
        fi
    fi
    echo "command: $(printf '%q ' "${LAUNCH[@]}" "${PROGRAM[@]}")"

    local rc=0
    run_training "$launcher" "${LAUNCH[@]}" "${PROGRAM[@]}" || rc=$?
    # the training has ended: nothing left to forward signals to (and see _job_exit on bash 5.2)
    trap '' USR1 TERM INT
    RUN_STATUS=$(_run_status)
    stop_memory_loggers   # before the stamp goes: the one-shot logs ask whether the checks passed
    [ -n "$LAUNCH_STAMP" ] && rm -f "$LAUNCH_STAMP"
    _requeue_if_unfinished
    [ "$JOB_REQUEUED" = 1 ] && return 0
    _job_status "$rc"
}
