"""Noise schedules: the continuous VP SDE and the discrete Stable-Diffusion schedule.

The official `sde.py`, `dpm_solver_pytorch.py` and `dpm_solver_pp.py` (docs/official_behaviour.md §3, §5).

Both expose the same interface over the solvers' continuous time t in [0, 1], vectorised (numpy in -> numpy out,
which the samplers use to build their static plans in float64; jax arrays / tracers in -> jnp):
`log_alpha(t)`, `alpha(t)`, `sigma(t)`, `lambda_(t)` (half log-SNR) and its inverse `t_from_lambda(l)`;
`net_time_for_sampling(t)` (what the network receives at sampling time); `sample_training_time(key, batch)` (the
official training draw); `T` / `eps` (the official samplers' start and end times). Schedules are frozen
dataclasses, hashable, so they can be static arguments of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
    """numpy for host values (numpy arrays, Python numbers), jax.numpy for jax arrays and tracers."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _as_array(t):
    return t if isinstance(t, jax.Array) else np.asarray(t, dtype=np.float64)


def _sigma_from_log_alpha(log_alpha):
    # sigma = sqrt(1 - alpha^2); expm1 keeps precision near t = 0 where alpha^2 -> 1.
    xp = _xp(log_alpha)
    return xp.sqrt(-xp.expm1(2.0 * log_alpha))


def _lambda_from_log_alpha(log_alpha):
    xp = _xp(log_alpha)
    return log_alpha - 0.5 * xp.log(-xp.expm1(2.0 * log_alpha))


def _log_alpha_from_lambda(lam):
    # alpha^2 = 1 / (1 + e^{-2 lambda}).
    return -0.5 * _xp(lam).logaddexp(0.0, -2.0 * lam)


class _FromLogAlpha:
    """alpha, sigma and lambda of a VP schedule, derived from its `log_alpha(t)`."""

    def alpha(self, t):
        log_alpha = self.log_alpha(t)
        return _xp(log_alpha).exp(log_alpha)

    def sigma(self, t):
        return _sigma_from_log_alpha(self.log_alpha(t))

    def lambda_(self, t):
        return _lambda_from_log_alpha(self.log_alpha(t))


@dataclasses.dataclass(frozen=True)
class VPSchedule(_FromLogAlpha):
    """Continuous VP SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0) (`sde.py`, `dpm_solver_pytorch.py`).

    alpha_t^2 = exp(-(beta_0 t + (beta_1 - beta_0) t^2 / 2)); the network sees 999 t.
    """
    beta_0: float = 0.1
    beta_1: float = 20.0

    T = 1.0      # official sampling start
    eps = 1e-4   # official DPM-Solver end time (Euler-Maruyama stops at 1e-3 through its own grid)

    def beta(self, t):
        """beta(t) = g(t)^2 of the forward SDE."""
        return self.beta_0 + _as_array(t) * (self.beta_1 - self.beta_0)

    def log_alpha(self, t):
        t = _as_array(t)
        return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_from_lambda(self, lam):
        """Closed-form inverse of `lambda_`: with L = log(1 + e^{-2 lambda}) = -2 log alpha,
        t = 2L / (beta_0 + sqrt(beta_0^2 + 2 (beta_1 - beta_0) L)) (the cancellation-free root)."""
        lam = _as_array(lam)
        xp = _xp(lam)
        big_l = xp.logaddexp(0.0, -2.0 * lam)
        return 2.0 * big_l / (self.beta_0 + xp.sqrt(self.beta_0 ** 2 + 2.0 * (self.beta_1 - self.beta_0) * big_l))

    def net_time_for_sampling(self, t):
        """The network's time input for solver time t: 999 t (`ScoreModel.predict`)."""
        return 999.0 * _as_array(t)

    def sample_training_time(self, key, batch: int):
        """Official training draw: t ~ U[0, 1) (no cut-off). Returns (alpha, sigma, net_time), each (batch,) float32,
        alpha = sqrt(abar(t)), sigma = sqrt(1 - abar(t)), abar from the SDE integral (`sde.py` cum_alpha)."""
        t = jax.random.uniform(key, (batch,), jnp.float32)
        abar = jnp.exp(-(self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t ** 2))
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar), 999.0 * t


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule(_FromLogAlpha):
    """Stable-Diffusion discrete schedule: beta_n = linspace(sqrt(start), sqrt(end), n)^2, n = 1..N.

    Training uses abar_n from float64 betas; the solvers use `dpm_solver_pp.py`'s continuous extension: knots
    t_k = k/N with log alpha_k = 1/2 sum_{i<=k} log(1 - beta_i) from float32 betas, piecewise-linear interpolation
    (linear extrapolation outside), inverse by interpolating t against log alpha over the same knots.
    """
    n: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.0120

    T = 1.0
    # eps (= 1/n, the official end time) is a property below.

    @property
    def eps(self) -> float:
        return 1.0 / self.n

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """float64 betas, index n-1 holds beta_n."""
        return np.linspace(self.linear_start ** 0.5, self.linear_end ** 0.5, self.n, dtype=np.float64) ** 2

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """float64 abar_n = prod_{i<=n} (1 - beta_i), index n-1 holds abar_n."""
        return np.cumprod(1.0 - self.betas)

    @functools.cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        betas32 = self.betas.astype(np.float32)
        log_alpha = (0.5 * np.cumsum(np.log(1.0 - betas32), dtype=np.float32)).astype(np.float32)
        t = np.linspace(1.0 / self.n, 1.0, self.n, dtype=np.float32)
        return t, log_alpha

    def log_alpha(self, t):
        knots_t, knots_la = self._knots
        return _interp_linear_extrapolate(_as_array(t), knots_t, knots_la)

    def t_from_lambda(self, lam):
        lam = _as_array(lam)
        knots_t, knots_la = self._knots
        # log alpha decreases with t: flip so the abscissae increase.
        return _interp_linear_extrapolate(_log_alpha_from_lambda(lam), knots_la[::-1].copy(), knots_t[::-1].copy())

    def net_time_for_sampling(self, t):
        """The network's time input for solver time t: 1000 t (t = n/1000 <-> level n)."""
        return float(self.n) * _as_array(t)

    def sample_training_time(self, key, batch: int):
        """Official training draw: level n uniform on {1..N}. Returns (alpha, sigma, net_time = n), each (batch,)
        float32, with alpha = sqrt(abar_n), sigma = sqrt(1 - abar_n) computed in float64, then cast."""
        level = jax.random.randint(key, (batch,), 1, self.n + 1)
        sqrt_abar = jnp.asarray(np.sqrt(self.alphas_cumprod), jnp.float32)
        sqrt_1m_abar = jnp.asarray(np.sqrt(1.0 - self.alphas_cumprod), jnp.float32)
        return sqrt_abar[level - 1], sqrt_1m_abar[level - 1], level.astype(jnp.float32)


def _interp_linear_extrapolate(x, knots_x: np.ndarray, knots_y: np.ndarray):
    """Piecewise-linear interpolation through (knots_x, knots_y) (knots_x increasing), extended linearly beyond
    both ends (`dpm_solver_pp.py` interpolate_fn). Computed in x's floating dtype."""
    xp = _xp(x)
    if not xp.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64 if xp is np else jnp.result_type(float))
    kx, ky = xp.asarray(knots_x, x.dtype), xp.asarray(knots_y, x.dtype)
    idx = xp.clip(xp.searchsorted(kx, x, side="right") - 1, 0, kx.shape[0] - 2)
    x0, x1, y0, y1 = kx[idx], kx[idx + 1], ky[idx], ky[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)



SCHEDULES = {"vp": VPSchedule, "discrete": DiscreteSchedule}


def make_schedule(name: str):
    """The noise schedule a config names: "vp" (continuous VP SDE) or "discrete" (Stable-Diffusion betas)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]()
