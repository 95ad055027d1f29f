"""Checkpoints: an orbax `CheckpointManager` wrapper, corrupt-checkpoint fallback, preemption, partial restore.

Layout of a run's checkpoint directory (normally `workdir/checkpoints`):

    <directory>/<step>/state/      the whole train state pytree (orbax StandardSave: step, params, EMA, optimizer)
    <directory>/<step>/metadata/   JSON metadata (config, data position)
    <directory>/<step>.corrupt-<n> a step that could not be read, set aside (never deleted) by `restore_latest`

Restores always go onto the shardings of an abstract tree built for the *current* mesh, so a run can resume on another
device count or parameter layout. Typed PRNG keys cannot be checkpointed: keep them out of the state (derive keys
with `fold_in(seed, step)`).

Preemption: under `jax.distributed` JAX owns SIGTERM and `reached_preemption` asks its preemption sync point (all hosts
agree on the step). Otherwise the constructor installs a SIGTERM handler that sets a flag; poll it with
`Checkpointer.reached_preemption(step)` in the train loop and `preemption_requested()` in other long loops.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

_STATE = "state"
_METADATA = "metadata"


class CheckpointMismatchError(ValueError):
    """The saved tree differs from the requested one (paths or shapes): a caller error, not a corrupt checkpoint."""


# Set by the SIGTERM handler; stays set for the life of the process (a preempted process is expected to exit).
_SIGTERM_RECEIVED = threading.Event()


def _on_sigterm(signum, frame):
    del signum, frame
    _SIGTERM_RECEIVED.set()  # No logging here: the handler may interrupt code that holds the logging lock.


def preemption_requested() -> bool:
    """True once this process received SIGTERM (single-process runs; cheap to poll inside any loop)."""
    return _SIGTERM_RECEIVED.is_set()


def reset_preemption_request() -> None:
    """Forget a received SIGTERM: for a run restarted inside the same process (tests, notebooks)."""
    _SIGTERM_RECEIVED.clear()


@contextlib.contextmanager
def sigterm_guard():
    """Within the block a SIGTERM sets the flag `preemption_requested()` reads instead of killing the process
    (single process, main thread; under jax.distributed JAX's own handler stays in charge)."""
    install = not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)


def should_stop(step: int) -> bool:
    """Poll for preemption inside a long loop that every host runs in lockstep (e.g. sampling batch `step`)."""
    if jax.distributed.is_initialized():
        return bool(multihost_utils.reached_preemption_sync_point(step))
    return preemption_requested()


class Checkpointer:
    """Saves and restores the train state of one run (see the module docstring for the layout).

    Args:
      directory: the checkpoint directory (created if missing), usually `workdir/checkpoints`.
      save_interval_steps: `save` writes a checkpoint only at multiples of this (or when forced / preempted).
      max_to_keep: the newest this many checkpoints are kept; older ones are deleted by orbax.
      async_save: write in a background thread after a blocking device -> host copy.
    """

    def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int, max_to_keep: int = 3,
                 async_save: bool = True):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        directory = str(directory)
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Our own decision policy: orbax's default also saves the very first step of a fresh run.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_interval_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=(_STATE, _METADATA), options=options)
        self._preemption_logged = False
        self._previous_sigterm_handler = None
        self._sigterm_installed = False
        # Under jax.distributed, JAX's preemption notifier is the SIGTERM handler; replacing it would leave the
        # hosts disagreeing about when to stop. signal.signal only works in the main thread.
        if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
            self._previous_sigterm_handler = signal.signal(signal.SIGTERM, _on_sigterm)
            self._sigterm_installed = True
        self._closed = False

    # ----------------------------------------------------------------------------------------------------- saving

    def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and JSON `metadata` at `step`; returns whether a save was started.

        Without `force`, only interval steps (and the preemption sync step under jax.distributed) are saved. A step
        that already has a checkpoint is never overwritten (returns False). The write finishes in the background
        when async; call `wait()` or `close()` before exiting.
        """
        step = int(step)
        _check_no_typed_keys(state)
        if not isinstance(metadata, dict):
            raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
        if step in self._manager.all_steps():
            if force:
                logging.info("checkpoint: step %d already saved in %s; not saving again", step, self.directory)
            return False
        start = time.perf_counter()
        saved = self._manager.save(step, force=force, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}))
        if saved:
            logging.info("checkpoint: saving step %d to %s (%.3f s blocking)", step, self.directory,
                         time.perf_counter() - start)
        return saved

    def wait(self) -> None:
        """Block until pending async saves are written (raises if a background save failed)."""
        start = time.perf_counter()
        self._manager.wait_until_finished()
        logging.info("checkpoint: waited %.3f s for pending saves", time.perf_counter() - start)

    def close(self) -> None:
        """Wait for pending saves, close the manager and restore the previous SIGTERM handler. Idempotent."""
        if self._closed:
            return
        self.wait()
        self._manager.close()
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._sigterm_installed = False
        self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    # ----------------------------------------------------------------------------------------------- preemption

    def reached_preemption(self, step: int) -> bool:
        """True when the run should save and exit now: SIGTERM received, or JAX's preemption sync point reached.

        Under jax.distributed call it at every step on every host (the sync point needs all hosts' steps).
        """
        reached = _SIGTERM_RECEIVED.is_set() or self._manager.reached_preemption(int(step))
        if reached and not self._preemption_logged:
            logging.warning("checkpoint: preemption requested at step %d", int(step))
            self._preemption_logged = True
        return reached

    # -------------------------------------------------------------------------------------------------- restoring

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """Restore the newest readable checkpoint onto `abstract_state`; returns (state, metadata, step) or None.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` carrying the current mesh's shardings. A step that
        cannot be read (missing or garbled files, unreadable metadata) is skipped with a warning; once an older step
        restores, each skipped step directory is renamed to `<step>.corrupt-<n>` (kept, never deleted) so that the
        resumed run can save that step number again. Returns None when there is no checkpoint. Raises
        CheckpointMismatchError when the saved tree paths or shapes differ from `abstract_state` (a changed config,
        not corruption; dtypes are cast), and RuntimeError when no step is readable; neither moves anything.
        """
        _check_abstract(abstract_state, "abstract_state")
        self._manager.wait_until_finished()  # An in-flight async save is not corrupt: let it land first.
        failed: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            start = time.perf_counter()
            try:
                saved = _saved_tree(self.directory / str(step) / _STATE)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: this step is unusable, try older ones.
                self._warn_unreadable(step, e)
                failed.append((step, e))
                continue
            # A shape / tree mismatch is the caller's problem (changed config), not a corrupt checkpoint: no fallback.
            _check_compatible(saved, abstract_state, f"checkpoint step {step} in {self.directory}")
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    _STATE: ocp.args.StandardRestore(abstract_state), _METADATA: ocp.args.JsonRestore()}))
                metadata = restored[_METADATA]
                if not isinstance(metadata, dict):
                    raise ValueError(f"metadata is a {type(metadata).__name__}, not a dict")
            except Exception as e:  # noqa: BLE001 - missing or garbled files: try older ones.
                self._warn_unreadable(step, e)
                failed.append((step, e))
                continue
            logging.info("checkpoint: restored step %d from %s in %.3f s", step, self.directory,
                         time.perf_counter() - start)
            if failed:
                self._set_aside([s for s, _ in failed])
            return restored[_STATE], metadata, step
        if not failed:
            return None
        details = "; ".join(f"step {s}: {type(e).__name__}: {_short(e)}" for s, e in failed)
        raise RuntimeError(f"no checkpoint in {self.directory} is readable: {details}") from failed[0][1]

    def _warn_unreadable(self, step: int, error: Exception) -> None:
        logging.warning("checkpoint: step %d in %s cannot be restored (%s: %s); trying the previous one", step,
                        self.directory, type(error).__name__, _short(error))

    def restore_params(self, abstract_params: Any, *, step: int | None = None, item: str = "ema_params") -> Any:
        """Restore only the top-level subtree `item` of the saved state (e.g. EMA params for sampling).

        The optimizer state and other subtrees are not read. `abstract_params` is a pytree of
        `jax.ShapeDtypeStruct` with shardings. `step=None` takes the newest readable step (unreadable ones are
        skipped with a warning, not moved); an explicit step must exist and be readable.
        """
        _check_abstract(abstract_params, "abstract_params")
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; saved steps: {steps}")
        errors = []
        for s in ([step] if step is not None else reversed(steps)):
            start = time.perf_counter()
            try:
                params = _restore_subtree(self.directory / str(s) / _STATE, item, abstract_params)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - unreadable step: try an older one.
                if step is not None:
                    raise
                logging.warning("checkpoint: %r of step %d in %s cannot be restored (%s: %s); trying the previous "
                                "one", item, s, self.directory, type(e).__name__, _short(e))
                errors.append(f"step {s}: {type(e).__name__}: {_short(e)}")
                continue
            logging.info("checkpoint: restored %r of step %d from %s in %.3f s", item, s, self.directory,
                         time.perf_counter() - start)
            return params
        raise RuntimeError(f"no checkpoint in {self.directory} has a readable {item!r}: {'; '.join(errors)}")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step dirs to `<step>.corrupt-<n>`, which orbax ignores; the data stays on disk."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                n = 0
                while (self.directory / f"{step}.corrupt-{n}").exists():
                    n += 1
                dst = self.directory / f"{step}.corrupt-{n}"
                src.rename(dst)
                logging.warning("checkpoint: moved unreadable checkpoint %s aside to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("uvit_checkpoint_set_aside")
        self._manager.reload()


def load_params_dir(path: str | os.PathLike, abstract_params: Any = None) -> tuple[Any, dict]:
    """Read a converted-official params dir: `path/params` (orbax StandardCheckpointer) + `path/nnet.json`.

    Returns (params, nnet kwargs). With `abstract_params` (ShapeDtypeStructs with shardings) the params come back as
    sharded jax.Arrays; without, as host numpy arrays in the saved tree structure. Raises FileNotFoundError for a
    missing part, CheckpointMismatchError when names or shapes differ from `abstract_params`, ValueError when
    unreadable.
    """
    path = epath.Path(path)
    params_dir, nnet_file = path / "params", path / "nnet.json"
    for p in (params_dir, nnet_file):
        if not p.exists():
            raise FileNotFoundError(f"{path} is not a converted params dir: {p} is missing (write one with "
                                    "`python -m uvit_jax.convert`)")
    try:
        nnet = json.loads(nnet_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{nnet_file} is not valid JSON: {e}") from e
    if not isinstance(nnet, dict):
        raise ValueError(f"{nnet_file} must hold a JSON object of model kwargs, got {type(nnet).__name__}")
    if abstract_params is not None:
        _check_abstract(abstract_params, "abstract_params")
    start = time.perf_counter()
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        try:
            saved = checkpointer.metadata(params_dir).item_metadata.tree
        except Exception as e:  # noqa: BLE001 - name the directory whatever orbax complained about.
            raise ValueError(f"cannot read the params checkpoint {params_dir}: {type(e).__name__}: {_short(e)}") from e
        if abstract_params is None:
            args = ocp.args.PyTreeRestore(
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved))
        else:
            _check_compatible(saved, abstract_params, f"params checkpoint {params_dir}")
            args = ocp.args.PyTreeRestore(
                item=abstract_params, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params))
        try:
            params = checkpointer.restore(params_dir, args=args)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read the params checkpoint {params_dir}: {type(e).__name__}: {_short(e)}") from e
    finally:
        checkpointer.close()
    logging.info("checkpoint: loaded params from %s in %.3f s", params_dir, time.perf_counter() - start)
    return params, nnet


# ------------------------------------------------------------------------------------------------------ helpers


def _restore_subtree(state_dir: epath.Path, item: str, abstract: Any) -> Any:
    """Partial restore of `state[item]` from a saved state dir; other subtrees are skipped, not read."""
    saved = _saved_tree(state_dir)
    if item not in saved:
        raise CheckpointMismatchError(f"checkpoint {state_dir} has no subtree {item!r}; it has {sorted(saved)}")
    _check_compatible(saved[item], abstract, f"{item!r} of checkpoint {state_dir}")
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


def _check_compatible(saved: Any, abstract: Any, where: str) -> None:
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


def _check_abstract(tree: Any, name: str) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{name} is empty")
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or getattr(leaf, "sharding", None) is None:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct with a sharding on "
                             f"the current mesh (needed to restore onto another topology), got {leaf!r}")


def _short(e: Exception, limit: int = 300) -> str:
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
