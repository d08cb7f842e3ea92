"""What keeps a training run from harming or misleading: one writing process per run dir (RunLock), and
loop settings that would train nothing refused before any work (check_loop_config)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.limits import check_fields

RUN_ENTRIES = ("last", "best", "final", "merged", "metrics.jsonl", "tb")  # what a run writes in out_dir


class RunLock:
    """out_dir/.gptlab.lock: one writing process per run dir. Holds the owner's pid and host; a lock whose
    process is gone (same host) is stale and taken over. Released on release() or at exit."""

    def __init__(self, out_dir: Path) -> None:
        import atexit
        import socket

        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / ".gptlab.lock"
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
                                      f"{owner.get('host')}); wait for it, or choose another --out-dir") from None
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


LOOP_LIMITS = ("max_steps", "batch_size", "grad_accum", "warmup_steps", "eval_every", "eval_batches", "log_every",
               "save_every", "patience", "stop_at_step", "skip_nonfinite", "lr", "min_lr", "weight_decay", "eps",
               "grad_clip", "beta1", "beta2")


def check_loop_config(cfg) -> None:
    """One clear error for a loop setting that would train nothing or train wrong (run before any work);
    the bounds are gptlab.limits.LIMITS, shared with the server and the other commands."""
    check_fields(cfg, LOOP_LIMITS)
