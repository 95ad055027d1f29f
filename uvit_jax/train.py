"""Training: the train state, AdamW with the official warm-up, EMA, the sharded train step, and the loop.

The one module that wires data, model, diffusion and checkpoints together. The state is a plain dict
{"step", "params", "ema_params", "opt_state"}; params are float32 and the network computes in `config.dtype`.
Keys are derived from (seed, step), the input batch of step s is a pure function of (seed, s), so a resumed run
repeats an uninterrupted one bit for bit.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from uvit_jax import data, generate, models, parallel
from uvit_jax.checkpoint import Checkpointer
from uvit_jax.config import validate
from uvit_jax.diffusion import noise_prediction_loss

State = dict

# Dense bf16 peak FLOP/s per chip, for MFU (ANCHORS_RESULTS.md 3d). Unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v3": 123e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


def compute_dtype(config) -> jnp.dtype:
    return jnp.dtype(config.dtype)


def warmup_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Official "customized" schedule: lr * min(k / warmup, 1) with k = updates already taken (first step: lr 0)."""
    if warmup_steps == 0:
        return lambda count: jnp.asarray(lr, jnp.float32)
    return lambda count: lr * jnp.minimum(count.astype(jnp.float32) / warmup_steps, 1.0)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW over all parameters (weight decay on every one, as the official code), no clipping."""
    o = config.optimizer
    return optax.adamw(warmup_schedule(o.lr, config.lr_scheduler.warmup_steps), b1=o.betas[0], b2=o.betas[1],
                       eps=o.eps, weight_decay=o.weight_decay)


def init_state(config, key: jax.Array) -> State:
    """A fresh state; pure, so it can be jitted with out_shardings (arrays born sharded)."""
    params = models.init_params(dict(config.nnet), key)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema_params": jax.tree.map(jnp.copy, params), "opt_state": make_optimizer(config).init(params)}


def state_shardings(abstract_state: State, mesh) -> State:
    """Replicated state by default; with mesh fsdp > 1, big params and their Adam moments sharded over `fsdp`."""
    return parallel.tree_param_shardings(abstract_state, mesh)


def ema_update(ema, params, rate: float):
    return jax.tree.map(lambda e, p: e * rate + p * (1.0 - rate), ema, params)


def sample_latents(moments: jax.Array, key: jax.Array, scale: float) -> jax.Array:
    """Official posterior draw from stored KL-f8 moments (NHWC, [mean | logvar]): scale * (mean + std * n)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return scale * (mean + std * jax.random.normal(key, mean.shape, mean.dtype))


def make_loss_fn(config, *, null_cond=None) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """loss(params, batch, key) -> mean noise-prediction loss of one (micro-)batch, as the official code draws it."""
    nnet = dict(config.nnet)
    apply = models.make_apply(nnet, dtype=compute_dtype(config))
    schedule = generate.make_schedule(config.schedule)
    p_uncond = float(config.dataset.p_uncond)
    cond_key = "context" if nnet["name"] == "uvit_t2i" else ("label" if nnet.get("num_classes", 0) > 0 else None)

    def loss_fn(params, batch, key):
        latent_key, loss_key = jax.random.split(key)
        if "moments" in batch:
            x0 = sample_latents(batch["moments"], latent_key, config.autoencoder.scale_factor)
        else:
            x0 = batch["image"]
        net_fn = lambda x, t, c: apply(params, x, t, c).astype(jnp.float32)
        cond = batch[cond_key] if cond_key else None
        losses = noise_prediction_loss(net_fn, x0, loss_key, schedule, cond=cond,
                                       p_uncond=p_uncond if cond_key else 0.0, null_cond=null_cond)
        return losses.mean()

    return loss_fn


def split_micro_batches(batch: dict, accum: int) -> dict:
    """(B, ...) -> (accum, B/accum, ...): micro-batch a takes rows a, a+accum, ..., so each device keeps its rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(config, *, null_cond=None) -> Callable[[State, dict], tuple[State, dict]]:
    """train_step(state, batch) -> (state, metrics); pure, to be jitted with shardings and a donated state.

    With grad_accum_steps = A, the gradient is the mean over A micro-batches, micro-batch a drawing its noise from
    fold_in(step_key, a).
    """
    tx = make_optimizer(config)
    lr_at = warmup_schedule(config.optimizer.lr, config.lr_scheduler.warmup_steps)
    base_key = jax.random.key(config.seed)
    accum = config.train.grad_accum_steps
    grad_fn = jax.value_and_grad(make_loss_fn(config, null_cond=null_cond))

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        key = jax.random.fold_in(base_key, state["step"])
        if accum == 1:
            loss, grads = grad_fn(state["params"], batch, key)
        else:
            micro = split_micro_batches(batch, accum)

            def body(carry, inputs):
                i, mb = inputs
                l, g = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params,
                     "ema_params": ema_update(state["ema_params"], params, config.ema_rate), "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_at(state["step"])}
        return new_state, metrics

    return train_step


class Trainer:
    """Holds the mesh, shardings and jitted functions of one run; `train_and_evaluate` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None, null_cond=None):
        validate(config, jax.device_count())
        self.config = config
        self.mesh = mesh or parallel.make_mesh(config.mesh.fsdp)
        self.abstract_state = jax.eval_shape(functools.partial(init_state, config), jax.random.key(0))
        self.state_sharding = state_shardings(self.abstract_state, self.mesh)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)
        self._init = jax.jit(functools.partial(init_state, config), out_shardings=self.state_sharding)
        self.step_fn = jax.jit(make_train_step(config, null_cond=null_cond),
                               in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    def init(self) -> State:
        return self._init(jax.random.fold_in(jax.random.key(self.config.seed), 2 ** 31 - 1))

    def abstract_with_shardings(self) -> State:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)

    def to_global(self, host_batch: dict) -> dict:
        return parallel.host_local_to_global(host_batch, self.mesh)


def flops_per_image(config) -> float:
    """Training FLOPs per image: 3 x forward (forward + backward), forward = 2 x analytic MACs."""
    return 3.0 * 2.0 * models.forward_macs(dict(config.nnet))


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def save_config(config, workdir: str) -> None:
    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


class NonFiniteLossError(RuntimeError):
    pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_callback: Callable[[int, State], dict] | None = None, mesh=None) -> State:
    """Train `config` in `workdir`, resuming from its newest good checkpoint; returns the final state.

    A SIGTERM (or a JAX preemption notice under jax.distributed) saves the current step and returns early.
    `eval_callback(step, state) -> metrics` runs every `train.fid_interval` steps (main wires FID here).
    `mesh` defaults to all devices; any mesh works for resuming, whatever the mesh the checkpoint was saved on.
    """
    cfg_t = config.train
    info = data.dataset_info(config.dataset)
    null_context = data.load_empty_context(config.dataset.path) if config.nnet.name == "uvit_t2i" else None
    use_cond_drop = config.dataset.p_uncond > 0
    null_cond = generate.null_condition(dict(config.nnet), null_context) if use_cond_drop else None
    trainer = Trainer(config, mesh=mesh, null_cond=null_cond)
    save_config(config, workdir)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=cfg_t.save_interval,
                        max_to_keep=cfg_t.max_to_keep)
    restored = ckpt.restore_latest(trainer.abstract_with_shardings())
    if restored is not None:
        state, _, start_step = restored
        logging.info("Resumed from step %d (%s)", start_step, workdir)
    else:
        state, start_step = trainer.init(), 0
        logging.info("Fresh start: %s parameters", f"{models.count_params(dict(config.nnet)):,}")

    writer = metric_writers.create_default_writer(workdir, just_logging=not parallel.is_main_process(),
                                                  asynchronous=True)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if isinstance(v, (int, float, str))})
    progress = periodic_actions.ReportProgress(num_train_steps=cfg_t.n_steps, writer=writer,
                                               every_steps=cfg_t.log_interval)
    batches = data.make_train_batches(config.dataset, global_batch_size=cfg_t.batch_size, seed=config.seed,
                                      start_step=start_step)
    grid = _GridWriter(config, workdir, info, trainer, null_context)
    flops_img, peak = flops_per_image(config), peak_flops_per_device()

    pending: list[dict] = []
    last_log_time, last_log_step = time.time(), start_step
    step = start_step
    stop_reason = None
    while step < cfg_t.n_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = trainer.to_global(next(batches))
            state, metrics = trainer.step_fn(state, batch)
        step += 1
        pending.append(metrics)
        progress(step)
        boundary = step % cfg_t.log_interval == 0 or step % cfg_t.save_interval == 0 or step == cfg_t.n_steps
        if boundary and pending:
            # Metrics leave the device only here; a non-finite loss stops before anything is saved.
            host = jax.device_get(pending)
            pending = []
            losses = np.array([m["loss"] for m in host])
            if not np.all(np.isfinite(losses)):
                ckpt.close()
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (last losses {losses[-5:]}); stopped without saving: the last "
                    f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower optimizer.lr or use "
                    f"dtype=float32 and resume.")
            if step % cfg_t.log_interval == 0 or step == cfg_t.n_steps:
                elapsed = max(time.time() - last_log_time, 1e-9)
                imgs_per_s = (step - last_log_step) * cfg_t.batch_size / elapsed
                scalars = {"loss": float(losses.mean()), "grad_norm": float(host[-1]["grad_norm"]),
                           "lr": float(host[-1]["lr"]), "images_per_sec": imgs_per_s,
                           "tflops_per_sec_per_device": imgs_per_s * flops_img / jax.device_count() / 1e12}
                if peak:
                    scalars["mfu"] = scalars["tflops_per_sec_per_device"] * 1e12 / peak
                writer.write_scalars(step, scalars)
                last_log_time, last_log_step = time.time(), step
        if step % cfg_t.eval_interval == 0 or step == cfg_t.n_steps:
            grid.write(step, state["ema_params"])
        if eval_callback is not None and cfg_t.fid_interval and step % cfg_t.fid_interval == 0:
            writer.write_scalars(step, eval_callback(step, state))
        ckpt.save(step, state, {"step": step, "data_position": step * cfg_t.batch_size}, force=step == cfg_t.n_steps)
        if ckpt.reached_preemption(step):
            ckpt.save(step, state, {"step": step, "data_position": step * cfg_t.batch_size}, force=True)
            stop_reason = f"preemption requested: saved step {step}, exiting to resume later"
            break
    ckpt.close()
    writer.flush()
    logging.info(stop_reason or f"Training done at step {step}")
    return state


class _GridWriter:
    """Periodic sample grids from the EMA params (few-step DPM-Solver), PNGs in WORKDIR/grids/."""

    def __init__(self, config, workdir, info, trainer: Trainer, null_context):
        self.config, self.dir = config, os.path.join(workdir, "grids")
        self.latent = config.dataset.name.endswith("_latents")
        if self.latent:
            logging.info("Latent config: training grids are skipped (decoding needs the autoencoder).")
            return
        nnet = dict(config.nnet)
        self.n = generate.padded_size(config.sample.grid_size)
        k = generate.num_real_classes(nnet, config.dataset.p_uncond > 0)
        self.ncols = k if 0 < k <= 16 else int(np.ceil(np.sqrt(config.sample.grid_size)))
        self.cond = None
        if k:
            self.cond = jax.device_put(generate.grid_labels(self.n, k), trainer.batch_sharding)
        apply = models.make_apply(nnet, dtype=compute_dtype(config))
        fn = generate.make_generate_from_config(config, apply, image_shape=info["image_shape"],
                                                steps=config.sample.grid_steps, null_context=null_context)
        self.fn = jax.jit(functools.partial(fn, batch_size=self.n), out_shardings=trainer.batch_sharding)
        self.key = jax.random.fold_in(jax.random.key(config.seed), 7)

    def write(self, step: int, ema_params) -> None:
        if self.latent:
            return
        images = generate.gather_to_host(self.fn(ema_params, self.key, self.cond))
        if parallel.is_main_process():
            os.makedirs(self.dir, exist_ok=True)
            path = os.path.join(self.dir, f"step_{step:08d}.png")
            generate.save_grid(generate.to_uint8(images[: self.config.sample.grid_size]), path, self.ncols)
            logging.info("Wrote sample grid %s", path)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

