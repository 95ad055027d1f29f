"""U-ViT model: official parameter counts / MACs, equivalence with the official outputs, numerics, init, apply."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from flax import nnx

from uvit_jax import parallel
from uvit_jax.convert import from_official, params_from_official
from uvit_jax.models import (PRESETS, UViT, UViTT2I, build_model, count_params, forward_macs, init_params,
                             make_apply)
from uvit_jax.models import uvit as uvit_module
from uvit_jax.models.layers import timestep_embedding

FIX = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIX / "uvit_manifest.json").read_text())
CASES = ["cls_d5_conv_perturbed", "t2i_small_perturbed"]
TINY = dict(name="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=10,
            mlp_time_embed=True)


def official_case(name, suffix):
    """(ctor kwargs, params npz path, NHWC x, t, cond, NHWC reference output) for one official-output case
    (tests/fixtures/README.md)."""
    io = np.load(FIX / f"uvit_{name}.io.npz")
    cond = io["y"] if "y" in io.files else io[f"context_{suffix}"]
    nhwc = lambda a: a.transpose(0, 2, 3, 1)
    return (MANIFEST[name]["ctor_kwargs"], FIX / f"uvit_{name}.params.npz", nhwc(io[f"x_{suffix}"]),
            io[f"timesteps_{suffix}"], cond, nhwc(io[f"out_{suffix}"]), io)


def run(model, x, t, cond):
    return np.asarray(jax.jit(lambda m, *a: m(*a))(model, x, t, cond))


def test_presets_match_official_param_counts_and_macs():
    ref = json.loads((FIX / "uvit_param_counts.json").read_text())
    assert set(PRESETS) == set(ref) - {"_meta"}
    for name, nnet in PRESETS.items():
        assert count_params(nnet) == ref[name]["params"], name
        macs, ref_macs = forward_macs(nnet), ref[name]["fwd_flops_per_sample"] / 2
        assert macs == ref_macs, (name, macs, ref_macs)  # exact: the analytic count is the measured one
        for key, value in ref[name]["nnet_kwargs"].items():
            assert PRESETS[name][key] == value, (name, key)


@pytest.mark.parametrize("name", CASES)
def test_matches_official_outputs_float32(name):
    kwargs, params, x, t, cond, ref, io = official_case(name, "f32")
    nnet = dict(kwargs, name="uvit_t2i" if "clip_dim" in kwargs else "uvit")
    # Through the trainer's path: pure params dict + make_apply under jit.
    out = jax.jit(make_apply(nnet))(params_from_official(params, nnet), x, t, cond)
    err = rel_err(out, ref)
    print(f"{name} float32 max rel err {err:.3e}")
    assert err <= 1e-5
    # Our float32 sinusoid vs torch's: only library sin/cos rounding at arguments up to 1000 may differ.
    temb = timestep_embedding(jnp.asarray(io["timesteps_f32"]), kwargs["embed_dim"])
    assert np.abs(np.asarray(temb) - io["timestep_embedding_f32"]).max() < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_matches_official_outputs_float64(name, x64, monkeypatch):
    kwargs, params, x, t, cond, ref, io = official_case(name, "f64")
    model = from_official(params, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
    assert isinstance(model, UViTT2I if "clip_dim" in kwargs else UViT)
    out = run(model, x, t, cond)
    assert out.dtype == np.float64
    err = rel_err(out, ref)
    print(f"{name} float64 max rel err {err:.3e}")
    assert err <= 1e-6
    # With torch's own float32 sinusoid the rest of the network agrees to float64 rounding.
    monkeypatch.setattr(uvit_module, "timestep_embedding", lambda t, dim: jnp.asarray(io["timestep_embedding_f32"]))
    err_exact = rel_err(model(x, t, cond), ref)
    print(f"{name} float64 (official sinusoid) max rel err {err_exact:.3e}")
    assert err_exact <= 1e-12


def test_bfloat16_compute_close_to_float32():
    kwargs, params, x, t, cond, ref, _ = official_case(CASES[0], "f32")
    out32 = run(from_official(params, **kwargs), x, t, cond)
    out16 = run(from_official(params, dtype=jnp.bfloat16, **kwargs), x, t, cond)
    assert out16.dtype == np.float32  # returned in the input's dtype
    err = rel_err(out16, out32)
    print(f"bfloat16 vs float32 max rel err {err:.3e}")
    assert err <= 2e-2


def test_precision_policies():
    """Every policy is exact in float32 compute; in bfloat16 each stays close to float32, and keeping the residual
    stream and the head in float32 is closer than computing everything in bfloat16."""
    kwargs, params, x, t, cond, ref, _ = official_case(CASES[0], "f32")
    nnet = dict(kwargs, name="uvit")
    p = params_from_official(params, nnet)
    policies = {"all_bf16": dict(residual="compute", attention="compute", final_layer="compute"),
                "official": dict(residual="until_skip", attention="float32", final_layer="compute"),
                "default": None,
                "all_f32_parts": dict(residual="float32", attention="float32", final_layer="float32")}
    errs = {}
    for name, policy in policies.items():
        assert rel_err(make_apply(nnet, precision=policy)(p, x, t, cond), ref) <= 1e-5, name
        errs[name] = rel_err(make_apply(nnet, dtype=jnp.bfloat16, precision=policy)(p, x, t, cond), ref)
    print("bfloat16 max rel err by precision policy:", errs)
    assert max(errs.values()) <= 2e-2
    assert errs["all_f32_parts"] < errs["all_bf16"] and errs["default"] < errs["all_bf16"]
    with pytest.raises(ValueError, match="precision.residual"):
        make_apply(nnet, precision=dict(residual="fp32"))


@pytest.fixture(scope="module")
def tiny_sharded():
    """TINY params initialised the trainer's way: jitted init_params with FSDP out_shardings over 8 devices."""
    mesh = parallel.make_mesh(fsdp=2)
    abstract = jax.eval_shape(lambda k: init_params(TINY, k), jax.random.key(0))
    shardings = jax.tree.map(lambda s: parallel.param_sharding(s.shape, mesh, min_size=1), abstract)
    init = jax.jit(lambda k: init_params(TINY, k), out_shardings=shardings)
    return init(jax.random.key(0)), init(jax.random.key(1))


def test_make_apply_jit_grad_sharded_and_remat_identical(tiny_sharded):
    params, _ = tiny_sharded
    assert any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    t, y = jnp.array([0.1, 0.5, 0.9, 0.0]), jnp.array([0, 1, 2, 9])
    results = []
    # no remat, the official use_checkpoint (per-block recompute, in block order), keeping the projections
    for nnet, policy in [(TINY, None), (dict(TINY, use_checkpoint=True), None), (TINY, "dots")]:
        apply = make_apply(nnet, remat_policy=policy)
        loss = lambda p: jnp.mean((apply(p, x, t, y) - x) ** 2)
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), *rest = results
    for l1, g1 in rest:
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))  # every parameter is used
    with pytest.raises(ValueError, match="config.remat_policy: must be one of"):
        make_apply(TINY, remat_policy="full")


def test_init_statistics(tiny_sharded):
    p, p_other = tiny_sharded
    assert not np.array_equal(p["pos_embed"], p_other["pos_embed"])
    assert abs(float(jnp.std(p["label_emb"]["embedding"])) - 1.0) < 0.15  # N(0, 1), 320 values
    trunc_normal = [p["pos_embed"], p["in_blocks"][0]["mlp"]["fc1"]["kernel"], p["mid_block"]["attn"]["qkv"]["kernel"],
                    p["out_blocks"][0]["skip_linear"]["kernel"], p["decoder_pred"]["kernel"],
                    p["time_embed"]["fc1"]["kernel"]]
    for w in trunc_normal:
        assert abs(float(jnp.std(w)) - 0.02) < 0.003 and abs(float(jnp.mean(w))) < 0.003  # trunc-normal std .02
    # The official cut-offs are +-2 ABSOLUTE (no effective truncation): ~4.6% of values lie beyond 2 sigma = 0.04,
    # where jax's default truncated_normal (cut at +-2 sigma) would have none.
    tails = np.concatenate([np.abs(np.ravel(w)) > 0.04 for w in trunc_normal])
    assert 0.03 < tails.mean() < 0.065
    for bias in [p["mid_block"]["mlp"]["fc2"]["bias"], p["out_blocks"][0]["skip_linear"]["bias"]]:
        assert not np.any(bias)
    np.testing.assert_array_equal(p["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["in_blocks"][0]["norm1"]["bias"], 0.0)
    for conv, fan_in in [(p["patch_embed"]["proj"], 3 * 2 * 2), (p["final_layer"], 3 * 3 * 3)]:
        bound = fan_in ** -0.5  # kaiming_uniform(a=√5) = U(±1/√fan_in); bias likewise
        assert float(jnp.abs(conv["kernel"]).max()) <= bound and float(jnp.abs(conv["bias"]).max()) <= bound
        assert abs(float(jnp.std(conv["kernel"])) - bound / 3 ** 0.5) < 0.15 * bound
    assert set(p["mid_block"]["attn"]["qkv"]) == {"kernel"}  # qkv_bias=False


def test_variants_param_counts():
    d, base = 64, dict(name="uvit", img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=2)
    n = count_params(base)
    assert count_params(dict(base, skip=False)) == n - 2 * (2 * d * d + d)  # no skip_linear
    assert count_params(dict(base, mlp_time_embed=True)) == n + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert count_params(dict(base, qkv_bias=True)) == n + 5 * 3 * d
    assert count_params(dict(base, conv=False)) == n - (9 * 3 * 3 + 3)
    assert count_params(dict(base, num_classes=7)) == n + 7 * d + d  # table + one more pos_embed row


def test_variants_use_their_options():
    """Optional paths do what they say: an unconditional model ignores the condition, a scalar t is the same t for
    every sample, qk_scale replaces head_dim**-0.5, a text model reads its context (parameter counts of each
    option are pinned in test_variants_param_counts)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    uncond = dict(TINY, num_classes=-1, skip=False, mlp_time_embed=False, conv=False)
    t2i = dict(name="uvit_t2i", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_clip_token=3,
               clip_dim=6, qkv_bias=True)
    p = init_params(uncond, jax.random.key(0))
    out = make_apply(uncond)(p, x, 0.5, jnp.array([3, 4]))
    np.testing.assert_array_equal(out, make_apply(uncond)(p, x, jnp.full((2,), 0.5), jnp.array([0, 9])))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(make_apply(dict(uncond, qk_scale=0.25))(p, x, 0.5), out)  # head_dim 16: 16**-0.5
    assert rel_err(make_apply(dict(uncond, qk_scale=0.3))(p, x, 0.5), out) > 1e-5  # float32 noise: ~1e-7
    p = init_params(t2i, jax.random.key(0))
    context = jax.random.normal(jax.random.key(2), (2, 3, 6))
    assert rel_err(make_apply(t2i)(p, x, 0.5, context), make_apply(t2i)(p, x, 0.5, -context)) > 1e-5


def test_clear_errors():
    model = nnx.eval_shape(lambda: build_model(TINY, rngs=nnx.Rngs(0)))  # inputs are checked before any compute
    with pytest.raises(ValueError, match="class-conditional.*pass labels y"):
        model(jnp.ones((1, 8, 8, 3)), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 8, 8, 3\)"):
        model(jnp.ones((1, 3, 8, 8)), jnp.zeros(1), jnp.zeros(1, int))
    with pytest.raises(ValueError, match="'num_clases'"):
        build_model(dict(TINY, num_clases=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown network name 'vit'"):
        count_params(dict(TINY, name="vit"))
    params = jax.eval_shape(lambda k: init_params(TINY, k), jax.random.key(0))
    del params["norm"]
    with pytest.raises(ValueError, match=r"missing \[\"\['norm'\]\['bias'\]\""):
        jax.eval_shape(make_apply(TINY), params, jnp.ones((1, 8, 8, 3)), jnp.zeros(1), jnp.zeros(1, int))


def test_module_state_holds_only_params():
    """No RNG keys/counters or other state in the module (orbax cannot save typed keys); blocks in nnx.List."""
    for nnet in (PRESETS["imagenet64_uvit_mid"], PRESETS["mscoco_uvit_small"]):
        model = nnx.eval_shape(lambda: build_model(nnet, rngs=nnx.Rngs(0)))
        assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
        assert isinstance(model.in_blocks, nnx.List) and isinstance(model.out_blocks, nnx.List)


@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3)])
def test_linear_backward_matches_autodiff_and_finite_differences(x64, x_shape):
    """layers._matmul's hand-written backward (the weight gradient contracts the token axes in place) gives
    jax.grad of a plain jnp.dot and central finite differences, in float64, for 2-D and 3-D inputs."""
    from jax.test_util import check_grads

    from uvit_jax.models.layers import _matmul
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float64)
    w = jax.random.normal(kw, (3, 6), jnp.float64)
    g = jax.random.normal(kg, (*x_shape[:-1], 6), jnp.float64)  # a random output cotangent
    loss = lambda matmul: lambda x, w: jnp.sum(g * matmul(x, w))
    ours = jax.grad(loss(_matmul), argnums=(0, 1))(x, w)
    plain = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    check_grads(_matmul, (x, w), order=1, modes=["rev"], eps=1e-6, atol=1e-8, rtol=1e-8)
