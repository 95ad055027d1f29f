"""One writer per workdir: a lock taken before a run writes anything, released when it ends.

On local and shared POSIX filesystems the lock is `fcntl.flock` on `WORKDIR/.lock`, which also holds a JSON owner
record (host, pid, process start time, since). The kernel drops a flock when its process dies, so a record left by a
killed run is recognised as stale and taken over with a warning. Where a dead holder's flock lingers (NFS after a
client crash) and the record names this host and a process that is gone, the lock file is replaced. On object stores
(`gs://...`, or `method="record"` for filesystems without flock, e.g. gcsfuse) there is no lock primitive: the owner
record alone marks the workdir, and `check()` (call it before each save) stops a run whose record was replaced.

Under jax.distributed only process 0 takes the lock (the run, not each host, is the writer); on the other processes
the lock's methods do nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import uuid

import jax
from absl import logging
from etils import epath

from uvit_jax.rundir import RunDir


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir (or took it over); the message names the holder and how to clear it."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused pid from the recorded process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _describe(record: dict | None) -> str:
    if not record:
        return "an unknown process (no owner record)"
    return f"host {record.get('host')} pid {record.get('pid')} since {record.get('since')}"


class WorkdirLock:
    """Context manager: exclusive writer lock on `workdir` (see the module docstring).

    Args:
      workdir: the run directory (created if missing, it is the first thing a run writes).
      method: "auto" (flock for local paths, an owner record for `scheme://` paths), "flock" or "record".
    """

    def __init__(self, workdir: str | os.PathLike, *, method: str = "auto"):
        workdir = os.fspath(workdir)
        remote = "://" in workdir
        if method == "auto":
            method = "record" if remote else "flock"
        if method not in ("flock", "record") or (remote and method == "flock"):
            raise ValueError(f"WorkdirLock: method must be 'auto', 'flock' (local paths) or 'record', got {method!r}"
                             f" for {workdir}")
        self.workdir = workdir
        self.method = method
        self.path = epath.Path(RunDir(workdir).lock)
        self._fd: int | None = None
        self._record: dict | None = None
        self._passive = False  # a process of a multi-process run other than 0

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _new_record(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), "boot_id": _boot_id(),
                "since": _now(), "token": uuid.uuid4().hex}

    def _locked_error(self, record: dict | None) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"workdir {self.workdir} is in use by another run ({_describe(record)}); wait for it to finish or stop "
            f"it, or, if that run is gone, delete {self.path} and start again")

    def _is_stale(self, record: dict | None) -> bool:
        """The recorded holder is a process on this host that no longer exists (or a reused pid, or a reboot)."""
        if not record or record.get("host") != socket.gethostname():
            return False
        if record.get("boot_id") and _boot_id() and record["boot_id"] != _boot_id():
            return True
        pid = record.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return True
        start = record.get("pid_start")
        return start is not None and _process_start(pid) not in (None, start)

    def acquire(self) -> None:
        """Take the lock or raise WorkdirLockedError naming the live holder; a stale lock is taken over."""
        if self._record is not None or self._passive:
            raise RuntimeError(f"WorkdirLock on {self.workdir} is already held by this object")
        # Asked without starting a JAX backend, so the lock may be taken before jax.distributed.initialize.
        if jax.distributed.is_initialized() and jax.process_index() != 0:
            self._passive = True
            return
        if self.method == "flock":
            self._acquire_flock()
        else:
            self._acquire_record()
        logging.info("workdir lock: %s taken by pid %d", self.path, os.getpid())

    def _acquire_flock(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        path = os.fspath(self.path)
        for attempt in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                record = _read_record_file(path)
                if attempt == 0 and self._is_stale(record):
                    # A dead holder's flock lingers (NFS): replace the file, whose inode that lock is on.
                    logging.warning("workdir lock: replacing %s, held by %s which is gone", path, _describe(record))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                raise self._locked_error(record) from None
            # Locked; but the holder may have deleted the file between our open and flock: lock the file on disk.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_fd_record(fd)
            if previous and previous.get("pid") is not None:
                logging.warning("workdir lock: taking over the stale lock %s of %s (that process is gone)", path,
                                _describe(previous))
            self._record = self._new_record()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._record).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise self._locked_error(_read_record_file(path))

    def _acquire_record(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            record = _parse(self.path.read_text())
            if not self._is_stale(record):
                raise self._locked_error(record)
            logging.warning("workdir lock: taking over the stale lock %s of %s (that process is gone)", self.path,
                            _describe(record))
        record = self._new_record()
        self.path.write_text(json.dumps(record))
        self._record = record
        self.check()  # a run that started at the same moment may have written after us

    def check(self) -> None:
        """Raise WorkdirLockedError if this run no longer owns the workdir (call before each save; cheap)."""
        if self._passive:
            return
        if self._record is None:
            raise RuntimeError(f"WorkdirLock on {self.workdir} is not held")
        if self.method == "flock":
            try:
                ours = os.stat(os.fspath(self.path)).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                ours = False
            record = None if ours else _read_record_file(os.fspath(self.path))
        else:
            record = _parse(self.path.read_text()) if self.path.exists() else None
            ours = bool(record) and record.get("token") == self._record["token"]
        if not ours:
            raise WorkdirLockedError(
                f"workdir {self.workdir}: this run's lock {self.path} was removed or taken over (now held by "
                f"{_describe(record)}); stopping so that two runs do not write the same checkpoints")

    def release(self) -> None:
        """Drop the lock and its owner record (if still ours). Idempotent."""
        self._passive = False
        if self._record is None:
            return
        try:
            if self.method == "flock":
                try:
                    if os.stat(os.fspath(self.path)).st_ino == os.fstat(self._fd).st_ino:
                        os.unlink(os.fspath(self.path))  # while still locked, so nobody takes a file we delete
                except FileNotFoundError:
                    pass
                os.close(self._fd)  # releases the flock
                self._fd = None
            elif self.path.exists() and (_parse(self.path.read_text()) or {}).get("token") == self._record["token"]:
                self.path.unlink()
        finally:
            self._record = None


def _parse(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_fd_record(fd: int) -> dict | None:
    size = os.fstat(fd).st_size
    return _parse(os.pread(fd, size, 0).decode("utf-8", "replace")) if size else None


def _read_record_file(path: str) -> dict | None:
    try:
        with open(path) as f:
            return _parse(f.read())
    except OSError:
        return None
