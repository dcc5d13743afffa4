#!/usr/bin/env bash
# slurm/srun_task.sh - one srun task on each node of a multi-node job, started by slurm/common.sh:
#     srun --nodes=$NNODES --ntasks-per-node=1 ... bash slurm/srun_task.sh -m workshop train ...
# Logs this node's environment, starts this node's memory loggers (stopped on exit, whatever
# happens to the training), and runs torchrun with this node's rank.
set -euo pipefail
trap '' USR1   # first thing: the step delivers SIGUSR1 to every process; only the trainer acts on it

set +u
source slurm/env.sh
set -u
source slurm/node.sh
trap stop_memory_loggers EXIT

# Every count comes from SLURM; $SLURM_NODEID is this node's own value here. Written into the srun
# line on the batch node it would expand there, and every node would claim node rank 0.
TORCHRUN_ARGS=(
    --nnodes="$SLURM_NNODES"
    --nproc_per_node="$NPROC_PER_NODE"
    --node_rank="$SLURM_NODEID"
    --master_addr="$MASTER_ADDR"
    --master_port="$MASTER_PORT"
)
first=$((SLURM_NODEID * NPROC_PER_NODE))
echo "node $NODE_NAME (host $(hostname)): node_rank $SLURM_NODEID of $SLURM_NNODES," \
    "ranks $first..$((first + NPROC_PER_NODE - 1)) of world size $((SLURM_NNODES * NPROC_PER_NODE))"

when_checks_passed log_environment "$RUN_DIR"
start_memory_loggers "$RUN_DIR"
run_training node "$WORKSHOP_PYTHON" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" "$@"
