"""Writing run-folder files so that a killed job never leaves a half-written one behind.

Each file is written under a temporary name in the same folder and renamed over the target:
``os.replace`` is atomic on POSIX file systems, so a reader sees the old file or the new one.
Also the reading back of what ``workshop bench`` and ``workshop scale`` wrote, for their ``--combine``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from workshop.errors import WorkshopError


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_results(folder: Path, command: str) -> tuple[dict, str]:
    """``<command>.json`` in an output folder of ``workshop <command>``, and its header line (GPU,
    versions, date)."""
    path = folder / f"{command}.json"
    if not path.is_file():
        raise WorkshopError(f"--combine {folder}: no {command}.json there; give folders that `workshop {command}` "
                            "wrote")
    data = json.loads(path.read_text())
    return data, data["header"]
