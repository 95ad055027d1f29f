"""Attention implementations (config key `attention`): same outputs and gradients, choice per backend, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uvit_jax.models import ATTENTION_CHOICES, build_model, init_params, make_apply, resolve_attention
from uvit_jax.models.layers import Attention, KeySeq

TINY = dict(name="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_implementations_agree_float32():
    """xla and einsum (cuDNN has no float32: its bf16 agreement is checked on GPU below)."""
    params = init_params(TINY, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    t, y = jnp.array([10.0, 500.0, 990.0]), jnp.array([0, 4, 9])
    outs, grads = {}, {}
    for name in ("xla", "einsum"):
        apply = make_apply(TINY, attention_impl=name, training=True)
        outs[name] = jax.jit(apply)(params, x, t, y)
        grads[name] = jax.jit(jax.grad(lambda p: jnp.mean(apply(p, x, t, y) ** 2)))(params)
    assert rel_err(outs["einsum"], outs["xla"]) <= 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads["einsum"], grads["xla"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_matches_xla_bfloat16():
    params = init_params(TINY, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    t, y = jnp.full((4,), 300.0), jnp.arange(4)
    out = {name: jax.jit(make_apply(TINY, dtype=jnp.bfloat16, attention_impl=name))(params, x, t, y)
           for name in ("xla", "cudnn")}
    assert rel_err(out["cudnn"], out["xla"]) <= 2e-2


def test_float64_stays_float64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        for name in ("xla", "einsum"):
            attn = Attention(8, 2, attention_impl=name, dtype=jnp.float64, param_dtype=jnp.float64,
                             keys=KeySeq(nnx.Rngs(0)))
            x = jax.random.normal(jax.random.key(1), (2, 5, 8), jnp.float64)
            assert attn(x).dtype == jnp.float64
            # Double-precision softmax: a float32 softmax would leave ~1e-8 differences to the reference.
            qkv = np.asarray(x @ attn.qkv.kernel[...]).reshape(2, 5, 3, 2, 4)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            logits = np.einsum("bqhd,bkhd->bhqk", q, k) * 4 ** -0.5
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            ref = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v).reshape(2, 5, 8)
            ref = ref @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])
            assert rel_err(attn(x), ref) < 1e-12
    finally:
        jax.config.update("jax_enable_x64", before)


def test_auto_choice_per_backend_and_dtype():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_attention("auto", backend="gpu", dtype=bf16, head_dim=64) == "cudnn"
    assert resolve_attention("auto", backend="gpu", dtype=bf16, head_dim=72) == "cudnn"  # U-ViT-H: 1152 / 16
    assert resolve_attention("auto", backend="gpu", dtype=bf16, head_dim=160) == "xla"  # over Ampere's 128
    assert resolve_attention("auto", backend="gpu", dtype=f32) == "xla"
    assert resolve_attention("auto", backend="tpu", dtype=bf16) == "xla"
    assert resolve_attention("auto", backend="cpu", dtype=f32, training=True) == "einsum"
    assert resolve_attention("auto", backend="cpu", dtype=f32, training=False) == "xla"
    for name in ("xla", "einsum"):
        assert resolve_attention(name, backend="tpu", dtype=bf16) == name
    assert resolve_attention("cudnn", backend="gpu", dtype=bf16, head_dim=64) == "cudnn"
    assert set(ATTENTION_CHOICES) == {"auto", "xla", "cudnn", "einsum"}


def test_cudnn_where_unsupported_is_a_clear_error():
    with pytest.raises(ValueError, match=r"config.attention='cudnn'.*backend 'cpu', dtype float32"):
        resolve_attention("cudnn", backend="cpu", dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"config.attention='cudnn'.*backend 'gpu', dtype float32"):
        resolve_attention("cudnn", backend="gpu", dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"head dim 12"):
        resolve_attention("cudnn", backend="gpu", dtype=jnp.bfloat16, head_dim=12)
    with pytest.raises(ValueError, match=r"config.attention: must be one of"):
        resolve_attention("flash", backend="gpu", dtype=jnp.bfloat16)
    if jax.default_backend() == "cpu":  # what a user asking for cuDNN on a CPU run sees, before any compile
        with pytest.raises(ValueError, match=r"config.attention='cudnn'.*backend 'cpu', dtype bfloat16"):
            make_apply(TINY, dtype=jnp.bfloat16, attention_impl="cudnn")
        with pytest.raises(ValueError, match=r"config.attention='cudnn'"):
            build_model(TINY, attention_impl="cudnn", rngs=None)
