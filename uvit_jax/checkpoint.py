"""Checkpoints: an orbax `CheckpointManager` wrapper that saves a run's train state and trusts nothing it reads back.

Layout of a run's checkpoint directory (normally `workdir/checkpoints`):

    <directory>/<step>/state/       the whole train state pytree (orbax StandardSave: step, params, EMA, optimizer)
    <directory>/<step>/metadata/    JSON metadata (config, data position) plus the checksum record of the state
    <directory>/<step>.corrupt-<n>  an unusable step, set aside (never deleted) by `restore_latest`
    <directory>/<step>.orbax-checkpoint-tmp*   an interrupted save; removed when the next writer starts

Restores go onto the shardings of an abstract tree built for the *current* mesh, so a run can resume on another
device count or parameter layout. Typed PRNG keys cannot be checkpointed: keep them out of the state (derive keys
with `fold_in(seed, step)`).

Integrity. `save` records a 64-bit checksum of every leaf in the metadata (`metadata["checksums"]`), and refuses a
state with a non-finite float. Restores recompute the checksums on the restored arrays and require every float leaf
to be finite; a step that fails (or cannot be read at all) is set aside and the previous step is used. The checksum
is computed *on device*, by one jitted pass: each 32-bit word of a leaf is mixed with its flat index and the mixed
words are summed modulo 2^32 (two independent lanes). Integer sums do not depend on the reduction order, so the
value is the same for any sharding or device count (a state saved on 8 devices is checked after a restore onto 4),
every process of a multi-host run gets the same replicated scalars without gathering or copying the state to the
host a second time, and it checks end to end: what the devices held when saving is what they hold after restoring.

Failures. A background save that fails is reported by `check_health()` (non-blocking; call it every step) and by
`wait()` / `close()` (bounded) as a `CheckpointSaveError`: one line with the path and the cause (permission denied,
disk full, quota exceeded, read-only filesystem, or other). `exit_after_save_failure` then ends the process even if
orbax threads are stuck. Only the training loop constructs a `Checkpointer` (the one writer of a workdir, see
`workdir_lock`); readers use `restore_ema_params`, which creates nothing on disk (converted official params dirs are
`uvit_jax.convert`'s).

Multi-host: every process calls `save` / `restore_latest` at the same steps (the checksum pass is one jitted
computation over the global arrays). Process 0 alone decides whether a step exists on disk (broadcast to the others),
renames unusable steps and removes interrupted saves; on object stores orbax writes in place behind a commit marker,
so there are no temporary directories to remove.
"""
from __future__ import annotations

import errno
import functools
import json
import logging as pylogging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uvit_jax import preemption

_STATE = "state"
_METADATA = "metadata"
_CHECKSUMS = "checksums"  # reserved metadata key: the checksum record written by `save`
_CHECKSUM_ALGORITHM = "fmix32-index-sum-2x32"
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step still being written
# How long wait()/close() let a pending save run before calling the filesystem stuck.
SAVE_TIMEOUT_S = 1800.0


class CheckpointMismatchError(ValueError):
    """The saved tree differs from the requested one (paths or shapes): a caller error, not a corrupt checkpoint."""


class CheckpointCorruptError(RuntimeError):
    """No checkpoint step is usable (each is unreadable, fails its checksums or holds non-finite values)."""


class NoCheckpointError(FileNotFoundError):
    """The checkpoint directory or its steps do not exist."""


class NoSuchStepError(NoCheckpointError):
    """The step asked for is not among the saved ones (the message lists them)."""


class NonFiniteStateError(ValueError):
    """`save` was given a state with NaN or infinite floats; nothing was written."""


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
      save_interval_steps: `should_save` is true at multiples of this (and at a preemption).
      max_to_keep: the newest this many checkpoints are kept; older ones are deleted by orbax.
      async_save: write in a background thread after a blocking device -> host copy.
    """

    def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int, max_to_keep: int = 3,
                 async_save: bool = True):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = _as_path(directory)
        self._interval = int(save_interval_steps)
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

    def should_save(self, step: int) -> bool:
        """Whether `step` is a save step: a multiple of the interval, or a preemption (JAX's sync point under
        jax.distributed, the SIGTERM flag otherwise). Cheap; under jax.distributed call it at every step on every
        host, since the sync point needs all hosts' steps."""
        return int(step) % self._interval == 0 or preemption.should_stop(int(step))

    def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and JSON `metadata` at `step`; returns whether a save was started.

        Without `force`, only steps where `should_save(step)` holds are saved. A step that exists on disk is never
        overwritten (returns False). A checksum record of every leaf is added to the saved metadata (under
        "checksums"; `restore_latest` returns the metadata without it). Raises NonFiniteStateError (nothing
        written) for NaN/inf floats, and CheckpointSaveError when this or a previous save failed. The write
        finishes in the background when async: call `check_health()` each step and `close()` at the end.
        """
        step = int(step)
        if self._closed:
            raise RuntimeError(f"checkpoint: save of step {step} after close() ({self.directory})")
        if not force and not self.should_save(step):
            return False
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
        record = _checksum_record(state, f"state of step {step}")
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

    def __exit__(self, *exc) -> None:
        self.close()

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
        unusable when its files cannot be read, its checksums differ from the saved record, or a restored float is
        not finite. Once an older step restores, each unusable newer step directory is renamed to
        `<step>.corrupt-<n>` (kept, never deleted; the resumed run can save that step number again), with one
        warning line. Returns None when there is no checkpoint. Raises CheckpointMismatchError when the saved tree
        paths or shapes differ from `abstract_state` (a changed config, not corruption; dtypes are cast), and
        CheckpointCorruptError when no step is usable; neither moves anything.
        """
        check_abstract(abstract_state, "abstract_state")
        self.wait()  # an in-flight async save is not corrupt: let it land first
        self._manager.reload()
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            start = time.perf_counter()
            state_dir = self.directory / str(step) / _STATE
            saved, error = None, None
            try:
                saved = _saved_tree(state_dir)
            except Exception as e:  # noqa: BLE001 - unreadable tree metadata: this step is unusable
                error = _cause(e)
            if (error := _agreed(error)) is not None:
                failed.append((step, error))
                continue
            # A shape / tree mismatch is the caller's problem (changed config), not a corrupt checkpoint: no fallback.
            check_compatible(saved, abstract_state, f"checkpoint step {step} in {self.directory}")
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    _STATE: ocp.args.StandardRestore(abstract_state), _METADATA: ocp.args.JsonRestore()}))
                metadata = dict(restored[_METADATA])
            except Exception as e:  # noqa: BLE001 - missing or garbled files: try an older step
                error = _cause(e)
            if (error := _agreed(error)) is None:
                try:  # one computation over the global arrays: every process reaches the same verdict
                    _verify(restored[_STATE], metadata.pop(_CHECKSUMS, None), "")
                except _IntegrityError as e:
                    error = str(e)
            if error is not None:
                failed.append((step, error))
                continue
            if failed:
                self._set_aside(failed, step)
            logging.info("checkpoint: restored step %d from %s in %.3f s", step, self.directory,
                         time.perf_counter() - start)
            return restored[_STATE], metadata, step
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
    steps = sorted(ocp.path.step.checkpoint_steps(directory))
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {directory}")
    if step is not None and int(step) not in steps:
        raise NoSuchStepError(f"no checkpoint for step {step} in {directory}; saved steps: "
                              f"{', '.join(map(str, steps))}")
    errors = []
    for s in ([int(step)] if step is not None else reversed(steps)):
        start = time.perf_counter()
        try:
            params = _restore_subtree(directory / str(s) / _STATE, "ema_params", abstract_params)
            metadata = ocp.JsonCheckpointHandler().restore(directory / str(s) / _METADATA)
            _verify(params, metadata.get(_CHECKSUMS) if isinstance(metadata, Mapping) else None, "ema_params/")
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - unusable step: try an older one
            if step is not None:
                raise CheckpointCorruptError(f"the EMA params of checkpoint step {s} in {directory} are unusable: "
                                             f"{_cause(e)}") from e
            logging.warning("checkpoint: the EMA params of step %d in %s are unusable (%s); trying the previous step",
                            s, directory, _cause(e))
            errors.append(f"step {s}: {_cause(e)}")
            continue
        logging.info("checkpoint: restored the EMA params of step %d from %s in %.3f s", s, directory,
                     time.perf_counter() - start)
        return params, s
    raise CheckpointCorruptError(f"no checkpoint in {directory} has usable EMA params: {'; '.join(errors)}")


def config_differences(saved: Mapping, current: Any,
                       keys: Sequence[str] = ("nnet", "dataset.name", "dataset.image_size", "schedule", "pred")
                       ) -> list[str]:
    """Differences between a checkpoint's saved config (`metadata["config"]`) and the current one, at `keys`.

    Dotted keys name nested entries; a key whose values are dicts is compared entry by entry. Returns lines like
    "nnet.depth: checkpoint 12, now 16" (empty when they agree). Values are compared after a JSON round trip, so a
    tuple in the current config equals the list it was saved as.
    """
    missing = "<missing>"

    def plain(tree):
        tree = tree.to_dict() if hasattr(tree, "to_dict") else tree
        return json.loads(json.dumps(tree, default=str))

    def get(tree, key):
        for part in key.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return missing
            tree = tree[part]
        return tree

    def compare(a, b, key, out):
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(a.keys() | b.keys()):
                compare(a.get(sub, missing), b.get(sub, missing), f"{key}.{sub}", out)
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")

    saved, current = plain(saved), plain(current)
    out: list[str] = []
    for key in keys:
        compare(get(saved, key), get(current, key), key, out)
    return out


# ------------------------------------------------------------------------------------------- failure handling


_ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))  # .../site-packages/orbax


class _OrbaxConsoleFilter(pylogging.Filter):
    """Drops orbax's records below WARNING and cuts the others to their first line (no traceback): a failed save is
    reported once, by CheckpointSaveError."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if not record.pathname.startswith(_ORBAX_DIR):
            return True
        if record.levelno < pylogging.WARNING:
            return False
        record.msg, record.args = record.getMessage().split("\n", 1)[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


_quiet_installed = False


def quiet_orbax_logging() -> None:
    """Keep orbax's chatter off the console: its per-save INFO lines go, its warnings and errors lose their
    tracebacks, and the errors of its orphaned coroutines ("Event loop is closed" at shutdown, the other shards'
    read errors of a corrupt checkpoint) are not printed.
    Call once at start-up; idempotent."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    # orbax logs through absl's logger (its records carry orbax's file names); a plain "orbax" logger may exist too.
    for name in ("absl", "orbax"):
        pylogging.getLogger(name).addFilter(_OrbaxConsoleFilter())
    pylogging.getLogger("orbax").setLevel(pylogging.WARNING)
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine that died with an error nobody awaited
        if ((isinstance(value, RuntimeError) and "Event loop is closed" in str(value))
                or (code is not None and code.co_filename.startswith(_ORBAX_DIR))):
            return  # orbax's background reads and writes failing after their caller got the error
        previous(unraisable)

    sys.unraisablehook = hook


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


# ------------------------------------------------------------------------------------------------------ checksums


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte dtypes gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
    if unsigned is None or jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"cannot checksum an array of dtype {x.dtype}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest_leaves(leaves: list) -> tuple[jax.Array, jax.Array]:
    """(uint32 [n, 2] checksums, bool [n] all-finite) of n arrays; sharding-independent (see the module docstring)."""
    sums, finite = [], []
    for x in leaves:
        w = _words(x)
        index = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(w.ndim)):  # the flat index, built per axis so that no axis is gathered
            index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride % 2 ** 32)
            stride *= w.shape[axis]
        lanes = [jnp.sum(_fmix32(w ^ _fmix32(index * np.uint32(0x9E3779B9) + np.uint32(seed))), dtype=jnp.uint32)
                 for seed in (0x243F6A88, 0x85A308D3)]
        sums.append(jnp.stack(lanes))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True))
    return jnp.stack(sums), jnp.stack(finite)


@functools.lru_cache(maxsize=8)
def _digest_fn(mesh: Mesh | None):
    # Replicated outputs, so that every process of a multi-host run can read them.
    out = None if mesh is None else NamedSharding(mesh, P())
    return jax.jit(_digest_leaves, out_shardings=out)


def _digest(tree: Any) -> list[tuple[str, Any, str, bool]]:
    """(path, leaf, checksum hex, all finite) for every leaf of `tree`, one jitted pass per mesh."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        sharding = x.sharding
        key = sharding.mesh if isinstance(sharding, NamedSharding) else frozenset(sharding.device_set)
        groups.setdefault(key, []).append(i)
    sums, finite = np.zeros((len(leaves), 2), np.uint32), np.ones(len(leaves), bool)
    for key, members in groups.items():
        s, f = _digest_fn(key if isinstance(key, Mesh) else None)([leaves[i] for i in members])
        sums[members], finite[members] = np.asarray(s), np.asarray(f)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), x, f"{a:08x}{b:08x}", bool(ok))
            for (path, _), x, (a, b), ok in zip(flat, leaves, sums, finite)]


def _checksum_record(state: Any, where: str) -> dict:
    """The checksum record saved with a state; raises NonFiniteStateError if a float leaf is not finite."""
    digest = _digest(state)
    bad = [path for path, _, _, ok in digest if not ok]
    if bad:
        raise NonFiniteStateError(f"refusing to save the {where}: non-finite values in {', '.join(bad[:5])}"
                                  + (f" ({len(bad)} leaves in all)" if len(bad) > 5 else ""))
    return {"algorithm": _CHECKSUM_ALGORITHM,
            "leaves": {path: {"dtype": str(x.dtype), "shape": list(x.shape), "sum": s} for path, x, s, _ in digest}}


class _IntegrityError(ValueError):
    """Restored values differ from the saved checksums, or are not finite."""


def _verify(tree: Any, record: Any, prefix: str) -> None:
    """Check restored arrays against the saved checksum record (leaf paths under `prefix`) and for finiteness.

    Leaves restored to another dtype than saved (orbax casts) are not compared. A checkpoint without a record (saved
    before checksums existed) is only checked for finiteness.
    """
    known = record.get("leaves", {}) if isinstance(record, dict) and record.get("algorithm") == _CHECKSUM_ALGORITHM \
        else {}
    problems = []
    for path, x, s, ok in _digest(tree):
        saved = known.get(prefix + path)
        if (isinstance(saved, dict) and saved.get("dtype") == str(x.dtype)
                and tuple(saved.get("shape", ())) == tuple(x.shape) and saved.get("sum") != s):
            problems.append(f"{prefix}{path}: checksum mismatch")
        if not ok:
            problems.append(f"{prefix}{path}: non-finite values")
    if problems:
        raise _IntegrityError("; ".join(problems[:4]) + (f" ({len(problems)} problems in all)"
                                                         if len(problems) > 4 else ""))


# ------------------------------------------------------------------------------------------------------ helpers


def _as_path(directory: str | os.PathLike) -> epath.Path:
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _agreed(error: str | None) -> str | None:
    """A read error on any process makes the step unusable on all of them (each process reads its own shards)."""
    if jax.process_count() == 1:
        return error
    failed_anywhere = bool(np.any(multihost_utils.process_allgather(np.asarray(error is not None))))
    return error if error is not None or not failed_anywhere else "unreadable on another process"


def _cause(e: BaseException) -> str:
    return str(e) if isinstance(e, _IntegrityError) else f"{type(e).__name__}: {short_error(e)}"



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
