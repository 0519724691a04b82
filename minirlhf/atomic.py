"""The one way this package writes a file or a folder: all of it, or nothing.

    with atomic_file("runs/x/summary.json") as tmp:    # tmp: a path beside the target
        write tmp
    with atomic_folder("runs/x/adapter") as tmp:       # tmp: an empty folder beside the target
        write files into tmp

Why: a run is killed (Ctrl-C, out of memory, a preempted machine) at any moment, and a half-written
checkpoint or adapter is worse than none: it loads, and is wrong. So nothing is ever written where it
will be read. The new version is written under a temporary name in the same folder (same file system,
so the rename is atomic), flushed to the disk (fsync: after a power cut the rename must not point at
data still in the page cache), and only then renamed over the target. If the body raises, the temporary
path is removed and the previous version is untouched.

A folder cannot be swapped atomically with a plain rename when the target exists, so atomic_folder moves
the old folder aside, renames the new one in, then deletes the old one; a crash between those two renames
leaves the previous version whole under `.old-<name>-*` beside the target. It refuses to replace a folder
that holds anything the new version would not write (your files next to a saved model are never deleted).

metrics.jsonl is the one file of ours written otherwise: it is an append-only log (one line per step), and
report.read_metrics drops a line cut by a crash. The --log-with trackers' event files (tracking.py) are
append-only logs of the same kind, written by TensorBoard or W&B themselves.
"""

import contextlib
import os
import shutil
import tempfile


class WriteError(OSError):
    """The target cannot be written as asked; the message names it."""


@contextlib.contextmanager
def atomic_file(path: str, mode: int = 0o644):
    """Yield a temporary path beside `path`; when the body returns, it becomes `path` (fsynced)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise WriteError(f"{path}: is a folder, not a file")
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes it owner-only; a run's files are ordinary files
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)  # the rename itself is a change to the folder
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path`, atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield an empty temporary folder beside `path`; when the body returns, it becomes `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WriteError(f"{path}: exists and is not a folder")
    name = os.path.basename(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model is an ordinary folder
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync(os.path.join(root, f))
        _fsync(tmp)
        _replace_folder(tmp, path, parent, name)
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(new: str, path: str, parent: str, name: str) -> None:
    if not os.path.exists(path):
        os.rename(new, path)
        return
    foreign = sorted(set(os.listdir(path)) - set(os.listdir(new)))
    if foreign:
        raise WriteError(f"{path}: already holds files this write would not replace ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); write to a new or empty folder")
    old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
    os.rmdir(old)  # only its unique name is wanted
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
