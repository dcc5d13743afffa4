"""The one error type the workshop raises for bad input.

Every message is a single line that names the flag or file at fault and says what to do, e.g.
``--max_seq_length 4096 is longer than the model's 1024 positions: use --max_seq_length 1024 or less``.
The command line prints it as ``error: ...`` and exits with status 2, before any GPU time is spent.
"""


class WorkshopError(Exception):
    """Bad input that the user can fix; the message says how."""

    exit_code = 2


class OutOfMemory(WorkshopError):
    """The GPU ran out of memory; the message gives the peak, the estimate and what to try next."""

    exit_code = 3
