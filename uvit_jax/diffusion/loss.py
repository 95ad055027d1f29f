"""The noise-prediction training loss with classifier-free-guidance label dropping (docs/official_behaviour.md §3)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def drop_condition(key, cond, null_cond, p_uncond: float):
    """Replace each sample's condition by `null_cond` with probability `p_uncond` (independently per sample).

    `cond`: labels (B,) with a scalar null index, or contexts (B, ...) with a null context of shape cond.shape[1:].
    """
    cond = jnp.asarray(cond)
    null = jnp.asarray(null_cond, dtype=cond.dtype)
    if null.shape not in ((), cond.shape[1:]):
        raise ValueError(f"null_cond shape {null.shape} must be () or cond.shape[1:] = {cond.shape[1:]}")
    drop = jax.random.uniform(key, (cond.shape[0],)) < p_uncond
    drop = drop.reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(drop, jnp.broadcast_to(null, cond.shape), cond)


def noise_prediction_loss(net_fn: Callable, x0, key, schedule, *, cond: Any = None, p_uncond: float = 0.0,
                          null_cond: Any = None):
    """Per-sample loss (B,): mean over all non-batch elements of (eps - net_fn(x_t, net_time, cond))^2.

    Time, alpha and sigma come from `schedule.sample_training_time` (VP: t ~ U[0, 1), net time 999 t; discrete:
    n uniform on 1..N, net time n); eps ~ N(0, I); x_t = alpha x0 + sigma eps. With p_uncond > 0 each sample's
    `cond` is replaced by `null_cond` with that probability (CFG training). Deterministic given `key`.
    The batch loss is the mean of the result.
    """
    if p_uncond > 0.0 and (cond is None or null_cond is None):
        raise ValueError("p_uncond > 0 needs both cond and null_cond")
    key_t, key_eps, key_drop = jax.random.split(key, 3)
    batch = x0.shape[0]
    alpha, sigma, net_time = schedule.sample_training_time(key_t, batch)
    bshape = (batch,) + (1,) * (x0.ndim - 1)
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    x_t = alpha.reshape(bshape).astype(x0.dtype) * x0 + sigma.reshape(bshape).astype(x0.dtype) * eps
    if p_uncond > 0.0:
        cond = drop_condition(key_drop, cond, null_cond, p_uncond)
    eps_hat = net_fn(x_t, net_time, cond)
    if eps_hat.shape != x0.shape:
        raise ValueError(f"net_fn returned shape {eps_hat.shape}, expected x0's shape {x0.shape}")
    err = (eps.astype(jnp.float32) - eps_hat.astype(jnp.float32)) ** 2
    return err.reshape(batch, -1).mean(axis=1)
