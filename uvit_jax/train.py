"""The training loop: the one place that wires data, model, diffusion, checkpoints and logging together.

`train_and_evaluate(config, workdir)` trains from the newest good checkpoint of `workdir` (or from scratch) to
`train.n_steps`. The pure pieces (state, optimizer, loss, step) are in `train_step.py`; this module does the I/O:
batches in, metrics and grids out, checkpoints at `train.save_interval` (and on SIGTERM / preemption, and at the
end), never a non-finite state. One writer per workdir (a lock), metrics leave the device only at log steps.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util

from uvit_jax import checkpoint, console, data, files, generate, images, latent, models, parallel, preemption, rng
from uvit_jax.rundir import RunDir
from uvit_jax.conditioning import Conditioning
from uvit_jax.train_step import State, Trainer, flops_per_image, make_apply, peak_flops_per_device
from uvit_jax.workdir_lock import WorkdirLock

# Saved config keys that must match the current config for a checkpoint to be resumed (network shape, data).
RESUME_KEYS = ("nnet", "dataset.name", "dataset.image_size", "schedule", "pred", "autoencoder.scale_factor")


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
    `eval_callback(step, state) -> metrics` runs every `train.fid_interval` steps (main wires FID here).
    `mesh` defaults to all devices; any mesh works for resuming, whatever the mesh the checkpoint was saved on.
    """
    info = data.dataset_info(config.dataset)  # a missing dataset stops here, before anything is written
    # One writer per workdir (process 0 holds the lock for all processes of the run).
    with WorkdirLock(workdir) as lock, preemption.stop_guard():
        return _train(config, workdir, info, lock, eval_callback, mesh)


def _train(config, workdir, info, lock: WorkdirLock, eval_callback, mesh) -> State:
    cfg_t = config.train
    cond = Conditioning.from_config(config)
    null_context = data.load_empty_context(config.dataset.path) if cond.kind == "text" else None
    null_cond = cond.null_condition(null_context) if cond.cfg_trained else None
    trainer = Trainer(config, mesh=mesh, null_cond=null_cond)

    ckpt = checkpoint.Checkpointer(RunDir(workdir).checkpoints, save_interval_steps=cfg_t.save_interval,
                                   max_to_keep=cfg_t.max_to_keep)
    restored = ckpt.restore_latest(trainer.abstract_with_shardings())
    best = None  # {"step", "fid"}: the lowest FID during training; its checkpoint outlives max_to_keep
    if restored is not None:
        state, metadata, start_step = restored
        best = metadata.get("best")
        if "config" in metadata:
            diffs = [d for d in checkpoint.config_differences(metadata["config"], _config_dict(config), RESUME_KEYS)
                     if not d.startswith("nnet.use_checkpoint")]  # remat changes no parameter
            if diffs:
                ckpt.close()
                raise checkpoint.CheckpointMismatchError(
                    f"the checkpoint at step {start_step} in {ckpt.directory} was trained with another config: "
                    + "; ".join(diffs) + ". Use a new --workdir, or restore the config.")
    else:
        state, start_step = trainer.init(), 0
    if best:
        ckpt.protect_step(best["step"])
    if start_step >= cfg_t.n_steps:
        ckpt.close()
        logging.info("Training is already finished: step %d of train.n_steps=%d in %s. To train longer, run again "
                     "with --config.train.n_steps=N (N > %d).", start_step, cfg_t.n_steps, workdir, start_step)
        return state
    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        files.write_json(RunDir(workdir).config, _config_dict(config))
    n_params = models.count_params(dict(config.nnet))
    logging.info("%s at step %d of %d: %s parameters, global batch %d on %d devices",
                 "Resuming" if start_step else "Starting", start_step, cfg_t.n_steps, f"{n_params:,}",
                 cfg_t.batch_size, jax.device_count())

    # TensorBoard only (process 0); the console gets one line per log interval from the loop below.
    writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)) if parallel.is_main_process()
              else metric_writers.MultiWriter([]))
    if start_step == 0:
        writer.write_hparams({k: v for k, v in traverse_util.flatten_dict(_config_dict(config), sep=".").items()
                              if isinstance(v, (int, float, str))})
    hooks = []
    if cfg_t.profile_steps and parallel.is_main_process():
        hooks.append(periodic_actions.Profile(num_profile_steps=cfg_t.profile_steps, logdir=workdir,
                                              first_profile=start_step + cfg_t.log_interval + 1))
    batches = data.make_train_batches(config.dataset, global_batch_size=cfg_t.batch_size, seed=config.seed,
                                      start_step=start_step)
    grid = _GridWriter(config, workdir, info, trainer, cond, null_context)
    flops_img, peak = flops_per_image(config), peak_flops_per_device()

    def save(step: int, state: State, metrics: dict) -> None:
        # The state about to be written must be finite: checked before every save, preemption and final included.
        if not bool(jax.device_get(metrics["all_finite"])):
            last = ckpt.latest_step()
            restored_note = (f" (step {last} is the checkpoint this run restored at start; no good step was saved "
                             "since)" if last == start_step and start_step else "")
            batches.close()
            ckpt.close()
            raise NonFiniteLossError(
                f"non-finite loss or parameters at step {step}; stopped without saving. The newest checkpoint is "
                f"step {last} in {ckpt.directory}{restored_note}. Lower optimizer.lr or use dtype=float32 and "
                "run again to resume from it.")
        lock.check()  # object-store workdirs: the owner record must still be ours
        ckpt.save(step, state, {"step": step, "data_position": step * cfg_t.batch_size, "best": best,
                                "config": _config_dict(config)}, force=True)

    pending: list[dict] = []
    clock = _TrainClock()
    last_log = (start_step, 0.0)
    step, stop_reason, metrics = start_step, None, None
    try:
        while step < cfg_t.n_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = trainer.to_global(next(batches))
                state, metrics = trainer.step_fn(state, batch)
            step += 1
            pending.append(metrics)
            ckpt.check_health()  # a failed background save stops the run now, not at the next interval
            for hook in hooks:
                hook(step)
            if step % cfg_t.log_interval == 0 or step == cfg_t.n_steps:
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
                if eval_callback is not None and cfg_t.fid_interval and step % cfg_t.fid_interval == 0:
                    fid = eval_callback(step, state)["fid"]
                    writer.write_scalars(step, {f"fid_{cfg_t.fid_n_samples}": fid})
                    if best is None or fid < best["fid"]:
                        best = {"step": step, "fid": fid}
                        ckpt.protect_step(step)  # outlives max_to_keep; sample mode picks it by default
                        if parallel.is_main_process():
                            files.write_json(RunDir(workdir).best_record, best)
                clock.resume()
            if stop:
                stop_reason = f"Preemption requested: saved step {step}; run the same command again to resume."
                break
        ckpt.close()
    except checkpoint.CheckpointSaveError as e:
        batches.close()
        checkpoint.exit_after_save_failure(e, ckpt)
    finally:
        batches.close()
        writer.flush()
    logging.info(stop_reason or f"Training done at step {step}. Checkpoints: {ckpt.directory}; grids: "
                                f"{grid.run.grids if grid.enabled else '(off: no autoencoder weights)'}; TensorBoard: "
                                f"tensorboard --logdir {workdir}")
    return state


class _GridWriter:
    """Periodic sample grids from the EMA params (the config's grid sampler), PNGs in WORKDIR/grids/. Latent
    configs decode through the autoencoder; text models draw the first validation captions of sample mode."""

    def __init__(self, config, workdir, info, trainer: Trainer, cond: Conditioning, null_context):
        self.config, self.run = config, RunDir(workdir)
        self.enabled, self.decode = True, None
        if latent.is_latent(config):
            try:
                self.decode = latent.make_decoder(config, trainer.mesh)
            except FileNotFoundError as e:  # training itself needs no autoencoder
                self.enabled = False
                logging.warning("Training grids are off: %s", e)
                return
        self.n = parallel.padded_size(config.sample.grid_size)
        self.ncols = cond.grid_columns(config.sample.grid_size)
        self.cond = None
        if cond.kind == "class":
            self.cond = jax.device_put(cond.grid_labels(self.n), trainer.batch_sharding)
        elif cond.kind == "text":
            try:
                texts = data.TextConditions(config, "val")
            except data.DatasetNotPreparedError:  # no validation split extracted: training captions
                texts = data.TextConditions(config, "train")
            self.cond = latent.host_to_global(texts.batch(0, self.n)["context"], trainer.mesh)
        fn = generate.make_generate_from_config(config, make_apply(config, mesh=trainer.mesh),
                                                image_shape=info["image_shape"],
                                                steps=config.sample.grid_steps, null_context=null_context)
        self.fn = generate.jit_generate(fn, self.n, trainer.mesh)
        self.key = rng.stream_key(config.seed, rng.GRID)

    def write(self, step: int, ema_params) -> None:
        if not self.enabled:
            return
        x = self.fn(ema_params, self.key, self.cond)
        x = parallel.gather_to_host(self.decode(x) if self.decode else x)
        if parallel.is_main_process():
            path = self.run.grid(step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            images.save_grid(images.to_uint8(x[: self.config.sample.grid_size]), path, self.ncols)
            logging.info("Wrote sample grid %s", path)
