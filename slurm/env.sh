# slurm/env.sh - the software environment of every job: the one place to edit for your cluster.
# Sourced by slurm/common.sh (on the batch node) and slurm/srun_task.sh (on every node), with
# `set -u` relaxed, before anything runs Python.
#
# sbatch passes your submitting shell's environment on to the job (--export=ALL is the default),
# so a virtual environment that is active when you type `sbatch ...` is active in the job too, and
# nothing here is needed. Clusters whose jobs start from a clean environment need lines like these:

# EDIT: modules your cluster needs (names differ from site to site: `module avail`)
# module purge
# module load python/3.12 cuda/12.4

# EDIT: the Python environment that has `pip install -r requirements.txt` in it
# source "$HOME/venvs/workshop/bin/activate"
# or: conda activate workshop
