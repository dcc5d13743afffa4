"""A killed job never leaves a half-written run-folder file behind: what docs/run-folder.md and
workshop/files.py promise, watched from outside the code.

A tiny in-process training runs with the file system calls spied on: the builtin ``open`` (and
``io.open``, which pathlib and ``os.fdopen`` call), ``os.open`` (``tempfile.mkstemp``), ``os.mkdir``,
``os.replace`` and ``os.rename``. The reference is the spy's record, not the code's own helpers:

- ``config.json``, ``status.json``, ``log_history.json``, ``metrics.json`` (the workshop's own files,
  ``workshop/files.py``): never opened for writing at their final path; each arrives by a rename from
  a name in the same folder that was itself opened for writing (which also proves the spy sees writes);
- ``checkpoints/checkpoint-N/`` ("written atomically", docs/run-folder.md): never made, and nothing
  opened for writing in it, at its final path; it arrives by a rename from ``checkpoints/.incomplete/``;
- ``steps.jsonl`` is appended a row per logging step (the docs claim no more; ``workshop report``
  skips a last line cut short): it is the only top-level file opened for writing directly, and only
  in append mode. ``model/`` is not claimed atomic and is not checked.

Bugs injected and watched red: ``metrics.json`` written with ``Path.write_text`` in ``train.py``
(red: opened at its final path); ``WorkshopTrainer._save_checkpoint`` reduced to the stock Trainer's
(red: ``checkpoint-N`` not renamed from ``.incomplete``). No tolerance: the record is exact.
``profile.txt`` and ``profile_trace.json`` (``--profile_steps``) are written whole and renamed too,
but this run does not profile, so they are not checked here.
"""

import builtins
import io
import os

from workshop import train

ATOMIC = ("config.json", "status.json", "log_history.json", "metrics.json")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _path(p) -> str | None:
    if isinstance(p, int):  # os.fdopen: the descriptor's own os.open was recorded
        return None
    p = os.fspath(p)
    return os.path.abspath(p.decode() if isinstance(p, bytes) else p)


def test_every_file_the_docs_call_atomic_is_renamed_into_place_never_written_there(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    writes = []   # (path, mode) of every open for writing
    renames = []  # (source, target)
    made = []     # directories made
    real_open, real_os_open = builtins.open, os.open
    real_replace, real_rename, real_mkdir = os.replace, os.rename, os.mkdir

    def spy_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _path(file):
            writes.append((_path(file), mode))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            writes.append((_path(path), "os.open"))
        return real_os_open(path, flags, *args, **kwargs)

    def spy_replace(src, dst, *args, **kwargs):
        renames.append((_path(src), _path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    def spy_rename(src, dst, *args, **kwargs):
        renames.append((_path(src), _path(dst)))
        return real_rename(src, dst, *args, **kwargs)

    def spy_mkdir(path, *args, **kwargs):
        made.append(_path(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "rename", spy_rename)
    monkeypatch.setattr(os, "mkdir", spy_mkdir)
    # 2 epochs x 8 steps: two checkpoints, status.json written twice (running, completed).
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir), "--stage", "baseline",
                       "--max_train_samples", "64", "--answer_eval_samples", "4", "--save_strategy", "epoch"]) == 0
    monkeypatch.undo()

    root = os.path.abspath(run_dir)
    written = {path for path, _ in writes}
    for name in ATOMIC:
        final = os.path.join(root, name)
        assert os.path.isfile(final), name
        assert final not in written, f"{name} was opened for writing at its final path"
        sources = [src for src, dst in renames if dst == final]
        assert sources, f"{name} was never renamed into place"
        for src in sources:
            assert os.path.dirname(src) == root and src != final, (name, src)  # same folder: a rename, not a copy
            assert src in written, (name, src)  # the temporary file was written (the spy sees the writes)
    assert len([dst for _, dst in renames if dst == os.path.join(root, "status.json")]) >= 2  # running, completed

    checkpoints = os.path.join(root, "checkpoints")
    names = sorted(n for n in os.listdir(checkpoints) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-16", "checkpoint-8"]
    for name in names:
        final = os.path.join(checkpoints, name)
        assert (os.path.join(checkpoints, ".incomplete", name), final) in renames, name
        assert final not in made, f"{name} was made at its final path"
        inside = [path for path in written if path.startswith(final + os.sep)]
        assert not inside, f"written at their final path: {inside}"
        staged = [path for path in written if path.startswith(os.path.join(checkpoints, ".incomplete", name) + os.sep)]
        assert staged, name  # its files were written (those Python opens: torch.save, the JSON files)

    direct = {(os.path.relpath(path, root), mode) for path, mode in writes
              if os.path.dirname(path) == root}
    temporary = {(rel, mode) for rel, mode in direct if rel.startswith(".") and rel.endswith(".tmp")}
    assert direct - temporary == {("steps.jsonl", "a")}
