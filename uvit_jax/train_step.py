"""The pure pieces of training: state, AdamW with the official warm-up, EMA, the loss and the sharded step.

The state is a plain dict {"step", "params", "ema_params", "opt_state"}; params are float32 and the network
computes in `config.dtype`. The key of step s is a pure function of (seed, s) (`rng.TRAIN` stream), so a resumed
run repeats an uninterrupted one bit for bit. Nothing here does I/O: the loop lives in `train.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from uvit_jax import models, parallel, rng
from uvit_jax.conditioning import Conditioning
from uvit_jax.config import validate
from uvit_jax.diffusion import make_schedule, noise_prediction_loss
from uvit_jax.models.autoencoder import posterior_sample

State = dict

# Dense bf16 peak FLOP/s per chip, for MFU (sources in docs/published_numbers.md). Unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v3": 123e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


def compute_dtype(config) -> jnp.dtype:
    return jnp.dtype(config.dtype)


def make_apply(config, *, training: bool = False, mesh=None) -> Callable[..., jax.Array]:
    """`apply(params, x, t, cond)` of the config's network with the attention kernel that `config.attention`
    resolves to on this backend. Training computes in `config.dtype`; sampling (grids, sample mode, FID) in
    `config.sample.dtype` (float32 by default: FID runs are not where to save a few percent of time).
    `mesh`: the mesh the function is jitted over, for the FSDP activation rule (parallel.activation_sharding;
    None: activations unconstrained)."""
    dtype = compute_dtype(config) if training else jnp.dtype(config.sample.dtype)
    return models.make_apply(dict(config.nnet), dtype=dtype, attention_impl=config.attention, training=training,
                             remat_policy=config.remat_policy, precision=config.precision.to_dict(),
                             activation_sharding=parallel.activation_sharding(mesh))


def warmup_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Official "customized" schedule: lr * min(k / warmup, 1) with k = updates already taken (first step: lr 0)."""
    if warmup_steps == 0:
        return optax.constant_schedule(lr)
    # Not optax.linear_schedule: it computes lr - lr * (1 - k/w), which in float32 is off by up to 3e-4 relative
    # early in the warm-up (4e-8 comes out as 3.9989e-8); the official LambdaLR multiplies lr by k/w.
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


def ema_update(ema, params, rate: float):
    return jax.tree.map(lambda e, p: e * rate + p * (1.0 - rate), ema, params)


def make_loss_fn(config, *, null_cond=None, mesh=None) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """loss(params, batch, key) -> mean noise-prediction loss of one (micro-)batch, as the official code draws it.

    `null_cond` is what a dropped condition becomes (needed when dataset.p_uncond > 0; see conditioning.py);
    `mesh` the mesh the loss is jitted over (see make_apply).
    """
    apply = make_apply(config, training=True, mesh=mesh)
    schedule = make_schedule(config.schedule)
    cond = Conditioning.from_config(config)
    p_uncond = float(config.dataset.p_uncond) if cond.batch_key else 0.0
    if p_uncond > 0 and null_cond is None:
        raise ValueError("dataset.p_uncond > 0 needs the null condition (Conditioning.null_condition)")

    def loss_fn(params, batch, key):
        latent_key, loss_key = jax.random.split(key)
        if "moments" in batch:
            noise = jax.random.normal(latent_key, batch["moments"].shape[:-1] + (batch["moments"].shape[-1] // 2,))
            x0 = posterior_sample(batch["moments"], noise, config.autoencoder.scale_factor)  # fresh draw each time
        else:
            x0 = batch["image"]
        net_fn = lambda x, t, c: apply(params, x, t, c).astype(jnp.float32)
        losses = noise_prediction_loss(net_fn, x0, loss_key, schedule, cond=batch.get(cond.batch_key),
                                       p_uncond=p_uncond, null_cond=null_cond)
        return losses.mean()

    return loss_fn


def split_micro_batches(batch: dict, accum: int) -> dict:
    """(B, ...) -> (accum, B/accum, ...): micro-batch a takes rows a, a+accum, ..., so each device keeps its rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(config, *, null_cond=None, mesh=None) -> Callable[[State, dict], tuple[State, dict]]:
    """train_step(state, batch) -> (state, metrics); pure, to be jitted with shardings and a donated state.

    With grad_accum_steps = A, the gradient is the mean over A micro-batches, micro-batch a drawing its noise from
    fold_in(step_key, a). Metrics: loss, grad_norm, lr (of this update), all_finite (params after the update).
    """
    tx = make_optimizer(config)
    lr_at = warmup_schedule(config.optimizer.lr, config.lr_scheduler.warmup_steps)
    accum = config.train.grad_accum_steps
    grad_fn = jax.value_and_grad(make_loss_fn(config, null_cond=null_cond, mesh=mesh))

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        key = rng.stream_key(config.seed, rng.TRAIN, state["step"])
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
        grad_norm = optax.tree.norm(grads)
        # One scalar says whether the state that a save would write is finite (a NaN never reaches disk).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(state["step"]), "all_finite": finite}
        return new_state, metrics

    return train_step


# XLA:CPU's default schedule runs independent matmuls of the backward pass at once, each wanting every core; the
# memory-minimising one runs them in order: a U-ViT train step is 6% (S/2) to 15% (tiny) faster on 2 cores, and
# its peak memory is lower (uvit_jax/benchmark.py).
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(mesh) -> dict | None:
    """XLA options for the train step on the mesh's devices (None: XLA's defaults; a TPU topology's mesh compiled
    on a CPU host gets none of the CPU-only options)."""
    return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


class Trainer:
    """The mesh, shardings and jitted functions of one run (no I/O); `train.train_and_evaluate` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None, null_cond=None):
        validate(config, jax.device_count() if mesh is None else mesh.size)  # a topology's mesh: its devices
        self.config = config
        self.mesh = mesh or parallel.make_mesh(config.mesh.fsdp)
        self.abstract_state = jax.eval_shape(functools.partial(init_state, config), jax.random.key(0))
        self.state_sharding = parallel.tree_param_shardings(self.abstract_state, self.mesh)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)
        self._init = jax.jit(functools.partial(init_state, config), out_shardings=self.state_sharding)
        self.step_fn = jax.jit(make_train_step(config, null_cond=null_cond, mesh=self.mesh),
                               in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, self.replicated), donate_argnums=0,
                               compiler_options=compiler_options(self.mesh))

    def init(self) -> State:
        return self._init(rng.stream_key(self.config.seed, rng.INIT))

    def abstract_with_shardings(self) -> State:
        return parallel.with_shardings(self.abstract_state, self.state_sharding)

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
