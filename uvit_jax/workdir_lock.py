"""One writer per workdir: a lock taken before a run writes anything, released when it ends.

On local and shared POSIX filesystems the lock is `fcntl.flock` on `WORKDIR/.lock`, which also holds a JSON owner
record (host, pid, process start time, since). The kernel drops a flock when its process dies, so a record left by a
killed run is recognised as stale and taken over with a warning saying what was found. Where a dead holder's flock
lingers (NFS after a client crash) and the record names this host and a process that is gone, the lock file is
replaced. On object stores (`gs://...`, or `method="record"` for filesystems without flock, e.g. gcsfuse) there is no
lock primitive: the owner record alone marks the workdir, and `check()` (call it before each save) stops a run whose
record was replaced. On network filesystems (NFS, SMB, FUSE) flock may not exclude a run on another host: a warning
says so at start.

The lock file is opened without following links and must be a regular file with one name: a `.lock` planted as a
link (symbolic or hard), directory or FIFO is refused, never truncated or written. A checkpoint directory that is a
link into another directory is locked there too, so two workdirs sharing one checkpoint directory cannot both
write it.

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
import stat
import time
import uuid

import jax
from absl import logging
from etils import epath

from uvit_jax.rundir import RunDir

# How long a run that finds the lock held waits for its holder's owner record (written right after locking).
_RECORD_WAIT_S = 5.0


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


def _stale_reason(record: dict | None) -> str | None:
    """Why the recorded holder, a process of this host, cannot be running any more; None if it may be."""
    if not record or record.get("host") != socket.gethostname():
        return None
    if record.get("boot_id") and _boot_id() and record["boot_id"] != _boot_id():
        return "this host has rebooted since"
    pid = record.get("pid")
    if not isinstance(pid, int):
        return "the record names no pid"
    if not _pid_alive(pid):
        return f"pid {pid} no longer exists"
    start, now = record.get("pid_start"), _process_start(pid)
    if start is not None and now not in (None, start):
        return (f"pid {pid} is alive but is another process (it started at clock tick {now} since boot, the "
                f"recorded one at {start}): the pid was reused")
    return None


# Filesystems where flock may be local to one client (or not implemented): a lock there is not trusted silently.
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs", "beegfs")
_MOUNTS = "/proc/mounts"


def _filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding `path` (Linux /proc/mounts: the longest mount point above it)."""
    path = os.path.realpath(path)
    try:
        with open(_MOUNTS) as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    best, fstype = "", None
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fstype = point, kind
    return fstype


def _open_lock_file(path: str) -> int:
    """Open (or create) the lock file for reading and writing, refusing anything a planted file could turn into a
    write elsewhere: a symbolic link is not followed, and only a regular file with a single name is accepted."""
    what = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        what = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory"}.get(e.errno, "not a regular file")
    else:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        elif st.st_nlink > 1:
            what = f"a hard link ({st.st_nlink} names)"
        if what:
            os.close(fd)
    if what:
        raise WorkdirLockedError(f"lock file {path} is {what}, which a run never creates: remove it (check what "
                                 "put it there) and start again")
    return fd


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
        self._fds: dict[str, int] = {}  # flock: lock file path -> its open, locked descriptor
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

    def _locked_error(self, record: dict | None, path: str | None = None) -> WorkdirLockedError:
        if path is not None and path != os.fspath(self.path):
            return WorkdirLockedError(
                f"workdir {self.workdir} writes into {os.path.dirname(path)} through a link, and that directory is "
                f"in use by another run ({_describe(record)}); give this run its own directories, or, if that run is "
                f"gone, delete {path} and start again")
        return WorkdirLockedError(
            f"workdir {self.workdir} is in use by another run ({_describe(record)}); wait for it to finish or stop "
            f"it, or, if that run is gone, delete {self.path} and start again")

    def _lock_paths(self) -> list[str]:
        """The workdir's lock file, and when its checkpoint directory is a link to another directory, the lock file
        of the run directory that one is in: one writer per checkpoint directory, not per workdir path."""
        paths = [os.fspath(self.path)]
        real = os.path.realpath(RunDir(self.workdir).checkpoints)
        if os.path.isdir(real) and os.path.dirname(real) != os.path.realpath(self.workdir):
            paths.append(RunDir(os.path.dirname(real)).lock)
        return paths

    def acquire(self) -> None:
        """Take the lock or raise WorkdirLockedError naming the live holder; a stale lock is taken over."""
        if self._record is not None or self._passive:
            raise RuntimeError(f"WorkdirLock on {self.workdir} is already held by this object")
        # Asked without starting a JAX backend, so the lock may be taken before jax.distributed.initialize.
        if jax.distributed.is_initialized() and jax.process_index() != 0:
            self._passive = True
            return
        if self.method == "flock":
            os.makedirs(self.workdir, exist_ok=True)
            fstype = _filesystem_type(self.workdir)
            if fstype and (fstype in _NETWORK_FS or fstype.startswith("fuse")):
                logging.warning("workdir lock: %s is on a %s filesystem, where flock may not keep out a run on another "
                                "host: make sure only one run uses this workdir", self.workdir, fstype)
            self._record = self._new_record()
            try:
                for path in self._lock_paths():
                    self._fds[path] = self._acquire_flock(path)
            except BaseException:
                self.release()
                raise
        else:
            self._acquire_record()
        logging.info("workdir lock: %s taken by pid %d", self.path, os.getpid())

    def _holder(self, path: str) -> dict | None:
        """The record of the process holding `path`'s flock: it writes it right after locking, so wait briefly for
        a complete one rather than report an unknown holder."""
        deadline = time.monotonic() + _RECORD_WAIT_S
        while True:
            record = _read_record_file(path)
            if record or time.monotonic() > deadline:
                return record
            time.sleep(0.02)

    def _acquire_flock(self, path: str) -> int:
        for attempt in range(3):
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                record = self._holder(path)
                reason = _stale_reason(record)
                if attempt == 0 and reason:
                    # A dead holder's flock lingers (NFS): replace the file, whose inode that lock is on.
                    logging.warning("workdir lock: replacing %s, held by %s: %s", path, _describe(record), reason)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                raise self._locked_error(record, path) from None
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
                logging.warning("workdir lock: taking over the stale lock %s of %s: %s", path, _describe(previous),
                                _stale_reason(previous) or "no process holds its flock any more")
            data = json.dumps(self._record).encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
            return fd
        raise self._locked_error(_read_record_file(path), path)

    def _acquire_record(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            record = _parse(self.path.read_text())
            reason = _stale_reason(record)
            if not reason:
                raise self._locked_error(record)
            logging.warning("workdir lock: taking over the stale lock %s of %s: %s", self.path, _describe(record),
                            reason)
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
        for path, ours, record in self._ownership():
            if not ours:
                now = f"now held by {_describe(record)}" if record or os.path.lexists(path) else "the file is gone"
                raise WorkdirLockedError(
                    f"workdir {self.workdir}: this run's lock {path} was removed or taken over ({now}); stopping so "
                    "that two runs do not write the same checkpoints")

    def _ownership(self):
        if self.method == "record":
            record = _parse(self.path.read_text()) if self.path.exists() else None
            yield self.path, bool(record) and record.get("token") == self._record["token"], record
            return
        for path, fd in self._fds.items():
            try:
                ours = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False
            yield path, ours, None if ours else _read_record_file(path)

    def release(self) -> None:
        """Drop the lock and its owner record (if still ours). Idempotent."""
        self._passive = False
        if self._record is None:
            return
        try:
            if self.method == "flock":
                for path, fd in self._fds.items():
                    try:
                        if os.stat(path).st_ino == os.fstat(fd).st_ino:
                            os.unlink(path)  # while still locked, so nobody takes a file we delete
                    except FileNotFoundError:
                        pass
                    os.close(fd)  # releases the flock
                self._fds = {}
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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_fd_record(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)
