#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for CI: one controller and two compute nodes, n1 and n2
# (two slurmd daemons on ports 17001/17002 of this host, Debian's build allows MULTIPLE_SLURMD).
#
#   eval "$(.ci/slurm_cluster.sh start)"   # install slurm + munge if missing, start, export SLURM_CONF
#   .ci/slurm_cluster.sh status            # exit 0 and print the export line when the cluster is up
#   .ci/slurm_cluster.sh stop              # cancel jobs, stop the daemons, restore /etc/hosts
#
# stdout carries only `export SLURM_CONF=...`; progress goes to stderr. Needs root (apt, /etc/hosts,
# munged). start and stop are idempotent: start on a running cluster only prints the export line,
# start after a half-finished start or stop cleans up first, stop on nothing does nothing.
# Everything lives under $SLURM_CI_DIR (default /tmp/workshop-slurm-ci): slurm.conf, state, spool,
# pid files and daemon logs (log/ is kept after stop, for reading after a failed CI run).
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/workshop-slurm-ci}
CONF=$DIR/slurm.conf
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=16817
HOSTS_MARK="# workshop-slurm-ci"   # marks the /etc/hosts line this script adds (and removes)
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_running() {   # pid_running PID: alive and not a zombie (a daemon's parent is PID 1, which may
    # reap it seconds late: waiting for kill -0 to fail would cost every stop 10 s per daemon)
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d ' ' -f 1)" != Z ]
}

pid_alive() { [ -s "$1" ] && pid_running "$(cat "$1")"; }

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing=1; done
    [ "$missing" = 0 ] && return 0
    say "installing slurmctld slurmd slurm-client munge (apt, --no-install-recommends)"
    local pkgs=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2; } \
        || die "could not install ${pkgs[*]} with apt-get"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi   # one is running already
    [ -s /etc/munge/munge.key ] || { mungekey --create >&2 && chown munge:munge /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/run/munged.ours"   # stop ends munged only if this script started it
    local i
    for i in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start (try: runuser -u munge -- /usr/sbin/munged -F)"
}

conf_text() {
    # The node's real layout from slurmd -C (declaring only CPUs=2 makes slurmd complain); both
    # nodes describe the same machine, so jobs should ask for 1 CPU per task.
    local layout host
    layout=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
    host=$(hostname)
    cat <<EOF
# written by .ci/slurm_cluster.sh: a controller and two nodes on one machine, for CI
ClusterName=workshop-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# KillWait: seconds between SIGTERM and SIGKILL when a job ends (default 30); MinJobAge keeps a
# finished job visible to scontrol for 5 minutes, long enough for tests to read its state.
KillWait=10
MinJobAge=300
# A requeued job waits cred_expire seconds (default 120) before it may start again, and pending jobs
# are looked at every sched_interval seconds (default 60) besides submit/end events: together
# about 155 s of PENDING after each requeue. 10 s and 2 s let the requeue test take seconds.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
# job ids go on from one cluster start to the next (run folders are named after them: a new job 7
# must not find an old job 7's checkpoints): ten ids a second since a date, under MaxJobId
FirstJobId=$(( ($(date +%s) - 1790000000) * 10 % 60000000 + 1 ))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[0]} $layout
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[1]} $layout
PartitionName=ci Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

same_conf() {   # the running cluster's slurm.conf is what this script writes now (job ids aside)
    [ "$(grep -v '^FirstJobId=' "$CONF")" = "$(conf_text | grep -v '^FirstJobId=')" ]
}

remove_hosts_line() {
    # rewrite in place (cat >), not sed -i: /etc/hosts is often a bind mount that cannot be replaced
    if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        local kept
        kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

add_hosts_line() {
    remove_hosts_line
    [ -z "$(tail -c 1 /etc/hosts)" ] || echo >>/etc/hosts   # a last line without its newline
    # MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) gives n1: it must resolve
    echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >>/etc/hosts
}

is_up() {
    [ -f "$CONF" ] && pid_alive "$DIR/run/slurmctld.pid" || return 1
    local n
    for n in "${NODES[@]}"; do pid_alive "$DIR/run/slurmd-$n.pid" || return 1; done
    scontrol ping 2>/dev/null | grep -q UP || return 1
    # every node answers (idle, mixed or allocated; not down, drained or not responding)
    [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$')" = "${#NODES[@]}" ]
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "start needs root (apt-get, /etc/hosts, munged)"
    install_packages
    if is_up; then
        if same_conf; then
            say "already up"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        say "up with an older slurm.conf: restarting it"
    fi
    cmd_stop 2>/dev/null || true   # clean up whatever a half-finished start left behind
    mkdir -p "$DIR"/{state,run,log} "$DIR/spool/${NODES[0]}" "$DIR/spool/${NODES[1]}"
    start_munge
    conf_text >"$CONF"
    add_hosts_line
    slurmctld -f "$CONF"
    local n i
    for n in "${NODES[@]}"; do slurmd -f "$CONF" -N "$n"; done
    for i in $(seq 60); do
        if is_up; then
            say "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')(config $CONF)"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    say "the cluster did not come up in 30 s; the end of its logs:"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    cmd_stop || true
    exit 1
}

stop_pidfile() {   # stop_pidfile FILE: SIGTERM, up to 10 s, then SIGKILL
    local pid i
    pid_alive "$1" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 100); do pid_running "$pid" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

cmd_stop() {
    local i f
    # jobs first, while the controller still answers: a slurmd stopped under a running job leaves
    # its slurmstepd and the job's processes behind
    if [ -f "$CONF" ] && pid_alive "$DIR/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
        fi
    fi
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do
        [ -e "$f" ] && stop_pidfile "$f"
    done
    if [ -e "$DIR/run/munged.ours" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$DIR/run/munged.ours"
    fi
    remove_hosts_line
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$CONF"
    say "stopped (daemon logs kept in $DIR/log)"
}

cmd_status() {
    if is_up; then
        sinfo -N >&2
        echo "export SLURM_CONF=$CONF"
    else
        say "not running"
        return 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status   (eval \"\$($0 start)\" exports SLURM_CONF)" >&2; exit 2 ;;
esac
