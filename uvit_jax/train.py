"""The training loop: the one place that wires data, model, diffusion, checkpoints and logging together.

`train_and_evaluate(config, workdir)` trains from the newest good checkpoint of `workdir` (or from scratch) to
`train.n_steps`. The pure pieces (state, optimizer, loss, step) are in `train_step.py`; this module does the I/O:
batches in, metrics and grids out, checkpoints at `train.save_interval` (and on SIGTERM / preemption, and at the
end), never a non-finite state, and the best FID's step kept. One writer per workdir (a lock).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util

from uvit_jax import (agreement, checkpoint, console, data, files, generate, images, models, parallel, preemption,
                      rng)
from uvit_jax.conditioning import Conditioning
from uvit_jax.rundir import BestRecord, RunDir
from uvit_jax.train_step import State, Trainer, flops_per_image, peak_flops_per_device
from uvit_jax.workdir_lock import WorkdirLock

# What a resumed run does with a setting that differs from its checkpoint's (README, "Resuming with changed
# settings"). refuse: the saved state would not mean the same (the network, the data, the noise schedule and
# parametrisation, the seed that orders the data and draws the noise). adapt: the batch size; the run continues from
# the saved data position, so no part of an epoch is skipped or seen twice. warn: the new value is taken, with one
# warning line naming old -> new. Any other key (n_steps, intervals, sampling, evaluation) may change silently;
# every change is appended to WORKDIR/config_history.jsonl before config.json is rewritten.
RESUME_RULES = {
    "nnet": "refuse", "dataset.name": "refuse", "dataset.image_size": "refuse", "schedule": "refuse",
    "pred": "refuse", "autoencoder.scale_factor": "refuse", "seed": "refuse",
    "train.batch_size": "adapt",
    "optimizer": "warn", "lr_scheduler": "warn", "dtype": "warn", "ema_rate": "warn", "train.grad_accum_steps": "warn",
    "dataset.path": "warn", "dataset.data_dir": "warn",
}


class NonFiniteLossError(RuntimeError):
    pass


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


class _TrainClock:
    """Wall time spent in training steps only: paused (after the device caught up) around grids, FID and saves."""

    def __init__(self):
        self.total, self._since = 0.0, time.perf_counter()

    def pause(self, *arrays) -> None:
        jax.block_until_ready(arrays)
        self.total += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    def read(self, *arrays) -> float:
        self.pause(*arrays)
        self.resume()
        return self.total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_callback: Callable[[int, State], dict] | None = None, mesh=None) -> State:
    """Train `config` in `workdir`, resuming from its newest good checkpoint; returns the final state.

    A SIGTERM (or a JAX preemption notice under jax.distributed) saves the current step and returns early.
    `eval_callback(step, state) -> {"fid": value, ...}` runs after the saves at multiples of `train.fid_interval`
    (main wires FID here); its record is kept as WORKDIR/eval/fid_<step>.json, and the checkpoint of the lowest FID
    among the saved steps outlives `train.max_to_keep` (see `rundir`). A step saved without its FID (the run
    stopped in between) gets it when the next run starts.
    `mesh` defaults to all devices; any mesh works for resuming, whatever the mesh the checkpoint was saved on.
    """
    faults = agreement.Faults()  # an error on one process stops all of them at the next agreement point
    with faults.catch():
        data.dataset_info(config.dataset)  # a missing dataset stops here, before anything is written
    faults.agree("opening the dataset")
    # One writer per workdir (process 0 holds the lock for all processes of the run).
    lock = WorkdirLock(workdir)
    with faults.catch():
        lock.acquire()
    faults.agree("taking the workdir lock")
    try:
        with preemption.stop_guard():
            return _train(config, workdir, lock, faults, eval_callback, mesh)
    finally:
        lock.release()


def _train(config, workdir, lock: WorkdirLock, faults: agreement.Faults, eval_callback, mesh) -> State:
    cfg_t = config.train
    run = RunDir(workdir)
    cond = Conditioning.from_config(config)
    null_cond = cond.null_condition(generate.empty_context(config)) if cond.cfg_trained else None
    trainer = Trainer(config, mesh=mesh, null_cond=null_cond)
    with checkpoint.Checkpointer(run.checkpoints, max_to_keep=cfg_t.max_to_keep) as ckpt:
        restored = ckpt.restore_latest(trainer.abstract_with_shardings())
        if restored is not None:
            state, metadata, start_step = restored
            start_position = _resume_position(metadata, config, start_step, ckpt.directory)
        else:
            state, metadata, start_step, start_position = trainer.init(), {}, 0, 0
        # The lowest FID among the saved steps: its checkpoint outlives max_to_keep, sample mode picks it.
        record = BestRecord(run, writer=parallel.is_main_process())
        fid_due = bool(eval_callback is not None and cfg_t.fid_interval)
        if fid_due and start_step and start_step % cfg_t.fid_interval == 0 and not record.has_fid(start_step):
            # The previous run stopped between this save and its FID.
            logging.info("step %d was saved without its FID (the run stopped in between): computing it now",
                         start_step)
            record.add(start_step, eval_callback(start_step, state))
        ckpt.protect_step(_step_of(record.best(ckpt.all_steps())))
        if start_step >= cfg_t.n_steps:
            logging.info("Training is already finished: step %d of train.n_steps=%d in %s. To train longer, run "
                         "again with --config.train.n_steps=N (N > %d).", start_step, cfg_t.n_steps, workdir,
                         start_step)
            return state
        if parallel.is_main_process():
            _record_config(run, config, metadata.get("config"), start_step)
        return _loop(config, run, lock, faults, eval_callback if fid_due else None, trainer, cond, ckpt, record,
                     state, start_step, start_position)


def _step_of(best: dict | None) -> int | None:
    return None if best is None else best["step"]


def _resume_position(metadata: dict, config, start_step: int, directory) -> int:
    """Apply RESUME_RULES to the checkpoint's saved config; returns the data position to continue from (examples of
    the seed's shuffled stream already trained on)."""
    saved = metadata.get("config")
    position = int(metadata.get("data_position", start_step * config.train.batch_size))
    if saved is None:
        return position
    refused = []
    for key, rule in RESUME_RULES.items():
        for name, old, new in config_differences(saved, _config_dict(config), (key,)):
            if name == "nnet.use_checkpoint":
                continue  # remat changes no parameter
            if rule == "refuse":
                refused.append(f"{name}: checkpoint {old!r}, now {new!r}")
            elif rule == "adapt":
                logging.warning("%s: %r -> %r at step %d: continuing from data position %d, so no part of the "
                                "epoch is skipped or seen twice", name, old, new, start_step, position)
            else:
                logging.warning("%s: %r -> %r from step %d on (the checkpoint was trained with %r)", name, old, new,
                                start_step, old)
    if refused:
        raise checkpoint.CheckpointMismatchError(
            f"the checkpoint at step {start_step} in {directory} was trained with another config: "
            + "; ".join(refused) + ". Use a new --workdir, or restore the config.")
    return position


def _record_config(run: RunDir, config, saved: dict | None, start_step: int) -> None:
    """Write config.json; a change from the checkpoint's config is first appended to config_history.jsonl."""
    current = _config_dict(config)
    keys = sorted(saved.keys() | current.keys()) if saved else []
    changed = {name: [old, new] for name, old, new in config_differences(saved, current, keys)}
    if changed:
        line = json.dumps({"step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changed})
        with open(run.config_history, "a") as f:
            f.write(line + "\n")
    files.write_json(run.config, current)


def config_differences(saved: Mapping, current: Any,
                       keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """Differences between a checkpoint's saved config (`metadata["config"]`) and the current one, at `keys`.

    Dotted keys name nested entries; a key whose values are dicts is compared entry by entry. Returns
    (key, saved value, current value) tuples such as ("nnet.depth", 12, 16), "<missing>" for an absent value (empty
    when they agree). Values are compared after a JSON round trip, so a tuple in the current config equals the list
    it was saved as.
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
            out.append((key, a, b))

    saved, current = plain(saved), plain(current)
    out: list[tuple[str, Any, Any]] = []
    for key in keys:
        compare(get(saved, key), get(current, key), key, out)
    return out


def _loop(config, run: RunDir, lock: WorkdirLock, faults: agreement.Faults, fid_callback, trainer: Trainer,
          cond, ckpt: checkpoint.Checkpointer, record: BestRecord, state: State, start_step: int,
          start_position: int) -> State:
    cfg_t = config.train
    n_params = models.count_params(dict(config.nnet))
    logging.info("%s at step %d of %d: %s parameters, global batch %d on %d devices",
                 "Resuming" if start_step else "Starting", start_step, cfg_t.n_steps, f"{n_params:,}",
                 cfg_t.batch_size, jax.device_count())

    # TensorBoard only (process 0); the console gets one line per log interval from the loop below.
    writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(run.root)) if parallel.is_main_process()
              else metric_writers.MultiWriter([]))
    if start_step == 0:
        writer.write_hparams({k: v for k, v in traverse_util.flatten_dict(_config_dict(config), sep=".").items()
                              if isinstance(v, (int, float, str))})
    hooks = []
    if cfg_t.profile_steps and parallel.is_main_process():
        hooks.append(periodic_actions.Profile(num_profile_steps=cfg_t.profile_steps, logdir=run.root,
                                              first_profile=start_step + cfg_t.log_interval + 1))
    batches = data.make_train_batches(config.dataset, global_batch_size=cfg_t.batch_size, seed=config.seed,
                                      start_step=start_step, start_position=start_position)
    grid = _GridWriter(config, run, trainer.mesh, cond)
    flops_img, peak = flops_per_image(config), peak_flops_per_device()

    def save(step: int, state: State, metrics: dict) -> None:
        # The state about to be written must be finite: checked before every save, preemption and final included.
        if not bool(jax.device_get(metrics["all_finite"])):
            last = ckpt.latest_step()
            restored_note = (f" (step {last} is the checkpoint this run restored at start; no good step was saved "
                             "since)" if last == start_step and start_step else "")
            raise NonFiniteLossError(
                f"non-finite loss or parameters at step {step}; stopped without saving. The newest checkpoint is "
                f"step {last} in {ckpt.directory}{restored_note}. Lower optimizer.lr or use dtype=float32 and "
                "run again to resume from it.")
        with faults.catch():
            lock.check()  # process 0: the lock (or the object store's owner record) must still be ours
        faults.agree(f"the save of step {step}")
        position = start_position + (step - start_step) * cfg_t.batch_size
        if ckpt.save(step, state, {"step": step, "data_position": position, "config": _config_dict(config)}):
            record.saved(step)

    pending: list[dict] = []
    clock = _TrainClock()
    last_log = (start_step, 0.0)
    step, stop_reason, metrics, host_batch = start_step, None, None, None
    try:
        while step < cfg_t.n_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                # Each process reads its own share: one that fails steps on with its previous batch until the
                # next agreement point (a log step or a save; that state is never saved), where every process stops.
                if not faults.failed:
                    with faults.catch():
                        host_batch = next(batches)
                if step == start_step:
                    faults.agree("reading the first batch")
                batch = trainer.to_global(host_batch)
                state, metrics = trainer.step_fn(state, batch)
            step += 1
            pending.append(metrics)
            with faults.catch():
                ckpt.check_health()  # a failed background save stops the run now, not at the next interval
            for hook in hooks:
                hook(step)
            if step % cfg_t.log_interval == 0 or step == cfg_t.n_steps:
                faults.agree(f"step {step}")
                host = jax.device_get(pending)  # metrics leave the device only here
                pending = []
                train_s = clock.read()
                rate = (step - last_log[0]) / max(train_s - last_log[1], 1e-9)
                last_log = (step, train_s)
                losses = np.array([m["loss"] for m in host])
                scalars = {"loss": float(losses.mean()), "grad_norm": float(host[-1]["grad_norm"]),
                           "lr": float(host[-1]["lr"]), "steps_per_sec": rate,
                           "images_per_sec": rate * cfg_t.batch_size,
                           "tflops_per_sec_per_device": rate * cfg_t.batch_size * flops_img / jax.device_count() / 1e12}
                if peak:
                    scalars["mfu"] = scalars["tflops_per_sec_per_device"] * 1e12 / peak
                writer.write_scalars(step, scalars)
                logging.info("step %d/%d  loss %.4f  %s (%s)  ETA %s", step, cfg_t.n_steps, scalars["loss"],
                             console.format_rate(rate, "step"),
                             console.format_rate(scalars["images_per_sec"], "image"),
                             console.format_duration((cfg_t.n_steps - step) / max(rate, 1e-9)))
            stop = preemption.should_stop(step)
            if step % cfg_t.eval_interval == 0 or step == cfg_t.n_steps:
                clock.pause(state)
                grid.write(step, state["ema_params"])
                clock.resume()
            if stop or step % cfg_t.save_interval == 0 or step == cfg_t.n_steps:
                clock.pause(state)
                save(step, state, metrics)
                if fid_callback is not None and step % cfg_t.fid_interval == 0:
                    fid = fid_callback(step, state)
                    record.add(step, fid)
                    writer.write_scalars(step, {f"fid_{cfg_t.fid_n_samples}": fid["fid"]})
                    ckpt.protect_step(_step_of(record.best(ckpt.all_steps())))
                clock.resume()
            if stop:
                stop_reason = f"Preemption requested: saved step {step}; run the same command again to resume."
                break
    except checkpoint.CheckpointSaveError as e:
        batches.close()
        writer.flush()  # os._exit below skips every finally
        checkpoint.exit_after_save_failure(e, ckpt)
    finally:
        batches.close()
        writer.flush()
    logging.info(stop_reason or f"Training done at step {step}. Checkpoints: {ckpt.directory}; grids: "
                                f"{run.grids if grid.enabled else '(off: no autoencoder weights)'}; TensorBoard: "
                                f"tensorboard --logdir {run.root}")
    return state


class _GridWriter:
    """Periodic sample grids of `sample.grid_size` images from the EMA params (the config's sampler with
    `sample.grid_steps`), PNGs in WORKDIR/grids/, drawn by `generate.Sampler` from the same noise at every step:
    class j in column j; text models draw the first validation captions of sample mode."""

    def __init__(self, config, run: RunDir, mesh, cond: Conditioning):
        self.run, self.n, self.enabled = run, int(config.sample.grid_size), True
        self.ncols = cond.grid_columns(self.n)
        self.key = rng.stream_key(config.seed, rng.GRID)
        try:
            self.sampler = generate.Sampler(config, mesh, generate.batch_size(config, self.n),
                                            settings=generate.sampler_settings(config, steps=config.sample.grid_steps),
                                            train_captions_if_no_val=True)
        except FileNotFoundError as e:  # training itself needs no autoencoder
            self.enabled = False
            logging.warning("Training grids are off: %s", e)

    def write(self, step: int, ema_params) -> None:
        if not self.enabled:
            return
        x = np.concatenate([x for _, x, _ in self.sampler.batches(
            ema_params, self.n, lambda i: jax.random.fold_in(self.key, i))])
        if parallel.is_main_process():
            path = self.run.grid(step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            images.save_grid(x, path, self.ncols)
            logging.info("Wrote sample grid %s", path)
