"""Euler-Maruyama for the reverse VP SDE, or Euler for its probability-flow ODE.

The official `sde.py` (docs/official_behaviour.md §5.1)."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.diffusion.guidance import as_traceable
from uvit_jax.diffusion.schedules import VPSchedule


@functools.partial(jax.jit, static_argnames=("schedule", "steps", "sde", "t_end"))
def _sample(eps_fn, x_T, key, *, schedule, steps, sde, t_end):
    dtype = jnp.result_type(x_T.dtype, jnp.float32)
    x_T = x_T.astype(dtype)
    # Official grid: t_0 = 0, then linspace(t_end, 1, N) (built in float64, cast to the sampling dtype).
    grid = np.append(0.0, np.linspace(t_end, 1.0, steps))
    t = jnp.asarray(grid[1:][::-1].copy(), dtype)   # interval (s, t), walked from t = 1 down
    s = jnp.asarray(grid[:-1][::-1].copy(), dtype)
    noise_on = jnp.asarray(grid[:-1][::-1] != 0.0, dtype)  # no noise on the last step (s = 0)
    batch = x_T.shape[0]
    score_weight = 1.0 if sde else 0.5

    def body(x, row):
        i, t_i, s_i, on = row
        beta = schedule.beta(t_i)
        sigma = jnp.sqrt(-jnp.expm1(-(schedule.beta_0 * t_i + 0.5 * (schedule.beta_1 - schedule.beta_0) * t_i ** 2)))
        eps = eps_fn(x, jnp.full((batch,), t_i, dtype)).astype(dtype)
        score = -eps / sigma
        drift = -0.5 * beta * x - score_weight * beta * score
        x = x + drift * (s_i - t_i)
        if sde:
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)
            x = x + on * jnp.sqrt(beta) * jnp.sqrt(t_i - s_i) * z
        return x, None

    x, _ = jax.lax.scan(body, x_T, (jnp.arange(steps), t, s, noise_on))
    return x


def euler_maruyama_sample(eps_fn: Callable, x_T, key, schedule: VPSchedule, *, steps: int, sde: bool = True,
                          t_end: float = 1e-3):
    """Sample the reverse VP SDE (sde=True) or its probability-flow ODE (sde=False) from x_T at t = 1, as `sde.py`.

    Grid t_0 = 0, linspace(t_end, 1, steps); each interval (s, t) walked from t = 1 down: one call eps_fn(x, t) with
    t of shape (B,), score = -eps / sqrt(1 - abar(t)),
    x <- x + [f(x, t) - w g(t)^2 score] (s - t) + g(t) sqrt(t - s) z   (w = 1 SDE, 1/2 ODE; f = -beta x / 2, g^2 = beta)
    The noise term is omitted on the last step (s = 0) and in the ODE; the last call is at t = t_end; no extra
    denoising step. NFE = steps. The step-i noise is normal(fold_in(key, i)). One jit; VP schedule only.
    """
    if not isinstance(schedule, VPSchedule):
        raise TypeError(f"euler_maruyama_sample needs the continuous VPSchedule (beta(t) of the SDE), "
                        f"got {type(schedule).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _sample(as_traceable(eps_fn), jnp.asarray(x_T), key, schedule=schedule, steps=int(steps), sde=bool(sde),
                   t_end=float(t_end))
