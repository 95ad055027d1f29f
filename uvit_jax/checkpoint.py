"""Checkpoints: an orbax `CheckpointManager` wrapper that saves a run's train state and trusts nothing it reads back.

Layout of a run's checkpoint directory (normally `workdir/checkpoints`):

    <directory>/<step>/state/       the whole train state pytree (orbax StandardSave: step, params, EMA, optimizer)
    <directory>/<step>/metadata/    JSON metadata (config, data position) plus the checksum record of the state
    <directory>/<step>.corrupt-<n>  an unusable step, set aside (never deleted) by `restore_latest`
    <directory>/<step>.orbax-checkpoint-tmp*   an interrupted save; removed when the next writer starts

Restores go onto the shardings of an abstract tree built for the *current* mesh, so a run can resume on another
device count or parameter layout. Typed PRNG keys cannot be checkpointed: keep them out of the state (derive keys
with `fold_in(seed, step)`).

Integrity. `save` records the step and a 64-bit checksum of every leaf in the metadata (`metadata["checksums"]`,
see `integrity`), and refuses a state with a non-finite float. A restore first checks that the step is what it says
it is (the recorded step equals its directory name, and the directory is not a link into another run): otherwise it
stops, in one line. It then recomputes the checksums on the restored arrays and requires every float leaf to be
finite. A step is set aside, and the previous step used, only on evidence of corruption: a checksum mismatch,
non-finite values, or files that cannot be decoded or are missing (`_corruption`). Any other error (a transient
storage error, an out-of-memory, a bug) stops the restore with that error and leaves the step where it is.

Failures. A background save that fails is reported by `check_health()` (non-blocking; call it every step) and by
`wait()` / `close()` (bounded) as a `CheckpointSaveError`: one line with the path and the cause (permission denied,
disk full, quota exceeded, read-only filesystem, or other). `exit_after_save_failure` then ends the process even if
orbax threads are stuck. Only the training loop constructs a `Checkpointer` (the one writer of a workdir, see
`workdir_lock`), as a context manager, so that it is closed on every way out; readers use `restore_ema_params`,
which creates nothing on disk (converted official params dirs are `uvit_jax.convert`'s).

Multi-host: every process calls `save` / `restore_latest` at the same steps (the checksum pass is one jitted
computation over the global arrays). Process 0 alone decides whether a step exists on disk (broadcast to the others),
renames unusable steps and removes interrupted saves; on object stores orbax writes in place behind a commit marker,
so there are no temporary directories to remove.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from uvit_jax import integrity

_STATE = "state"
_METADATA = "metadata"
_CHECKSUMS = "checksums"  # reserved metadata key: the checksum record written by `save`
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step still being written
# How long wait()/close() let a pending save run before calling the filesystem stuck.
SAVE_TIMEOUT_S = 1800.0


class CheckpointMismatchError(ValueError):
    """The saved tree differs from the requested one (paths or shapes): a caller error, not a corrupt checkpoint."""


class CheckpointIdentityError(ValueError):
    """A step directory is not what its name says: it holds another step, or links into another run."""


class CheckpointCorruptError(RuntimeError):
    """No checkpoint step is usable (each is unreadable, fails its checksums or holds non-finite values)."""


class NoCheckpointError(FileNotFoundError):
    """The checkpoint directory or its steps do not exist."""


class NoSuchStepError(NoCheckpointError):
    """The step asked for is not among the saved ones (the message lists them)."""


class CheckpointSaveError(RuntimeError):
    """A save failed (possibly in the background). `str()` is one line: the step, the path and the cause."""

    def __init__(self, step: int | None, path: Any, cause: str, detail: str):
        self.step, self.path, self.cause = step, str(path), cause
        what = f"checkpoint save of step {step}" if step is not None else "checkpoint save"
        super().__init__(f"{what} to {path} failed: {cause}: {detail}")


# ----------------------------------------------------------------------------------------------- the writer


class Checkpointer:
    """Saves and restores the train state of one run (see the module docstring).

    The constructor has no side effects beyond creating `directory` and removing leftovers of interrupted saves
    (`<step>.orbax-checkpoint-tmp*`, never a finalized step): construct it only in the run that writes.

    Args:
      directory: the checkpoint directory (created if missing), usually `workdir/checkpoints`.
      max_to_keep: the newest this many checkpoints are kept; older ones are deleted by orbax.
      async_save: write in a background thread after a blocking device -> host copy.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = _as_path(directory)
        self._async = async_save
        self._remove_interrupted_saves()
        self._protected = _ProtectedStep()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [ocp.checkpoint_managers.LatestN(max_to_keep), self._protected]),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=(_STATE, _METADATA), options=options)
        self._pending: int | None = None  # a save started and not yet confirmed on disk
        self._failed = False  # a save failure was raised
        self._closed = False

    def _remove_interrupted_saves(self) -> None:
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if _TMP_MARK in path.name:
                logging.warning("checkpoint: removing %s, left by an interrupted save", path)
                if path.is_dir():
                    path.rmtree()
                else:
                    path.unlink()

    # ----------------------------------------------------------------------------------------------- saving

    def save(self, step: int, state: Any, metadata: dict) -> bool:
        """Save `state` (a pytree of arrays) and JSON `metadata` at `step`; returns whether a save was started.

        A step that exists on disk is never overwritten (returns False). The step number and a checksum record of
        every leaf are added to the saved metadata (under "checksums"; `restore_latest` returns the metadata
        without it). Raises integrity.NonFiniteStateError (nothing
        written) for NaN/inf floats, and CheckpointSaveError when this or a previous save failed. The write
        finishes in the background when async: call `check_health()` each step and `close()` at the end.
        """
        step = int(step)
        if self._closed:
            raise RuntimeError(f"checkpoint: save of step {step} after close() ({self.directory})")
        _check_no_typed_keys(state)
        if not isinstance(metadata, dict):
            raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
        if _CHECKSUMS in metadata:
            raise ValueError(f"checkpoint metadata key {_CHECKSUMS!r} is reserved for the checksum record")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
        self.wait()  # orbax would wait for the previous save anyway; this way its failure is reported as its own
        if self._step_on_disk(step):
            return False
        start = time.perf_counter()
        record = {**integrity.checksum_record(state, f"state of step {step}"), "step": step}
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _METADATA: ocp.args.JsonSave({**metadata, _CHECKSUMS: record})})
        try:
            saved = self._manager.save(step, force=True, args=args)
        except Exception as e:  # noqa: BLE001 - any failure to start the save is reported the same way
            self._failed = True
            raise _save_error(step, self.directory, e) from e
        if saved:
            self._pending = step
            logging.info("checkpoint: saving step %d to %s (%.3f s blocking)", step, self.directory,
                         time.perf_counter() - start)
            if not self._async:
                self._confirm_pending()
        return saved

    def _step_on_disk(self, step: int) -> bool:
        """Whether `<directory>/<step>` exists, read from disk (not only orbax's cache), decided on process 0."""
        if step in self._manager.all_steps():
            logging.info("checkpoint: step %d already saved in %s; not saving again", step, self.directory)
            return True
        exists = jax.process_index() == 0 and (self.directory / str(step)).exists()
        if jax.process_count() > 1:
            exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
        if exists:
            logging.warning("checkpoint: %s exists on disk but was not written by this run (another run in this "
                            "workdir?); not overwriting it", self.directory / str(step))
        return exists

    def check_health(self) -> None:
        """Raise CheckpointSaveError if a background save has failed. Non-blocking and cheap: call it every step."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._confirm_pending()

    def _confirm_pending(self) -> None:
        """The pending save has stopped: surface its error, or check that its step is on disk."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()  # nothing is in flight: returns at once, or raises its error
        except Exception as e:  # noqa: BLE001
            self._failed = True
            raise _save_error(step, self.directory, e) from e
        if step is not None and jax.process_index() == 0 and not (self.directory / str(step)).exists():
            self._failed = True
            raise CheckpointSaveError(step, self.directory, "other",
                                      f"the save ended but {self.directory / str(step)} does not exist")

    def wait(self, timeout_s: float = SAVE_TIMEOUT_S) -> None:
        """Block until the pending save is written; raises CheckpointSaveError if it failed or is still running
        after `timeout_s` (a stuck filesystem)."""
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while self._manager.is_saving_in_progress():
            if time.monotonic() > deadline:
                raise CheckpointSaveError(self._pending, self.directory, "timed out",
                                          f"still writing after {timeout_s:.0f} s (is the filesystem stuck?)")
            time.sleep(delay)
            delay = min(2 * delay, 0.02)
        if self._pending is not None:
            self._confirm_pending()

    def close(self, timeout_s: float = SAVE_TIMEOUT_S) -> None:
        """Wait (bounded) for the pending save and close the manager. Idempotent.

        Raises CheckpointSaveError if the pending save failed or timed out (a failure already raised by
        `check_health` / `wait` / `save` is not raised again). After a timeout orbax's threads are left alone:
        joining them would block.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait(timeout_s)
        except CheckpointSaveError as e:
            if e.cause != "timed out":
                self._close_manager()
            raise
        self._close_manager()

    def _close_manager(self) -> None:
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001 - orbax raises a failed save again here; report it only once
            if not self._failed:
                raise _save_error(None, self.directory, e) from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # the error in flight is the one to report; a save failure found while closing goes to the log
            self.close()
        except CheckpointSaveError as e:
            logging.error("%s", e)

    def protect_step(self, step: int | None) -> None:
        """Keep `step` whatever `max_to_keep` says (e.g. the best FID so far); protecting another step, or None,
        releases the previous one to the normal policy."""
        self._protected.step = None if step is None else int(step)

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    # ---------------------------------------------------------------------------------------------- restoring

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """Restore the newest usable checkpoint onto `abstract_state`; returns (state, metadata, step) or None.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` carrying the current mesh's shardings. A step is
        unusable on evidence of corruption only (see the module docstring). Once an older step restores, each
        unusable newer step directory is renamed to `<step>.corrupt-<n>` (kept, never deleted; the resumed run can
        save that step number again), with one warning line. Returns None when there is no checkpoint. Raises
        CheckpointIdentityError for a step that is not what its name says, CheckpointMismatchError when the saved
        tree paths or shapes differ from `abstract_state` (a changed config, not corruption; dtypes are cast),
        CheckpointCorruptError when no step is usable, and any other restore error as it is; none moves anything.
        """
        check_abstract(abstract_state, "abstract_state")
        self.wait()  # an in-flight async save is not corrupt: let it land first
        self._manager.reload()
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            start = time.perf_counter()
            step_dir = self.directory / str(step)
            _check_is_own_step(self.directory, step)
            where = f"checkpoint step {step} in {self.directory}"
            read, error = _attempt(lambda: (_read_metadata(step_dir), _saved_tree(step_dir / _STATE)), where)
            if error is not None:
                failed.append((step, error))
                continue
            _check_step_number(read[0], step_dir, step)
            # A shape / tree mismatch is the caller's problem (changed config), not a corrupt checkpoint: no fallback.
            check_compatible(read[1], abstract_state, where)

            def restore_and_verify():
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    _STATE: ocp.args.StandardRestore(abstract_state), _METADATA: ocp.args.JsonRestore()}))
                metadata = dict(restored[_METADATA])
                # one computation over the global arrays: every process reaches the same verdict
                integrity.verify(restored[_STATE], metadata.pop(_CHECKSUMS, None), "")
                return restored[_STATE], metadata

            restored, error = _attempt(restore_and_verify, where)
            if error is not None:
                failed.append((step, error))
                continue
            if failed:
                self._set_aside(failed, step)
            logging.info("checkpoint: restored step %d from %s in %.3f s", step, self.directory,
                         time.perf_counter() - start)
            return restored[0], restored[1], step
        if not failed:
            return None
        details = "; ".join(f"step {s}: {c}" for s, c in failed)
        raise CheckpointCorruptError(f"no checkpoint in {self.directory} is usable (nothing was moved): {details}")

    def _set_aside(self, failed: list[tuple[int, str]], restored_step: int) -> None:
        """Rename unusable step dirs to `<step>.corrupt-<n>`, which orbax ignores; the data stays on disk."""
        moved = []
        if jax.process_index() == 0:
            for step, _ in failed:
                n = 0
                while (self.directory / f"{step}.corrupt-{n}").exists():
                    n += 1
                (self.directory / str(step)).rename(self.directory / f"{step}.corrupt-{n}")
                moved.append(f"{step}.corrupt-{n}")
            logging.warning("checkpoint: %s in %s unusable (%s); set aside as %s (kept, not deleted); resuming from "
                            "step %d", ", ".join(f"step {s}" for s, _ in failed), self.directory,
                            "; ".join(f"step {s}: {c}" for s, c in failed), ", ".join(moved), restored_step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("uvit_checkpoint_set_aside")
        self._manager.reload()


class _ProtectedStep:
    """An orbax preservation policy keeping one chosen step (mutable, unlike orbax's CustomSteps)."""

    def __init__(self):
        self.step: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        return [info.step == self.step for info in checkpoints]


# ----------------------------------------------------------------------------------------------- the readers


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The finalized steps of a checkpoint directory, oldest first ([] when it does not exist). Reads only."""
    directory = _as_path(directory)
    return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.is_dir() else []


def restore_ema_params(directory: str | os.PathLike, abstract_params: Any, *,
                       step: int | None = None) -> tuple[Any, int]:
    """Read only the EMA params (`state["ema_params"]`) of a checkpoint directory; returns (params, step).

    Read-only: creates, moves and deletes nothing. `abstract_params` is a pytree of `jax.ShapeDtypeStruct` with
    shardings. `step=None` takes the newest usable step (an unusable one is skipped with a warning, and left where
    it is); an explicit step must exist and be usable. The EMA params are checked against the saved checksums and
    for finiteness, as in `Checkpointer.restore_latest`. Raises NoCheckpointError when the directory or the step
    does not exist, CheckpointMismatchError when names or shapes differ, CheckpointCorruptError when unusable.
    """
    check_abstract(abstract_params, "abstract_params")
    directory = _as_path(directory)
    if not directory.is_dir():
        raise NoCheckpointError(f"no checkpoint directory {directory}")
    steps = saved_steps(directory)
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {directory}")
    if step is not None and int(step) not in steps:
        raise NoSuchStepError(f"no checkpoint for step {step} in {directory}; saved steps: "
                              f"{', '.join(map(str, steps))}")
    errors = []
    for s in ([int(step)] if step is not None else reversed(steps)):
        start = time.perf_counter()
        step_dir = directory / str(s)
        _check_is_own_step(directory, s)

        def read():
            metadata = _read_metadata(step_dir)
            _check_step_number(metadata, step_dir, s)
            params = _restore_subtree(step_dir / _STATE, "ema_params", abstract_params)
            integrity.verify(params, metadata.get(_CHECKSUMS), "ema_params/")
            return params

        params, error = _attempt(read, f"the EMA params of checkpoint step {s} in {directory}")
        if error is not None:
            if step is not None:
                raise CheckpointCorruptError(f"the EMA params of checkpoint step {s} in {directory} are unusable: "
                                             f"{error}")
            logging.warning("checkpoint: the EMA params of step %d in %s are unusable (%s); trying the previous step",
                            s, directory, error)
            errors.append(f"step {s}: {error}")
            continue
        logging.info("checkpoint: restored the EMA params of step %d from %s in %.3f s", s, directory,
                     time.perf_counter() - start)
        return params, s
    raise CheckpointCorruptError(f"no checkpoint in {directory} has usable EMA params: {'; '.join(errors)}")


def exit_after_save_failure(error: BaseException, checkpointer: Checkpointer | None = None, *,
                            close_timeout_s: float = 5.0) -> NoReturn:
    """Log `error` (one line), give `checkpointer` `close_timeout_s` to close in a daemon thread, then end the
    process with exit code 1 at once (`os._exit`), even if orbax's threads are stuck in a dead filesystem."""
    logging.error("%s", str(error).replace("\n", " "))
    if checkpointer is not None:
        def close_quietly():
            try:
                checkpointer.close(timeout_s=close_timeout_s)
            except Exception:  # noqa: BLE001 - the failure is already reported; only a clean close matters here
                pass
        closer = threading.Thread(target=close_quietly, name="checkpoint-close", daemon=True)
        closer.start()
        closer.join(close_timeout_s)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
            pass
    os._exit(1)


_ERRNO_CAUSES = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.ENOSPC: "disk full (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
                 errno.EROFS: "read-only filesystem (EROFS)"}
# The same causes as reported in the text of tensorstore / cloud-storage errors, which carry no errno.
_TEXT_CAUSES = (("no space left on device", "disk full (ENOSPC)"),
                ("disk quota exceeded", "disk quota exceeded (EDQUOT)"),
                ("read-only file system", "read-only filesystem (EROFS)"),
                ("permission denied", "permission denied"), ("permission_denied", "permission denied"),
                ("access denied", "permission denied"), ("403 forbidden", "permission denied"))


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, its causes and contexts, and the members of exception groups, each once."""
    seen, todo, out = set(), [error], []
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return out


def _save_error(step: int | None, directory: epath.Path, error: BaseException) -> CheckpointSaveError:
    """Classify a save failure: permission denied, disk full, quota exceeded, read-only filesystem, or other."""
    if isinstance(error, CheckpointSaveError):
        return error
    chain = _chain(error)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _ERRNO_CAUSES:
            return CheckpointSaveError(step, directory, _ERRNO_CAUSES[e.errno], short_error(e))
    for e in chain:
        text = str(e).lower()
        for needle, cause in _TEXT_CAUSES:
            if needle in text:
                return CheckpointSaveError(step, directory, cause, short_error(e))
    innermost = next((e for e in reversed(chain) if isinstance(e, OSError)), chain[-1])
    return CheckpointSaveError(step, directory, "other", f"{type(innermost).__name__}: {short_error(innermost)}")


# ------------------------------------------------------------------------------------------------------ helpers


def _as_path(directory: str | os.PathLike) -> epath.Path:
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


# Evidence that a step's files are damaged: what orbax / tensorstore / json raise for bytes that do not decode or
# files that are missing. Checked after _TRANSIENT, which wins.
_CORRUPT_TYPES = (integrity.IntegrityError, json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError,
                  NotADirectoryError, IsADirectoryError)
_CORRUPT_TEXT = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "decompress", "Truncated",
                 "checksum mismatch", "non-finite values")
# Not evidence: a storage or memory problem that says nothing about the bytes on disk (tensorstore status codes).
_TRANSIENT_TEXT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED",
                   "PERMISSION_DENIED", "UNAUTHENTICATED", "Out of memory")


def _corruption(error: BaseException) -> str | None:
    """The cause, if `error` (raised while reading a step) is evidence that the step is corrupt; else None."""
    chain = _chain(error)
    for e in chain:
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and not isinstance(e, _CORRUPT_TYPES)):
            return None  # EIO, EACCES, a stale NFS handle, ...: the bytes may be fine
        if any(t in str(e) for t in _TRANSIENT_TEXT):
            return None
    for e in chain:
        if isinstance(e, _CORRUPT_TYPES) or any(t in str(e) for t in _CORRUPT_TEXT):
            return str(e) if isinstance(e, integrity.IntegrityError) else f"{type(e).__name__}: {short_error(e)}"
    return None


def _attempt(read, where: str) -> tuple[Any, str | None]:
    """(read(), None), or (None, cause) when reading failed on evidence of corruption, agreed by every process (each
    reads its own shards). Any other error is raised as it is, on every process, and moves nothing."""
    value, cause, other = None, None, None
    try:
        value = read()
    except (CheckpointIdentityError, CheckpointMismatchError):
        raise
    except Exception as e:  # noqa: BLE001 - classified below
        cause = _corruption(e)
        if cause is None:
            other = e
    if jax.process_count() > 1:
        code = 2 if other is not None else int(cause is not None)
        worst = int(np.max(multihost_utils.process_allgather(np.asarray(code))))
        if other is None and worst == 2:
            raise RuntimeError(f"reading {where} failed on another process (see its log); nothing was moved")
        if cause is None and worst == 1:
            cause = "unreadable on another process"
    if other is not None:
        other.add_note(f"while reading {where}: this error is not evidence of a corrupt checkpoint, so the step was "
                       "left in place; fix the cause and run again")
        raise other
    return value, cause


def _read_metadata(step_dir: epath.Path) -> dict:
    metadata = ocp.JsonCheckpointHandler().restore(step_dir / _METADATA)
    if not isinstance(metadata, Mapping):
        raise json.JSONDecodeError(f"expected a JSON object, got {type(metadata).__name__}", "", 0)
    return dict(metadata)


def _check_is_own_step(directory: epath.Path, step: int) -> None:
    """A step directory (or its state / metadata) that links elsewhere belongs to another run: refuse it."""
    if "://" in str(directory):
        return  # object stores have no links
    step_dir = os.path.join(directory, str(step))
    for path in (step_dir, os.path.join(step_dir, _STATE), os.path.join(step_dir, _METADATA)):
        if os.path.islink(path):
            raise CheckpointIdentityError(
                f"{path} is a link to {os.path.realpath(path)}: a run restores only the steps it wrote. Copy that "
                f"step into {directory} (cp -rL) or remove the link")


def _check_step_number(metadata: dict, step_dir: epath.Path, step: int) -> None:
    """The step recorded at save time must be the directory's name (a renamed step would resume at a wrong step)."""
    record = metadata.get(_CHECKSUMS)
    saved = record.get("step") if isinstance(record, Mapping) and "step" in record else metadata.get("step")
    if saved is not None and int(saved) != step:
        raise CheckpointIdentityError(
            f"{step_dir} holds step {saved}, not {step} (was it renamed?): move it back to "
            f"{step_dir.parent / str(saved)}, or out of {step_dir.parent}")


def _restore_subtree(state_dir: epath.Path, item: str, abstract: Any) -> Any:
    """Partial restore of `state[item]` from a saved state dir; other subtrees are skipped, not read."""
    saved = _saved_tree(state_dir)
    if item not in saved:
        raise CheckpointMismatchError(f"checkpoint {state_dir} has no subtree {item!r}; it has {sorted(saved)}")
    check_compatible(saved[item], abstract, f"{item!r} of checkpoint {state_dir}")
    target = {item: abstract}
    handler = ocp.PyTreeCheckpointHandler()
    try:
        restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    finally:
        handler.close()
    return restored[item]


def _saved_tree(state_dir: epath.Path) -> Any:
    """The saved pytree's structure with per-leaf metadata (shape, dtype); reads only the small metadata file."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(state_dir).tree
    finally:
        handler.close()


def check_compatible(saved: Any, abstract: Any, where: str) -> None:
    """Raise CheckpointMismatchError naming the leaves whose paths or shapes differ (orbax casts dtypes)."""
    have = ocp.tree.to_flat_dict(saved, sep="/")
    # keep_empty_nodes: optax states hold empty tuples between leaves (e.g. adamw with a schedule)
    want = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True), sep="/")
    problems = [f"{k}: missing from the checkpoint" for k in sorted(want.keys() - have.keys())]
    problems += [f"{k}: in the checkpoint but not in the target" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k}: checkpoint shape {tuple(have[k].shape)} != target {tuple(want[k].shape)}"
                 for k in sorted(want.keys() & have.keys()) if tuple(have[k].shape) != tuple(want[k].shape)]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise CheckpointMismatchError(f"{where} does not match the target tree (did the model or optimizer config "
                                      f"change?): {shown}")


def _check_no_typed_keys(tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(f"state{jax.tree_util.keystr(path)} is a typed PRNG key array ({dtype}), which orbax "
                            "cannot checkpoint; keep keys out of the state (derive them with fold_in(seed, step)) "
                            "or store jax.random.key_data(key)")


def check_abstract(tree: Any, name: str) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{name} is empty")
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or getattr(leaf, "sharding", None) is None:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct with a sharding on "
                             f"the current mesh (needed to restore onto another topology), got {leaf!r}")


def short_error(e: BaseException, limit: int = 300) -> str:
    text = str(e).split(" See full TensorStore details", 1)[0].replace("\n", " ")  # the rest is a spec dump
    return text if len(text) <= limit else text[:limit] + "..."
