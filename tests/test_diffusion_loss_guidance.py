"""The noise-prediction loss with CFG label dropping, classifier-free guidance and the eps_fn glue."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from uvit_jax.diffusion import (DiscreteSchedule, VPSchedule, cfg, dpm_solver_sample, drop_condition, make_eps_fn,
                                noise_prediction_loss)

NULL = 1000


def _alpha_sigma_from_net_time(schedule, net_time):
    if isinstance(schedule, VPSchedule):
        abar = jnp.exp(-(0.1 * (net_time / 999.0) + 9.95 * (net_time / 999.0) ** 2))
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[net_time.astype(jnp.int32) - 1]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def oracle_net(schedule, x0, offset_if_null=0.0, bias=0.0):
    """Returns the exact noise of x_t (known x0), plus `bias`, plus `offset_if_null` where the label is NULL."""
    def net_fn(x_t, net_time, cond):
        a, s = _alpha_sigma_from_net_time(schedule, net_time)
        eps = (x_t - a[:, None, None, None] * x0) / s[:, None, None, None]
        if cond is not None:
            eps = eps + offset_if_null * (cond == NULL).astype(eps.dtype)[:, None, None, None]
        return eps + bias
    return net_fn


@pytest.mark.parametrize("schedule", [VPSchedule(), DiscreteSchedule()], ids=["vp", "discrete"])
def test_loss_value_on_closed_form_net(schedule):
    x0 = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 3))
    key = jax.random.PRNGKey(1)
    loss0 = noise_prediction_loss(oracle_net(schedule, x0), x0, key, schedule)
    assert loss0.shape == (64,) and loss0.dtype == jnp.float32
    # Exact noise up to float32 rounding (VP t near 0 has sigma ~ 1e-3, hence the loose bound).
    assert float(loss0.max()) < 1e-3 and float(jnp.median(loss0)) < 1e-8
    loss = noise_prediction_loss(oracle_net(schedule, x0, bias=0.5), x0, key, schedule)
    np.testing.assert_allclose(jnp.median(loss), 0.25, rtol=1e-4)
    # A zero predictor's loss is the mean square of standard normal noise.
    loss_zero = noise_prediction_loss(lambda x, t, c: jnp.zeros_like(x), x0, key, schedule)
    assert abs(float(loss_zero.mean()) - 1.0) < 0.05


def test_loss_deterministic_given_key():
    vp = VPSchedule()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 2, 1))
    net = lambda x, t, c: 0.3 * x + 1e-3 * t[:, None, None, None]
    a = noise_prediction_loss(net, x0, jax.random.PRNGKey(5), vp)
    b = jax.jit(lambda k: noise_prediction_loss(net, x0, k, vp))(jax.random.PRNGKey(5))
    c = noise_prediction_loss(net, x0, jax.random.PRNGKey(6), vp)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(a, c)


def test_loss_label_drop_probability():
    ds = DiscreteSchedule()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4000, 2, 2, 1))
    labels = jnp.arange(4000) % 10
    net = oracle_net(ds, x0, offset_if_null=1.0)  # per-sample loss 1 exactly when the label was dropped
    loss = noise_prediction_loss(net, x0, jax.random.PRNGKey(1), ds, cond=labels, p_uncond=0.1, null_cond=NULL)
    dropped = np.asarray(loss) > 0.5
    assert abs(dropped.mean() - 0.1) < 0.015  # SE 0.0047
    loss = noise_prediction_loss(net, x0, jax.random.PRNGKey(1), ds, cond=labels, p_uncond=0.0, null_cond=NULL)
    assert float(loss.max()) < 1e-3
    with pytest.raises(ValueError, match="null_cond"):
        noise_prediction_loss(net, x0, jax.random.PRNGKey(1), ds, cond=labels, p_uncond=0.1)


def test_drop_condition_labels_and_contexts():
    key = jax.random.PRNGKey(3)
    labels = jnp.arange(1000) % 7
    out = drop_condition(key, labels, NULL, 0.15)
    drop = np.asarray(out == NULL)
    np.testing.assert_array_equal(np.asarray(out)[~drop], np.asarray(labels)[~drop])
    assert abs(drop.mean() - 0.15) < 0.04
    assert not np.any(np.asarray(drop_condition(key, labels, NULL, 0.0)) == NULL)
    assert np.all(np.asarray(drop_condition(key, labels, NULL, 1.0)) == NULL)
    # Contexts: each sample's whole (77, D) context is replaced, with the same draws as for labels.
    ctx = jax.random.normal(jax.random.PRNGKey(4), (1000, 77, 8))
    empty = jnp.full((77, 8), -3.0)
    out_ctx = drop_condition(key, ctx, empty, 0.15)
    np.testing.assert_array_equal(np.asarray(out_ctx)[drop], np.broadcast_to(np.asarray(empty), (drop.sum(), 77, 8)))
    np.testing.assert_array_equal(np.asarray(out_ctx)[~drop], np.asarray(ctx)[~drop])
    with pytest.raises(ValueError, match="null_cond shape"):
        drop_condition(key, ctx, jnp.zeros((76, 8)), 0.1)


CALLS = []


def _toy_net(w, x, net_time, cond):
    """Per-sample net mixing x, time and a label or context; records its batch size at trace time."""
    CALLS.append(x.shape[0])
    c = cond.astype(x.dtype)
    c = c.reshape(c.shape[0], -1).mean(axis=1) if c.ndim > 1 else c
    return jnp.tanh(w * x + 0.01 * net_time[:, None] + 0.1 * c[:, None])


def test_cfg_scale_zero_is_the_conditional_model():
    CALLS.clear()
    net = Partial(_toy_net, jnp.float32(0.7))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    t = jnp.linspace(1.0, 900.0, 6)
    y = jnp.arange(6)
    out = jax.jit(lambda g, x, t, y: g(x, t, y))(cfg(net, 0.0, NULL), x, t, y)
    np.testing.assert_allclose(out, net(x, t, y), rtol=1e-6, atol=1e-7)
    assert CALLS[0] == 6  # no doubled batch


@pytest.mark.parametrize("context", [False, True], ids=["labels", "context"])
def test_cfg_single_batched_pass_equals_two_passes(context):
    CALLS.clear()
    net = Partial(_toy_net, jnp.float32(0.7))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    t = jnp.linspace(1.0, 900.0, 6)
    if context:
        cond, null = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 3)), jnp.zeros((4, 3))
    else:
        cond, null = jnp.arange(6), NULL
    guided = cfg(net, 0.4, null)
    out = jax.jit(lambda g, x, t, c: g(x, t, c))(guided, x, t, cond)
    assert CALLS == [12]  # one forward pass on the doubled batch
    null_b = jnp.broadcast_to(jnp.asarray(null, cond.dtype), cond.shape)
    want = 1.4 * net(x, t, cond) - 0.4 * net(x, t, null_b)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_make_eps_fn_maps_solver_time_and_new_labels_reuse_the_compiled_sampler():
    seen = []

    def net_fn(x, net_time, cond):
        seen.append(net_time)
        return jnp.zeros_like(x) + cond[:, None] * 0.0
    vp, ds = VPSchedule(), DiscreteSchedule()
    x = jnp.ones((3, 2))
    y = jnp.arange(3)
    np.testing.assert_array_equal(make_eps_fn(net_fn, vp, y)(x, jnp.full((3,), 0.5)), jnp.zeros((3, 2)))
    np.testing.assert_allclose(seen[-1], 499.5)
    make_eps_fn(net_fn, ds, y)(x, jnp.full((3,), 0.5))
    np.testing.assert_allclose(seen[-1], 500.0)
    # Guided net -> eps_fn -> sampler, with the labels traced (a new label array reuses the compiled sampler).
    net = Partial(_toy_net, jnp.float32(0.7))
    CALLS.clear()
    out1 = dpm_solver_sample(make_eps_fn(cfg(net, 1.0, NULL), ds, y), x, ds, steps=6, method="fast_grid",
                             skip_type="time_uniform", predict_x0=True)
    out2 = dpm_solver_sample(make_eps_fn(cfg(net, 1.0, NULL), ds, y + 1), x, ds, steps=6, method="fast_grid",
                             skip_type="time_uniform", predict_x0=True)
    assert CALLS == [6] and out1.shape == x.shape and not np.allclose(out1, out2)
