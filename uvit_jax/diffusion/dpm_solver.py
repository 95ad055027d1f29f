"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), one jitted `lax.scan`.

The official `dpm_solver_pytorch.py` and `dpm_solver_pp.py` (docs/official_behaviour.md §5.2-5.4).

Every method is compiled to the same loop: a table with one row per network evaluation (NFE). Row n holds the
evaluation time tau_n, the input coefficients (the model input is a linear combination of the current state x and
the last three model outputs) and the output coefficients (how x is updated after the call). Singlestep, fast and
multistep updates are all linear in (x, outputs), so a single `scan` with ONE model call in its body runs them all:
the network is traced and compiled once, whatever the plan. The plan (orders, grid, r's, coefficients) is computed
in float64 numpy at trace time from the static settings and enters the graph as a constant table in the sampling
dtype, so the sampler also works inside an outer jit.

Methods (`method=`):
- "singlestep": steps // order intervals on the skip-type grid, each one DPM-Solver-`order` step, r1 = 1/2
  (order 2) or r1, r2 = 1/3, 2/3 (order 3).
- "fast": the continuous file's DPM-Solver-fast (§5.2): K intervals on the skip-type grid with the orders of
  `plan_fast`, fixed r's as above. NFE = steps.
- "fast_grid": the ++ file's 'fast' (§5.3): a steps + 1 point grid; an order-k step spans k grid intervals and
  its intermediate times are the grid points in between (r_j from the grid's lambdas). NFE = steps.
- "multistep": DPM-Solver(++)-multistep of the papers on a steps + 1 point grid, with lower orders for the first
  order - 1 steps. NFE = steps. (The official ++ file's multistep is broken; this is the standard algorithm.)
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.diffusion.guidance import as_traceable
from uvit_jax.diffusion.schedules import DiscreteSchedule, VPSchedule

METHODS = ("singlestep", "multistep", "fast", "fast_grid")
SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")
_FIXED_R = {1: (0.5, 0.75), 2: (0.5, 0.75), 3: (1.0 / 3.0, 2.0 / 3.0)}  # order-1/2 r2 (and order-1 r1) unused


def plan_fast(steps: int, order: int = 3) -> tuple[int, ...]:
    """Orders of the DPM-Solver-fast steps for `steps` NFE (both official files).

    order 3: K = steps // 3 + 1 steps, [3]*(K-2) + [2, 1] | [3]*(K-1) + [1] | [3]*(K-1) + [2] for steps % 3 = 0|1|2.
    order 2: [2] * (steps // 2), plus [1] when steps is odd. Order 1 has no fast plan (as in the official code).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        orders = [3] * (k - len(tail)) + tail
    elif order == 2:
        orders = [2] * (steps // 2) + [1] * (steps % 2)
    else:
        raise ValueError(f"the 'fast' plans need order 2 or 3, got order={order}")
    return tuple(o for o in orders if o > 0)


def plan_fast_grid(steps: int, order: int = 3) -> tuple[tuple[int, int], ...]:
    """The ++ file's 'fast' plan: (start, end) grid indices of each step on a steps + 1 point grid; a step of order
    k spans k grid intervals (end - start = k)."""
    pairs, i = [], 0
    for k in plan_fast(steps, order):
        pairs.append((i, i + k))
        i += k
    assert i == steps, (steps, order, pairs)
    return tuple(pairs)


def time_grid(schedule, skip_type: str, t_start: float, t_end: float, n: int) -> np.ndarray:
    """n + 1 decreasing solver times (float64 numpy) from t_start to t_end: uniform in lambda ('logSNR', through
    t_from_lambda as the official code), in t ('time_uniform'), or in sqrt(t) ('time_quadratic'; exact, where the
    official code rounds to a 1e7-point grid)."""
    if skip_type == "logSNR":
        lam = np.linspace(schedule.lambda_(np.float64(t_start)), schedule.lambda_(np.float64(t_end)), n + 1)
        return np.asarray(schedule.t_from_lambda(lam), np.float64)
    if skip_type == "time_uniform":
        return np.linspace(t_start, t_end, n + 1, dtype=np.float64)
    if skip_type == "time_quadratic":
        grid = np.linspace(np.sqrt(t_start), np.sqrt(t_end), n + 1, dtype=np.float64) ** 2
        grid[0], grid[-1] = t_start, t_end
        return grid
    raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")


def _phis(h, predict_x0: bool):
    """psi_1, psi_2, psi_3 such that both forms read  x_t = ratio x - scale_t (psi_1 m0 + psi_2 D1 + psi_3 D2)."""
    if predict_x0:
        e = np.expm1(-h)
        return e, -(e / h + 1.0), (e + h) / h ** 2 - 0.5
    e = np.expm1(h)
    return e, e / h - 1.0, (e - h) / h ** 2 - 0.5


class _Form:
    """The schedule values of one solver form at given times: ratio(s -> t) and scale(t)."""

    def __init__(self, schedule, predict_x0: bool):
        self.schedule, self.predict_x0 = schedule, predict_x0

    def ratio(self, s, t):
        if self.predict_x0:
            return self.schedule.sigma(t) / self.schedule.sigma(s)
        return np.exp(self.schedule.log_alpha(t) - self.schedule.log_alpha(s))

    def scale(self, t):
        return self.schedule.alpha(t) if self.predict_x0 else self.schedule.sigma(t)


def _vec(*cols):
    """Stack per-row scalars (broadcast to a common shape) into (..., 4) coefficient vectors over (x, E0, E1, E2)."""
    cols = np.broadcast_arrays(*cols)
    return np.stack(cols, axis=-1)


def _singlestep_rows(schedule, form: _Form, grid, steps_spec, fixed_r: bool):
    """Rows for a list of singlestep updates. steps_spec: list of (order, i_s, i_t) grid indices.

    Buffer convention: E0 is the newest model output. In an order-k step the outputs arrive as m_s, m_1, m_2.
    """
    orders = np.array([k for k, _, _ in steps_spec])
    i_s = np.array([a for _, a, _ in steps_spec])
    i_t = np.array([b for _, _, b in steps_spec])
    n_grid = grid.shape[0] - 1
    lam_grid = schedule.lambda_(grid)
    s, t = grid[i_s], grid[i_t]
    lam_s = lam_grid[i_s]
    h = lam_grid[i_t] - lam_s
    r1_fix = np.array([_FIXED_R[k][0] for k in orders])
    r2_fix = np.array([_FIXED_R[k][1] for k in orders])
    if fixed_r:
        r1, r2 = r1_fix, r2_fix
    else:  # intermediate points on the grid points between i_s and i_t
        r1 = np.where(orders >= 2, (lam_grid[np.minimum(i_s + 1, n_grid)] - lam_s) / h, r1_fix)
        r2 = np.where(orders >= 3, (lam_grid[np.minimum(i_s + 2, n_grid)] - lam_s) / h, r2_fix)
    # Like the official code, the intermediate times go through lambda -> t.
    s1 = schedule.t_from_lambda(lam_s + r1 * h)
    s2 = schedule.t_from_lambda(lam_s + r2 * h)

    psi1_h, psi2_h, _ = _phis(h, form.predict_x0)
    psi1_1, _, _ = _phis(r1 * h, form.predict_x0)
    psi1_2, psi2_2, _ = _phis(r2 * h, form.predict_x0)
    ratio_t, scale_t = form.ratio(s, t), form.scale(t)
    zero, one = np.zeros_like(h), np.ones_like(h)
    ident = _vec(one, zero, zero, zero)

    # Order 1 final: x_t = ratio x - scale_t psi1(h) m_s  (m_s in E0).
    final1 = _vec(ratio_t, -scale_t * psi1_h, zero, zero)
    # Intermediate point s1 (E0 = m_s).
    in1 = _vec(form.ratio(s, s1), -form.scale(s1) * psi1_1, zero, zero)
    # Order 2 final (E0 = m_1, E1 = m_s): - scale_t psi1(h) [m_s + (m_1 - m_s) / (2 r1)].
    c2 = scale_t * psi1_h / (2.0 * r1)
    final2 = _vec(ratio_t, -c2, -scale_t * psi1_h + c2, zero)
    # Intermediate point s2 (E0 = m_1, E1 = m_s): - scale_s2 [psi1(r2 h) m_s + (r2/r1) psi2(r2 h) (m_1 - m_s)].
    c_in2 = (r2 / r1) * form.scale(s2) * psi2_2
    in2 = _vec(form.ratio(s, s2), -c_in2, -form.scale(s2) * psi1_2 + c_in2, zero)
    # Order 3 final (E0 = m_2, E1 = m_1, E2 = m_s): - scale_t [psi1(h) m_s + psi2(h) (m_2 - m_s) / r2].
    c3 = scale_t * psi2_h / r2
    final3 = _vec(ratio_t, -c3, zero, -scale_t * psi1_h + c3)

    # Candidate row kinds: (time, in, out).
    kinds = [(s, ident, final1), (s, ident, ident), (s1, in1, final2), (s1, in1, ident), (s2, in2, final3)]
    taus = np.stack([k[0] for k in kinds], axis=1)             # (n_steps, 5)
    ins = np.stack([k[1] for k in kinds], axis=1)              # (n_steps, 5, 4)
    outs = np.stack([k[2] for k in kinds], axis=1)
    kind_of_order = {1: [0], 2: [1, 2], 3: [1, 3, 4]}
    step_idx = np.concatenate([[j] * k for j, k in enumerate(orders)]).astype(np.int32)
    kind_idx = np.concatenate([kind_of_order[k] for k in orders]).astype(np.int32)
    return taus[step_idx, kind_idx], ins[step_idx, kind_idx], outs[step_idx, kind_idx]


def _multistep_rows(schedule, form: _Form, grid, order: int):
    """Rows for DPM-Solver(++)-multistep over the whole grid: row i evaluates at grid[i] and steps to grid[i+1]
    with order min(order, i + 1) from the outputs at grid[i], grid[i-1], grid[i-2] (E0, E1, E2)."""
    n = grid.shape[0] - 1
    i = np.arange(n)
    lam = schedule.lambda_(grid)
    s, t = grid[i], grid[i + 1]
    h = lam[i + 1] - lam[i]
    # Step sizes of the two previous intervals; the warm-up rows that lack them never use them (any finite value).
    h0 = np.where(i >= 1, lam[i] - lam[np.maximum(i - 1, 0)], h)
    h1 = np.where(i >= 2, lam[np.maximum(i - 1, 0)] - lam[np.maximum(i - 2, 0)], h)
    r0, r1 = h0 / h, h1 / h
    psi1, psi2, psi3 = _phis(h, form.predict_x0)
    ratio_t, scale_t = form.ratio(s, t), form.scale(t)
    zero, one = np.zeros_like(h), np.ones_like(h)
    x_vec, m0 = _vec(one, zero, zero, zero), _vec(zero, one, zero, zero)
    d1_0 = _vec(zero, 1.0 / r0, -1.0 / r0, zero)    # (m0 - m1) / r0
    d1_1 = _vec(zero, zero, 1.0 / r1, -1.0 / r1)    # (m1 - m2) / r1
    c = (ratio_t[:, None] * x_vec - (scale_t * psi1)[:, None] * m0)
    out1 = c
    out2 = c - (0.5 * scale_t * psi1)[:, None] * d1_0
    # d1 ~ h m'(lambda_i), d2 ~ h^2 m''(lambda_i) (backward differences over the two previous intervals). The
    # official v2 code / diffusers weight the second-derivative term by psi_3 * h^2 m'' / 2, half of the Taylor term
    # (their D2 = h^2 m'' / 2), which makes their 3M second order; this is the third-order weight.
    d1 = d1_0 + (r0 / (r0 + r1))[:, None] * (d1_0 - d1_1)
    d2 = (2.0 / (r0 + r1))[:, None] * (d1_0 - d1_1)
    out3 = c - (scale_t * psi2)[:, None] * d1 - (scale_t * psi3)[:, None] * d2
    row_order = np.minimum(order, i + 1)
    outs = np.where((row_order == 1)[:, None], out1, np.where((row_order == 2)[:, None], out2, out3))
    return s, np.broadcast_to(x_vec, outs.shape), outs


def _dynamic_threshold(x0, ratio: float, max_val: float):
    """DPM-Solver++ / Imagen dynamic thresholding as in the official ++ file: per sample, s = max(ratio-quantile of
    |x0|, 1); clip x0 to [-s, s] and rescale by max_val / s."""
    dims = (1,) * (x0.ndim - 1)
    s = jnp.quantile(jnp.abs(x0).reshape(x0.shape[0], -1), ratio, axis=1)
    s = jnp.maximum(s, 1.0).reshape((-1,) + dims)
    return jnp.clip(x0, -s, s) / (s / max_val)


def _plan_table(schedule, steps, order, method, skip_type, predict_x0, t_start, t_end, denoise_to_zero):
    """The (NFE, 11) float64 table [tau, alpha(tau), sigma(tau), in coefficients (4), out coefficients (4)]."""
    form = _Form(schedule, predict_x0)
    if method == "multistep":
        grid = time_grid(schedule, skip_type, t_start, t_end, steps)
        taus, ins, outs = _multistep_rows(schedule, form, grid, order)
    else:
        if method == "singlestep":
            n = steps // order
            spec = [(order, j, j + 1) for j in range(n)]
        elif method == "fast":
            orders = plan_fast(steps, order)
            n = len(orders)
            spec = [(k, j, j + 1) for j, k in enumerate(orders)]
        else:  # fast_grid
            n = steps
            spec = [(b - a, a, b) for a, b in plan_fast_grid(steps, order)]
        grid = time_grid(schedule, skip_type, t_start, t_end, n)
        taus, ins, outs = _singlestep_rows(schedule, form, grid, spec, fixed_r=(method != "fast_grid"))
    if denoise_to_zero:  # one more evaluation at t_end: x <- x0_hat (noise form: (x - sigma eps) / alpha)
        a0, s0 = schedule.alpha(np.float64(t_end)), schedule.sigma(np.float64(t_end))
        last_out = [0.0, 1.0, 0.0, 0.0] if predict_x0 else [1.0 / a0, -s0 / a0, 0.0, 0.0]
        taus = np.append(taus, t_end)
        ins = np.concatenate([ins, [[1.0, 0.0, 0.0, 0.0]]])
        outs = np.concatenate([outs, [last_out]])
    return np.concatenate([np.stack([taus, schedule.alpha(taus), schedule.sigma(taus)], axis=1), ins, outs], axis=1)


@functools.partial(jax.jit, static_argnames=(
    "schedule", "steps", "order", "method", "skip_type", "predict_x0", "t_start", "t_end", "denoise_to_zero",
    "thresholding", "max_val", "dynamic_thresholding_ratio"))
def _sample(eps_fn, x_T, *, schedule, steps, order, method, skip_type, predict_x0, t_start, t_end,
            denoise_to_zero, thresholding, max_val, dynamic_thresholding_ratio):
    dtype = jnp.result_type(x_T.dtype, jnp.float32)
    x_T = x_T.astype(dtype)
    table = jnp.asarray(_plan_table(schedule, steps, order, method, skip_type, predict_x0, t_start, t_end,
                                    denoise_to_zero), dtype)
    batch = x_T.shape[0]

    def body(carry, row):
        x, buf = carry
        tau, a_tau, s_tau, cin, cout = row[0], row[1], row[2], row[3:7], row[7:11]
        u = cin[0] * x + cin[1] * buf[0] + cin[2] * buf[1] + cin[3] * buf[2]
        m = eps_fn(u, jnp.full((batch,), tau, dtype)).astype(dtype)
        if predict_x0:
            m = (u - s_tau * m) / a_tau
            if thresholding:
                m = _dynamic_threshold(m, dynamic_thresholding_ratio, max_val)
        buf = jnp.stack([m, buf[0], buf[1]])
        x = cout[0] * x + cout[1] * buf[0] + cout[2] * buf[1] + cout[3] * buf[2]
        return (x, buf), None

    buf0 = jnp.zeros((3,) + x_T.shape, dtype)
    (x, _), _ = jax.lax.scan(body, (x_T, buf0), table)
    return x


def dpm_solver_sample(eps_fn: Callable, x_T, schedule: VPSchedule | DiscreteSchedule, *, steps: int, order: int = 3,
                      method: str = "fast", skip_type: str = "logSNR", predict_x0: bool = False,
                      t_start: float | None = None, t_end: float | None = None, denoise_to_zero: bool = False,
                      thresholding: bool = False, max_val: float = 1.0, dynamic_thresholding_ratio: float = 0.995):
    """Solve the probability-flow ODE from x_T at t_start (default schedule.T = 1) to t_end (default schedule.eps:
    1e-4 VP, 1/1000 discrete) with DPM-Solver (predict_x0=False) or DPM-Solver++ (predict_x0=True).

    eps_fn(x, t) -> predicted noise, where t is the solver's continuous time as an array of shape (B,) (the same
    value for every sample). Use `make_eps_fn` to build it from a network (it maps t to 999 t or 1000 t), and pass
    parameters inside a `jax.tree_util.Partial` so they are traced, not baked into the compiled sampler.
    Official presets: continuous U-ViT `method="fast", order=3, skip_type="logSNR"` (§5.2); discrete U-ViT
    `method="fast_grid", order=3, skip_type="time_uniform", predict_x0=True` (§5.3). See the module docstring for
    the methods; `denoise_to_zero` adds one evaluation at t_end and returns x0_hat; `thresholding` (++ only) applies
    dynamic thresholding to every x0 prediction. The whole loop is one jit; the same settings reuse it.
    Returns x at t_end (or x0_hat), in x_T's dtype promoted to at least float32.
    """
    if not isinstance(schedule, (VPSchedule, DiscreteSchedule)):
        raise TypeError(f"schedule must be a VPSchedule or DiscreteSchedule, got {type(schedule).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if method in ("fast", "fast_grid") and order == 1:
        raise ValueError(f"method={method!r} needs order 2 or 3 (use 'singlestep' or 'multistep' for order 1)")
    if method == "singlestep" and steps < order:
        raise ValueError(f"singlestep needs steps >= order, got steps={steps}, order={order}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if thresholding and not predict_x0:
        raise ValueError("thresholding applies to data prediction: set predict_x0=True")
    t_start = float(schedule.T if t_start is None else t_start)
    t_end = float(schedule.eps if t_end is None else t_end)
    if not t_start > t_end:
        raise ValueError(f"need t_start > t_end, got t_start={t_start}, t_end={t_end}")
    return _sample(as_traceable(eps_fn), jnp.asarray(x_T), schedule=schedule, steps=int(steps), order=int(order),
                   method=method, skip_type=skip_type, predict_x0=bool(predict_x0), t_start=t_start, t_end=t_end,
                   denoise_to_zero=bool(denoise_to_zero), thresholding=bool(thresholding), max_val=float(max_val),
                   dynamic_thresholding_ratio=float(dynamic_thresholding_ratio))
