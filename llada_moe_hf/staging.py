# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Writing an output directory safely: a hidden staging directory beside the destination, moved into place only
once complete, given normal permissions (the umask's) when it is, and found again if the process that wrote it
was killed.

    with StagingDir(dst) as tmp:      # .DST.tmp-XXXXXXXX beside DST, plus a lock held while this process lives
        ...write and verify in tmp...
        tmp.commit()                  # rename to DST (an existing DST only with overwrite=True)

Ctrl-C, SIGTERM (with llada_moe_hf.cli_common.sigterm_raises) or any error removes the staging directory.
SIGKILL or a crash cannot be caught: the staging directory then stays, but its lock file says which process
wrote it, and the lock (an flock, released by the kernel when the process dies) says whether it still runs;
`stale_staging_dirs(dst)` finds those of dead processes, which the next run removes and reports.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path


LOCK_NAME = ".llada-moe-staging.lock"  # inside the staging directory; removed just before the rename


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(root: Path):
    """Directories 0777 and files 0666 (0777 if executable) minus the umask, below and at `root`: temporary-file
    helpers (mkdtemp, mkstemp, and savers built on them) create 0700 directories and 0600 files."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def directory_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _try_lock(handle) -> bool:
    """Take the flock of an open lock file without waiting; False when another live process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): fall back to the pid recorded in the file
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _owner_alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # another machine (shared filesystem): never presume it dead
    try:
        os.kill(int(info.get("pid", -1)), 0)
        return True
    except (OSError, ValueError):
        return False


class StagingDir:
    """A staging directory beside `dst` (see the module docstring). Use as a context manager."""

    def __init__(self, dst: Path, *, purpose: str = "llada-moe"):
        self.dst = Path(dst)
        self.purpose = purpose
        self.path: Path | None = None
        self._lock = None

    def __enter__(self) -> StagingDir:
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        self._lock = open(self.path / LOCK_NAME, "w")
        _try_lock(self._lock)
        info = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    purpose=self.purpose, destination=str(self.dst))
        self._lock.write(json.dumps(info) + "\n")
        self._lock.flush()
        return self

    def __truediv__(self, name):
        return self.path / name

    def release_lock(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            (self.path / LOCK_NAME).unlink(missing_ok=True)

    def commit(self, overwrite: bool = False):
        """Rename the staging directory to dst. An existing dst (only with overwrite) is moved aside first and
        removed only once the new one is in place; if the rename fails it is put back."""
        self.release_lock()
        normalize_permissions(self.path)
        if not self.dst.exists():
            os.rename(self.path, self.dst)
        elif not overwrite:
            raise FileExistsError(f"{self.dst} appeared while it was being written; not replacing it.")
        else:
            backup = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.old-", dir=self.dst.parent))
            os.rmdir(backup)
            os.rename(self.dst, backup)
            try:
                os.rename(self.path, self.dst)
            except BaseException:
                os.rename(backup, self.dst)
                raise
            remove_quietly(backup)
        self.path = None

    def __exit__(self, exc_type, exc, tb):
        if self.path is not None:  # not committed: an error, Ctrl-C or SIGTERM
            self.release_lock()
            remove_quietly(self.path)
        return False


def remove_quietly(path: Path):
    """rmtree that a second Ctrl-C or SIGTERM cannot cut short (they are delivered once it is done)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def leftover_dirs(dst: Path) -> list[dict]:
    """Hidden directories beside dst that earlier runs left: staging directories (`.NAME.tmp-*`) and the old
    destination moved aside during a replacement (`.NAME.old-*`). Each entry: path, kind ("stale": its writer is
    dead; "running": its writer still runs; "unknown": no lock file, e.g. from an older version; "old"), size,
    and the lock file's info."""
    dst = Path(dst)
    found = []
    if not dst.parent.is_dir():
        return found
    for path in sorted(dst.parent.iterdir()):
        name = path.name
        if not path.is_dir() or not name.startswith("."):
            continue
        lock = path / LOCK_NAME
        ours = name.startswith(f".{dst.name}.tmp-")
        if lock.is_file():
            info = _read_lock(lock)
            found.append(dict(path=path, kind=_lock_state(lock, info), info=info))
        elif ours:
            found.append(dict(path=path, kind="unknown", info={}))
        elif name.startswith(f".{dst.name}.old-"):
            found.append(dict(path=path, kind="old", info={}))
    for entry in found:
        entry["size"] = directory_size(entry["path"])
    return found


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _lock_state(lock: Path, info: dict) -> str:
    """"stale" when no live process holds the lock (the kernel drops an flock when its holder dies), else
    "running"; without flock (Windows), whether the recorded pid still runs."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return "running" if _owner_alive(info) else "stale"
    try:
        with open(lock) as handle:
            return "stale" if _try_lock(handle) else "running"
    except OSError:
        return "unknown"


def clean_leftovers(dst: Path, report) -> list[dict]:
    """Remove the staging directories of dead runs beside dst and `report(message)` each; report (without
    touching them) the ones of running runs, those without a lock file and a moved-aside old destination.
    Returns the entries still there."""
    remaining = []
    for entry in leftover_dirs(dst):
        path, size, info = entry["path"], human_size(entry["size"]), entry["info"]
        if entry["kind"] == "stale":
            remove_quietly(path)
            report(f"Removed {path} ({size}), left by a run that was killed (pid {info.get('pid', '?')}, started "
                   f"{info.get('started', '?')}, writing {info.get('destination', '?')}).")
        elif entry["kind"] == "running":
            report(f"Note: {path} ({size}) is being written by a run still in progress (pid {info.get('pid', '?')}"
                   f", writing {info.get('destination', '?')}); leaving it alone.")
            remaining.append(entry)
        elif entry["kind"] == "unknown":
            report(f"Note: {path} ({size}) looks like the output of an interrupted run (it has no lock file, so "
                   f"whether that run still goes on is unknown). If none is running, remove it: "
                   f"rm -rf {shlex.quote(str(path))}")
            remaining.append(entry)
        else:
            where = (f"an interrupted replacement left the previous {dst.name} there; remove it: "
                     f"rm -rf {shlex.quote(str(path))}"
                     if dst.exists() else
                     f"it holds the previous {dst.name}, moved aside by a replacement that was interrupted; restore "
                     f"it: mv {shlex.quote(str(path))} {shlex.quote(str(dst))}")
            report(f"Note: {path} ({size}): {where}")
            remaining.append(entry)
    return remaining
