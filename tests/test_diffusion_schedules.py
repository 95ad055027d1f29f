"""Noise schedules (docs/official_behaviour.md §3, §5.2-5.3) and the DPM-Solver-fast plans."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvit_jax.diffusion import DiscreteSchedule, VPSchedule, plan_fast, plan_fast_grid, time_grid


def test_discrete_training_table_matches_spec():
    ds = DiscreteSchedule()
    abar = ds.alphas_cumprod
    assert abar.dtype == np.float64 and abar.shape == (1000,)
    np.testing.assert_allclose(abar[0], 0.99915, rtol=1e-6)
    np.testing.assert_allclose(abar[-1], 0.0046601, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(abar[-1]), 0.068265, rtol=1e-4)


def test_discrete_solver_schedule_knots_interpolation_and_extrapolation():
    ds = DiscreteSchedule()
    betas32 = ds.betas.astype(np.float32)
    knots = 0.5 * np.cumsum(np.log(1.0 - betas32), dtype=np.float32)  # float32, as the official solver
    k = np.array([1, 2, 500, 999, 1000])
    np.testing.assert_allclose(ds.log_alpha(k / 1000.0), knots[k - 1], rtol=1e-5)
    # Piecewise linear between knots, linear extrapolation outside [1/1000, 1].
    mid = ds.log_alpha(np.array([0.0105]))
    np.testing.assert_allclose(mid, 0.5 * (knots[9] + knots[10]), rtol=1e-5)
    np.testing.assert_allclose(ds.log_alpha(np.array([0.0])), 2 * knots[0] - knots[1], rtol=1e-4)
    np.testing.assert_allclose(ds.log_alpha(np.array([1.001])), 2 * knots[-1] - knots[-2], rtol=1e-5)
    # numpy and jax paths agree; jax computes in the input dtype.
    t = np.linspace(0.0005, 1.0, 37)
    got = ds.log_alpha(jnp.asarray(t, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ds.log_alpha(t), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", [VPSchedule(), DiscreteSchedule()], ids=["vp", "discrete"])
def test_lambda_inverse_round_trip(schedule):
    t = np.linspace(1e-3, 1.0, 101)
    lam = schedule.lambda_(t)
    assert np.all(np.diff(lam) < 0)
    np.testing.assert_allclose(schedule.t_from_lambda(lam), t, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, 1.0, rtol=1e-12)
    with jax.enable_x64(True):
        np.testing.assert_allclose(schedule.t_from_lambda(jnp.asarray(lam)), t, rtol=1e-6, atol=1e-9)


def test_vp_schedule_formulas():
    vp = VPSchedule()
    t = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(vp.alpha(t) ** 2, np.exp(-(0.1 * t + 9.95 * t ** 2)), rtol=1e-12)
    np.testing.assert_allclose(vp.beta(t), 0.1 + 19.9 * t)
    np.testing.assert_allclose(vp.net_time_for_sampling(t), 999.0 * t)
    np.testing.assert_allclose(DiscreteSchedule().net_time_for_sampling(t), 1000.0 * t)
    assert (vp.T, vp.eps) == (1.0, 1e-4)
    assert (DiscreteSchedule().T, DiscreteSchedule().eps) == (1.0, 1e-3)
    # Hashable and comparable by value: usable as static jit arguments.
    assert hash(VPSchedule()) == hash(VPSchedule()) and DiscreteSchedule() == DiscreteSchedule()


def test_training_time_draws():
    key = jax.random.PRNGKey(0)
    alpha, sigma, net_time = VPSchedule().sample_training_time(key, 20000)
    t = net_time / 999.0
    assert alpha.dtype == jnp.float32 and float(t.min()) >= 0.0 and float(t.max()) < 1.0
    assert float(t.min()) < 1e-3 and float(t.max()) > 0.999 and abs(float(t.mean()) - 0.5) < 0.01
    np.testing.assert_allclose(alpha, np.sqrt(np.exp(-(0.1 * t + 9.95 * t ** 2))), rtol=1e-5)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-5)

    ds = DiscreteSchedule()
    alpha, sigma, net_time = ds.sample_training_time(key, 20000)
    n = np.asarray(net_time).astype(np.int64)
    np.testing.assert_array_equal(n, np.asarray(net_time))
    assert n.min() == 1 and n.max() == 1000
    np.testing.assert_allclose(alpha, np.sqrt(ds.alphas_cumprod[n - 1]).astype(np.float32), rtol=0)
    np.testing.assert_allclose(sigma, np.sqrt(1 - ds.alphas_cumprod[n - 1]).astype(np.float32), rtol=0)
    # Deterministic given the key.
    np.testing.assert_array_equal(ds.sample_training_time(key, 8)[2], ds.sample_training_time(key, 8)[2])


def test_fast_plans_match_spec_tables():
    assert plan_fast(10) == (3, 3, 3, 1)
    assert plan_fast(20) == (3,) * 6 + (2,)
    assert plan_fast(50) == (3,) * 16 + (2,)
    assert plan_fast(12) == (3,) * 3 + (2, 1)
    assert plan_fast(10, order=2) == (2,) * 5 and plan_fast(11, order=2) == (2,) * 5 + (1,)
    for steps in range(1, 60):
        assert sum(plan_fast(steps)) == steps  # NFE = steps
    assert plan_fast_grid(10) == ((0, 3), (3, 6), (6, 9), (9, 10))
    grid50 = plan_fast_grid(50)
    assert grid50[-1] == (48, 50) and len(grid50) == 17 and all(b - a == 3 for a, b in grid50[:-1])
    with pytest.raises(ValueError, match="order 2 or 3"):
        plan_fast(10, order=1)


def test_time_grids():
    vp, ds = VPSchedule(), DiscreteSchedule()
    g = time_grid(ds, "time_uniform", 1.0, 1e-3, 50)
    np.testing.assert_allclose(g, np.linspace(1.0, 1e-3, 51))
    # The official 50-step discrete run's last model call is at t = 0.02098 (spec §5.3).
    np.testing.assert_allclose(g[-2], 0.02098, atol=1e-5)
    g = time_grid(vp, "logSNR", 1.0, 1e-4, 17)
    np.testing.assert_allclose(np.diff(vp.lambda_(g)), (vp.lambda_(1e-4) - vp.lambda_(1.0)) / 17, rtol=1e-9)
    np.testing.assert_allclose(g[[0, -1]], [1.0, 1e-4], rtol=1e-9)
    g = time_grid(vp, "time_quadratic", 1.0, 1e-3, 10)
    np.testing.assert_allclose(np.diff(np.sqrt(g)), (np.sqrt(1e-3) - 1.0) / 10, rtol=1e-9)
    with pytest.raises(ValueError, match="skip_type"):
        time_grid(vp, "karras", 1.0, 1e-3, 10)
