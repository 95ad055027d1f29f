"""Diffusion core: schedules, the training loss, samplers (DPM-Solver(++), Euler-Maruyama) and guidance.

Pure functions of a noise predictor; never imports uvit_jax.models. Samplers take `eps_fn(x, t)` with the solver's
continuous t of shape (B,); build it from a network with `make_eps_fn(net_fn, schedule, cond)` (optionally
`cfg(net_fn, scale, null_cond)` first).
"""
from uvit_jax.diffusion.dpm_solver import dpm_solver_sample, plan_fast, plan_fast_grid, time_grid
from uvit_jax.diffusion.euler_maruyama import euler_maruyama_sample
from uvit_jax.diffusion.guidance import as_traceable, cfg, make_eps_fn
from uvit_jax.diffusion.loss import drop_condition, noise_prediction_loss
from uvit_jax.diffusion.schedules import SCHEDULES, DiscreteSchedule, VPSchedule, make_schedule

__all__ = [
    "DiscreteSchedule", "VPSchedule", "as_traceable", "cfg", "dpm_solver_sample", "drop_condition",
    "euler_maruyama_sample", "make_eps_fn", "make_schedule", "SCHEDULES", "noise_prediction_loss", "plan_fast",
    "plan_fast_grid", "time_grid",
]
