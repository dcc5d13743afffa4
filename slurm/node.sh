# slurm/node.sh - what every node of a job does: log its environment, log GPU and host memory in
# the background, run the training with signals forwarded, and stop the loggers on exit.
# Sourced by slurm/common.sh (the batch node) and by slurm/srun_task.sh (each node of a multi-node
# job), so that every node that starts loggers also stops them. Nothing here runs when sourced.
#
# Files written into the run folder (one set per node; NODE_NAME is the SLURM node name, else the
# short hostname):
#   environment-$NODE_NAME.txt  versions, git commit, SLURM_*/NCCL_*/CUDA_*/MASTER_* variables (only
#                               those: `printenv` whole would leak tokens), one nvidia-smi
#   gpu_memory-$NODE_NAME.csv   nvidia-smi every $LOG_INTERVAL seconds, only where nvidia-smi exists:
#                               timestamp, index, name, memory.used [MiB], memory.total [MiB],
#                               utilization.gpu [%], power.draw [W]
#   host_memory-$NODE_NAME.csv  /proc/meminfo every $LOG_INTERVAL seconds:
#                               timestamp,used_mib,total_mib,available_mib (used = total - available;
#                               timestamp as nvidia-smi writes it, YYYY/MM/DD HH:MM:SS.mmm)
# A requeued job writes into the same run folder: the CSVs are appended to, never truncated.
# They start once `workshop train` has passed its checks (it writes status.json then): a refused
# run (bad input, exit status 2) leaves nothing under logs/, as `workshop train` itself leaves nothing.

WORKSHOP_PYTHON=${WORKSHOP_PYTHON:-python}
LOG_INTERVAL=${LOG_INTERVAL:-5}
NODE_NAME=${SLURMD_NODENAME:-$(hostname -s)}
GPU_QUERY=timestamp,index,name,memory.used,memory.total,utilization.gpu,power.draw
MEMORY_LOGGER_PIDS=()   # the samplers: stopped at the end
ONE_SHOT_PIDS=()        # environment log, pip freeze: finished at the end if they have begun

launch_wrote_status() {   # whether $RUN_DIR/status.json was written by this launch of `workshop train`:
    # anything in a folder the launch found missing (RUN_DIR_NEW=1), else a file newer than LAUNCH_STAMP,
    # made in the folder as the launch began (none where the folder is not writable)
    local file=$RUN_DIR/status.json
    [ -f "$file" ] || return 1
    [ "${RUN_DIR_NEW:-0}" = 1 ] && return 0
    [ -n "${LAUNCH_STAMP:-}" ] && [ "$file" -nt "$LAUNCH_STAMP" ]
}

_until_checks_passed() {   # _until_checks_passed PARENT: in a background loop, wait until the training has
    # passed its checks (status.json), sleeping in the background so that TERM ends the wait at once;
    # false if the job shell PARENT is gone first. Polls every 0.2 s: a fork of `sleep`, nothing more.
    while ! launch_wrote_status; do
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.2 &
        sleeper=$!
        wait "$sleeper" || true
    done
}

when_checks_passed() {   # when_checks_passed COMMAND...: COMMAND in the background once the training has
    # passed its checks; never if it refused
    local parent=$$ sleeper=
    (
        trap '' USR1 INT
        trap '[ -n "$sleeper" ] && { kill "$sleeper"; wait "$sleeper"; } 2>/dev/null; exit 0' TERM
        _until_checks_passed "$parent" && "$@"
    ) &
    ONE_SHOT_PIDS+=($!)
}

log_environment() {   # log_environment RUN_DIR
    {
        echo "# environment of node $NODE_NAME (host $(hostname)), $(date '+%F %T %Z')"
        echo "git commit: $(git describe --always --dirty 2>/dev/null || echo unknown)"
        echo
        echo "## versions"
        "$WORKSHOP_PYTHON" - <<'EOF' || echo "python failed: $WORKSHOP_PYTHON"
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
        if command -v nvcc >/dev/null; then nvcc --version | tail -n 1; fi
        echo
        echo "## variables: SLURM_*, NCCL_*, CUDA_*, MASTER_* only"
        env | grep -E '^(SLURM|NCCL|CUDA|MASTER)_' | sort || true
        echo
        echo "## nvidia-smi"
        if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else echo "not found: no NVIDIA GPU here"; fi
    } >"$1/environment-$NODE_NAME.txt" 2>&1
}

log_pip_freeze() {   # log_pip_freeze RUN_DIR: once per run, from the batch node
    "$WORKSHOP_PYTHON" -m pip freeze >"$1/pip-freeze.txt" 2>/dev/null \
        || "$WORKSHOP_PYTHON" -c 'import importlib.metadata as m  # environments without pip (uv)
for name, version in sorted((d.metadata["Name"], d.version) for d in m.distributions()):
    print(name, version, sep="==")' >"$1/pip-freeze.txt" 2>/dev/null || true
}

_host_memory_sample() {
    # No $(...) here: bash 5.2 can lose a trap that arrives while the loop runs a command
    # substitution (the TERM that stops the logger), so the time comes from bash 5's EPOCHREALTIME.
    local now=${EPOCHREALTIME//[!0-9]/} ts
    if [ "${#now}" -gt 6 ]; then
        printf -v ts '%(%Y/%m/%d %H:%M:%S)T.%s' "${now:0:${#now}-6}" "${now:${#now}-6:3}"
    else   # bash before 5.0
        ts=$(date '+%Y/%m/%d %H:%M:%S.%3N')
    fi
    awk -v ts="$ts" '
        /^MemTotal:/ {t = $2} /^MemAvailable:/ {a = $2}
        END {printf "%s,%d,%d,%d\n", ts, (t - a) / 1024, t / 1024, a / 1024}' /proc/meminfo
}

_sample_every() {   # _sample_every FILE HEADER COMMAND...: a background loop, append COMMAND's output
    local out=$1 header=$2 parent=$$ sleeper=
    shift 2
    (
        # USR1 is the trainer's (a multi-node job's step delivers it to every process); TERM ends
        # the loop at once, without leaving its sleep behind
        trap '' USR1 INT
        trap '[ -n "$sleeper" ] && { kill "$sleeper"; wait "$sleeper"; } 2>/dev/null; exit 0' TERM
        _until_checks_passed "$parent" || exit 0
        [ -s "$out" ] || echo "$header" >"$out"
        while kill -0 "$parent" 2>/dev/null; do   # ends by itself if the job shell is gone
            "$@" >>"$out" 2>/dev/null || true
            sleep "$LOG_INTERVAL" &
            sleeper=$!
            wait "$sleeper" || true
        done
    ) &
    MEMORY_LOGGER_PIDS+=($!)
}

start_memory_loggers() {   # start_memory_loggers RUN_DIR
    local dir=$1 select=()
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        # only this job's GPUs where nvidia-smi can name them (it ignores CUDA_VISIBLE_DEVICES)
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] &&
            nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-gpu=index --format=csv,noheader >/dev/null 2>&1; then
            select=(-i "$CUDA_VISIBLE_DEVICES")
        fi
        _sample_every "$dir/gpu_memory-$NODE_NAME.csv" \
            "$(nvidia-smi --query-gpu=$GPU_QUERY --format=csv,nounits | head -n 1)" \
            nvidia-smi ${select[@]+"${select[@]}"} --query-gpu=$GPU_QUERY --format=csv,noheader,nounits
    fi
    if [ -r /proc/meminfo ]; then
        _sample_every "$dir/host_memory-$NODE_NAME.csv" timestamp,used_mib,total_mib,available_mib \
            _host_memory_sample
    fi
    echo "memory loggers on $NODE_NAME: every ${LOG_INTERVAL}s," \
        "$(command -v nvidia-smi >/dev/null && echo "GPU (nvidia-smi) and" || echo "no GPU (no nvidia-smi),")" \
        "$([ -r /proc/meminfo ] && echo host || echo "no host (no /proc/meminfo)")," \
        "once the training has passed its checks"
}

stop_memory_loggers() {   # from an EXIT trap: every node that started loggers stops them
    local pid i
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` in the bash 3.2 of macOS
    for pid in ${MEMORY_LOGGER_PIDS[@]+"${MEMORY_LOGGER_PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
    for pid in ${MEMORY_LOGGER_PIDS[@]+"${MEMORY_LOGGER_PIDS[@]}"}; do
        # a logger that missed its TERM would keep `wait` (and so the job) from ending: 2 s, then KILL
        for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            pkill -KILL -P "$pid" 2>/dev/null || true   # its sleep
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    MEMORY_LOGGER_PIDS=()
    for pid in ${ONE_SHOT_PIDS[@]+"${ONE_SHOT_PIDS[@]}"}; do
        # begun (the training passed its checks): a second or two to finish; still waiting: nothing to write
        launch_wrote_status || kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    ONE_SHOT_PIDS=()
}

# --- signals -----------------------------------------------------------------------------------
# SLURM sends the warning signal (--signal=B:USR1@...) to the batch shell only. The training
# command starts with SIGUSR1 *ignored*: a process that installs no handler (torchrun's agent,
# python before the trainer sets its handler, data loader workers) survives it; the trainer
# installs its handler with signal.signal(SIGUSR1, ...), which replaces the inherited "ignore".
# On USR1 the shell forwards it to the training ranks (see _forward_usr1); the same signal may
# arrive twice (SLURM also signals every process when it ends a job), so handlers are idempotent.
TRAIN_PID=
TRAIN_LAUNCHER=
WARNING_SIGNAL_SEEN=0
_SIGNAL_ARRIVED=0

_forward_usr1() {
    _SIGNAL_ARRIVED=1
    WARNING_SIGNAL_SEEN=1
    echo "$(date '+%F %T') SIGUSR1 (time limit near): forwarding it to the training ($TRAIN_LAUNCHER)"
    case $TRAIN_LAUNCHER in
        python) kill -USR1 "$TRAIN_PID" 2>/dev/null || true ;;
        # the ranks are torchrun's children; torchrun itself ignores USR1
        torchrun) pkill -USR1 -P "$TRAIN_PID" || true ;;
        # srun delivers it to every process of the step on every node
        srun) kill -USR1 "$TRAIN_PID" 2>/dev/null || true ;;
    esac
}

_forward_term() {   # SIGTERM / Ctrl-C (SIGINT) on a machine without SLURM: stop the training
    _SIGNAL_ARRIVED=1
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        # background processes ignore SIGINT, so the training is sent SIGTERM
        kill -TERM "$TRAIN_PID" 2>/dev/null || true
    fi   # under SLURM every process of the job gets the SIGTERM from SLURM itself
}

run_training() {   # run_training LAUNCHER COMMAND...: run it, forward signals, return its exit status
    TRAIN_LAUNCHER=$1
    shift
    if [ "$TRAIN_LAUNCHER" = node ]; then
        trap '' USR1   # the srun step already delivers USR1 to every process on this node
        trap '_SIGNAL_ARRIVED=1' TERM INT
    else
        trap _forward_usr1 USR1
        trap _forward_term TERM INT
    fi
    local rc=0 previous
    _SIGNAL_ARRIVED=0
    (trap '' USR1; exec "$@") &
    TRAIN_PID=$!
    wait "$TRAIN_PID" || rc=$?
    # a trapped signal ends `wait` early (status > 128) while the training runs on: wait again
    while [ "$_SIGNAL_ARRIVED" = 1 ] && [ "$rc" -gt 128 ]; do
        _SIGNAL_ARRIVED=0
        previous=$rc
        rc=0
        wait "$TRAIN_PID" || rc=$?
        [ "$rc" = 127 ] && rc=$previous   # it had ended already and was reaped
    done
    return "$rc"
}
