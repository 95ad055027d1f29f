"""Classifier-free guidance and the glue from a network to the samplers' `eps_fn(x, t)`.

Functions handed to the jitted samplers travel as `jax.tree_util.Partial` pytrees: the bound arguments (network
parameters, labels, contexts) are traced inputs of the sampler's jit, not constants baked into it, and a second
call with new parameters of the same shapes reuses the compiled sampler. `as_traceable` wraps any callable so.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from jax.tree_util import Partial


def as_traceable(fn: Callable) -> Partial:
    """`fn` as a pytree: a `Partial` stays as is; a plain callable becomes `Partial(fn)` (no traced leaves, the
    callable itself is part of the jit cache key, compared by identity)."""
    if isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    return Partial(fn)


@dataclasses.dataclass(frozen=True)
class _Guided:
    """(1 + s) eps_c - s eps_u from one doubled forward pass. `scale` is static (hashable), so scale 0 skips the
    unconditional half at trace time."""
    scale: float

    def __call__(self, net_fn, null_cond, x, net_time, cond):
        if self.scale == 0.0:
            return net_fn(x, net_time, cond)
        batch = x.shape[0]
        net_time = jnp.broadcast_to(jnp.asarray(net_time), (batch,))
        null = jnp.broadcast_to(jnp.asarray(null_cond, dtype=jnp.asarray(cond).dtype), jnp.shape(cond))
        # Interleave [cond_0, null_0, cond_1, null_1, ...] rather than concatenating: sample i's two rows stay in
        # the same batch shard, so a batch-sharded x needs no cross-device traffic.
        xx = jnp.repeat(x, 2, axis=0)
        tt = jnp.repeat(net_time, 2, axis=0)
        cc = jnp.stack([jnp.asarray(cond), null], axis=1).reshape((2 * batch,) + jnp.shape(cond)[1:])
        out = net_fn(xx, tt, cc).reshape((batch, 2) + x.shape[1:])
        eps_c, eps_u = out[:, 0], out[:, 1]
        return (1.0 + self.scale) * eps_c - self.scale * eps_u


def cfg(net_fn: Callable, scale: float, null_cond: Any) -> Partial:
    """Classifier-free guidance: `guided_fn(x, net_time, cond) = (1 + scale) eps(x, t, cond) - scale eps(x, t, null)`.

    The official code's convention (docs/official_behaviour.md §3.3; "w = 1 + scale"). Computed in ONE forward
    pass over a doubled batch (each sample's conditional and unconditional rows interleaved), instead of the
    official two passes; the result is the same per-sample. `scale == 0` calls `net_fn` once on the plain batch (no
    doubling).
    `null_cond` is the null label (a scalar index, e.g. 1000) or the empty context (shape `cond.shape[1:]`); it is
    broadcast over the batch. `net_fn(x, net_time, cond)` may be a `Partial` carrying parameters.
    """
    scale = float(scale)
    if scale < 0:
        raise ValueError(f"cfg: scale must be >= 0, got {scale}")
    return Partial(_Guided(scale), as_traceable(net_fn), jnp.asarray(null_cond))


@dataclasses.dataclass(frozen=True)
class _EpsFromNet:
    schedule: Any

    def __call__(self, net_fn, cond, x, t):
        return net_fn(x, self.schedule.net_time_for_sampling(t), cond)


def make_eps_fn(net_fn: Callable, schedule: Any, cond: Any = None) -> Partial:
    """The samplers' `eps_fn(x, t) = net_fn(x, schedule.net_time_for_sampling(t), cond)` for solver time t
    (999 t for the VP schedule, 1000 t for the discrete one). `net_fn` may be `cfg(...)` or any `Partial`."""
    return Partial(_EpsFromNet(schedule), as_traceable(net_fn), cond)
