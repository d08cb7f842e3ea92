"""How gptlab writes a directory (model dirs, adapters, token shards, checkpoints): staged beside its
destination, flushed to disk, then renamed into place, so a crash leaves the old dir or the new one whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def staged_dir(dest: Path):
    """Yield a hidden temporary dir beside `dest`; on success it replaces `dest`, on error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the files themselves are synced
        pass
    finally:
        os.close(fd)


def replace_dir(new: Path, dest: Path) -> None:
    """Move a finished dir into place: the old `dest` stays valid until the new one is complete.

    The new files are flushed to disk before the rename, so a power cut leaves the old or the new dir whole,
    never a renamed dir of empty files.
    """
    for f in sorted(new.rglob("*"), reverse=True):  # files before the dirs that hold them
        _fsync(f)
    _fsync(new)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    _fsync(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
