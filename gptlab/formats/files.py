"""How gptlab reads a JSON file (one clear error when it is not one) and writes a directory (model dirs,
adapters, token shards, checkpoints): staged beside its destination, flushed to disk, then renamed into
place, so a crash leaves the old dir or the new one whole."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (which must exist); not JSON, not an object or not UTF-8: a GptlabError
    naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise GptlabError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


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


def check_destination(dest: str | os.PathLike, markers: tuple[str, ...], what: str, overwrite: bool = False) -> Path:
    """Refuse, before any work, to replace what the user has: `dest` must be absent, an empty dir, or a dir
    gptlab wrote (holding one of `markers`, e.g. manifest.json) unless `overwrite`; never a file, the current
    dir or one of its parents. Returns dest as a Path."""
    dest = Path(dest)
    if dest.is_file() or (dest.exists() and not dest.is_dir()):
        raise GptlabError(f"{what} {dest} is a file, not a directory; choose a directory path with -o")
    if not dest.exists():
        _writable_parent(dest, what)
        return dest
    here = Path.cwd().resolve()
    if dest.resolve() == here or dest.resolve() in here.parents:
        raise GptlabError(f"{what} {dest} is the current directory (or holds it); choose a new directory with -o")
    entries = sorted(p.name for p in dest.iterdir())
    if not entries or overwrite or any((dest / m).exists() for m in markers):
        return dest
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise GptlabError(f"{what} {dest} already holds files gptlab did not write ({shown}); choose a new or empty "
                      f"directory, or pass --overwrite to replace it")


def _writable_parent(dest: Path, what: str) -> None:
    """The parent of a new destination can be made and written (checked now, not after the work)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{dest.name}.probe-", dir=dest.parent))
        probe.rmdir()
    except OSError as e:
        raise GptlabError(f"{what} {dest} cannot be written: {e.strerror or e} ({e.filename or dest.parent})") from None


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
    # mkdtemp made `new` 0700: give it the mode of the dir it replaces, or what a mkdir would give
    if dest.is_dir():
        os.chmod(new, dest.stat().st_mode & 0o7777)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(new, 0o777 & ~umask)
    _fsync(new)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    _fsync(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """out_dir/.gptlab.lock: one writing process per run dir. Holds the owner's pid and host; a lock whose
    process is gone (same host) is stale and taken over. Released on release() or at exit.

    lock_file: where the lock lives when not in out_dir (prepare replaces its whole output dir, so its lock
    sits beside it); option: the option that names the dir, for the error's advice.
    """

    def __init__(self, out_dir: Path, lock_file: Path | None = None, option: str = "--out-dir") -> None:
        import atexit
        import socket

        out_dir = Path(out_dir)
        self.created = lock_file is None and not out_dir.exists()  # a failed start takes a dir it made away
        if lock_file is None:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.dir, self.path = out_dir, lock_file or out_dir / ".gptlab.lock"
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner == {}:
                    raise GptlabError(f"{self.path} is not a lock gptlab can read; delete it if no run is using "
                                      f"{out_dir}") from None
                mine_or_gone = owner is not None and owner.get("host") == me["host"] and (
                    owner.get("pid") == me["pid"] or not _alive(owner.get("pid")))  # this process's own, or stale
                if owner is not None and not mine_or_gone:
                    raise GptlabError(f"{out_dir} is in use by another gptlab run (pid {owner.get('pid')} on "
                                      f"{owner.get('host')}); wait for it, or choose another {option}") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            atexit.register(self.release)
            return
        raise GptlabError(f"could not take the lock {self.path}")

    def _owner(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treat as held by someone unknown

    def release(self) -> None:
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def abandon(self) -> None:
        """release(), and remove the run dir when this run made it and it is still empty."""
        self.release()
        if self.created:
            try:
                self.dir.rmdir()  # only succeeds when empty
            except OSError:
                pass


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
