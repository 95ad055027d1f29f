"""The configured sampler around a network: noise -> images in one jitted call, with classifier-free guidance.

Used by the training loop (periodic grids) and by sample mode. The network enters as
`apply(params, x, net_time, cond)`; the sampler sees `eps_fn(x, t)` in its own continuous time t and the schedule
maps t to the network's time input (999 t for vp, 1000 t for discrete), as the official samplers do.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from uvit_jax import diffusion, parallel
from uvit_jax.conditioning import Conditioning


def make_generate_fn(apply: Callable, schedule, *, algorithm: str, steps: int, image_shape: tuple[int, ...],
                     method: str = "fast", order: int = 3, skip_type: str = "logSNR", scale: float = 0.0,
                     null_cond: Any = None, thresholding: bool = False) -> Callable:
    """Returns `generate(params, key, cond, batch_size) -> x_0` (NHWC, model space, not clipped); jit it.

    `cond` is the per-sample labels / contexts (None for unconditional models). With scale > 0, eps is
    (1+s) eps_c - s eps_u in one batched forward pass (diffusion.cfg).
    """
    def net(params, x, net_time, cond):
        return apply(params, x, net_time, cond).astype(jnp.float32)  # the solver runs in float32

    def generate(params, key, cond, batch_size: int):
        noise_key, sde_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (batch_size, *image_shape), jnp.float32)
        net_fn = Partial(net, params)  # params travel as traced inputs of the sampler's jit
        if scale > 0:
            net_fn = diffusion.cfg(net_fn, scale, null_cond)
        eps_fn = diffusion.make_eps_fn(net_fn, schedule, cond)
        if algorithm in ("dpm_solver", "dpm_solver_pp"):
            return diffusion.dpm_solver_sample(eps_fn, x_T, schedule, steps=steps, order=order, method=method,
                                               skip_type=skip_type, predict_x0=algorithm == "dpm_solver_pp",
                                               thresholding=thresholding)
        if algorithm in ("euler_maruyama_sde", "euler_maruyama_ode"):
            return diffusion.euler_maruyama_sample(eps_fn, x_T, sde_key, schedule, steps=steps,
                                                   sde=algorithm.endswith("sde"))
        raise ValueError(f"unknown sampler {algorithm!r}")

    return generate


def make_generate_from_config(config, apply: Callable, *, image_shape: tuple[int, ...], steps: int | None = None,
                              null_context: np.ndarray | None = None) -> Callable:
    """`make_generate_fn` with the config's sampler, steps, guidance and null condition."""
    use_cfg = bool(config.sample.cfg) and config.sample.scale > 0
    return make_generate_fn(
        apply, diffusion.make_schedule(config.schedule), algorithm=config.sample.algorithm,
        steps=steps or config.sample.sample_steps, image_shape=image_shape, method=config.sample.method,
        order=config.sample.order, skip_type=config.sample.skip_type, thresholding=config.sample.thresholding,
        scale=config.sample.scale if use_cfg else 0.0,
        null_cond=Conditioning.from_config(config).null_condition(null_context) if use_cfg else None)


def jit_generate(generate: Callable, batch_size: int, mesh) -> Callable:
    """`generate` (from make_generate_fn) jitted as `gen(params, key, cond)` for `batch_size` images split over
    `mesh` by batch. With sharded parameters (FSDP), build its network with the same mesh
    (`train_step.make_apply(config, mesh=mesh)`), which pins the activations to that split."""
    return jax.jit(lambda p, k, c: generate(p, k, c, batch_size=batch_size),
                   out_shardings=parallel.batch_sharding(mesh))
