"""Writing results so that a reader never sees half of them: stage hidden, fsync, rename.

Every folder a later run trusts (prepared data, a merged model, the converted default model,
the final adapter) is written into a hidden sibling first, flushed to disk, and renamed into
place only when complete. A killed writer leaves a hidden `.NAME.tmp-...` folder, never
something under the real name. The staging names carry the host name, the process id and a
random part, so processes in identical containers that share a filesystem (same PIDs) never
collide.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def hidden_sibling(target: Path, kind: str = "tmp") -> Path:
    """`.NAME.KIND-HOST-PID-RANDOM` next to `target`: unique across processes and hosts."""
    host = socket.gethostname().split(".")[0] or "host"
    return target.parent / f".{target.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:  # e.g. a folder on a filesystem that cannot be opened for fsync
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def staged_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """A hidden folder next to `target` that becomes `target` when the block completes.

    On an exception the staging folder is deleted and `target` is untouched. On success the
    files are fsynced and the folder renamed into place. When `target` exists by then:
    `replace=True` moves it aside first (a crash between the two renames leaves no target and
    the old folder as `.NAME.old-...`, never a half-written one under the target's name) and
    deletes it; `replace=False` keeps the existing folder (another process finished the same
    work first) and discards this one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target)
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and not replace:
        shutil.rmtree(staging, ignore_errors=True)
        return
    previous = None
    if target.exists():
        previous = hidden_sibling(target, "old")
        target.rename(previous)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists() or replace:
            raise  # not another writer's finished folder: a real failure
    _fsync_path(target.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def publish_files(staging: Path, folder: Path, *, last: str) -> None:
    """Move the files written into `staging` into the existing `folder`, then remove `staging`.

    The file named `last` arrives after all the others, so a reader that takes it as the mark of
    a finished write (the final adapter's weights) never sees it beside stale companions.
    """
    fsync_tree(staging)
    for file in sorted(staging.iterdir(), key=lambda p: p.name == last):
        os.replace(file, folder / file.name)
    _fsync_path(folder)
    shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(target: Path, older_than_seconds: float) -> None:
    """Delete staging folders of `target` that writers killed part-way left behind."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > older_than_seconds:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass
