"""The one error type the workshop raises for bad input.

Every message is a single line that names the flag or file at fault and says what to do, e.g.
``--max_seq_length 4096 is longer than the model's 1024 positions: use --max_seq_length 1024 or less``.
The command line prints it as ``error: ...`` and exits with status 2, before any GPU time is spent.

How ``workshop train`` ends, every process of a run alike, under python, torchrun, the deepspeed
launcher and srun (torchrun and srun themselves return 1 when any process ends non-zero):

    status.json  exit status
    completed    0
    failed       1    an unexpected error: its traceback (130 for Ctrl-C); status.json holds its first line
    (none)       2    bad input, refused before the run folder is written: one ``error:`` line
    oom          3    out of GPU memory (OutOfMemory)
    stopped      75   SIGUSR1/SIGTERM: a checkpoint is saved; the same command resumes (EX_TEMPFAIL)
"""

STOPPED = 75


class WorkshopError(Exception):
    """Bad input that the user can fix; the message says how."""

    exit_code = 2


class OutOfMemory(WorkshopError):
    """The GPU ran out of memory; the message gives the peak, the estimate and what to try next."""

    exit_code = 3
