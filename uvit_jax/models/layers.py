"""Building blocks of U-ViT (UVIT_SPEC.md §1), with the official initialisation (§1.2).

Attribute names follow the official PyTorch modules (`attn.qkv`, `mlp.fc1`, `skip_linear`, ...) so that weight
conversion is a structural rename; leaves are `kernel` (Linear (in, out), Conv HWIO), `bias`, `scale` (LayerNorm),
`embedding`. The small Linear/LayerNorm/Conv/Embedding here replace flax's so that the numerics (torch's eps, exact
GELU, two-pass variance) and the init are explicit, and so that construction draws keys cheaply (see KeySeq).
Images are NHWC. Parameters are stored in `param_dtype`; computation runs in `dtype` (LayerNorm statistics and
the attention softmax are always at least float32).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5  # torch.nn.LayerNorm default (flax's is 1e-6)


def trunc_normal_init(std: float = 0.02, bound: float = 2.0):
    """Normal(0, std²) truncated at ±`bound` ABSOLUTE (timm's trunc_normal_), i.e. effectively untruncated."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, dtype)

    return init


def torch_uniform_init(fan_in: int):
    """U(±1/sqrt(fan_in)): PyTorch's default for conv biases (and, via kaiming_uniform(a=√5), conv weights)."""
    limit = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal time features [cos | sin] (+ a zero column for odd dim), always in float32 like the official code.

    t: (B,) timesteps, may be fractional. Returns (B, dim) float32.
    """
    half = dim // 2
    # Same operation order as the official code, so the float32 roundings agree.
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class KeySeq:
    """Deterministic stream of init keys: fold_in(key, 0), fold_in(key, 1), ...

    Plain Python (never stored on a module). Drawing from one `nnx.Rngs` per parameter costs ~6 ms each under
    tracing in flax 0.12 (its counter update builds an error message), which made eval_shape of the large
    presets take seconds; here one key is drawn from the Rngs and split locally.
    """

    def __init__(self, rngs: nnx.Rngs):
        self._key, self._count = rngs.params(), 0

    def __call__(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count - 1)


class Linear(nnx.Module):
    """nn.Linear with the U-ViT init: kernel (in, out) trunc-normal std .02 (±2 absolute), bias 0."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype, param_dtype,
                 keys: KeySeq):
        self.dtype = dtype
        self.kernel = nnx.Param(trunc_normal_init()(keys(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """nn.LayerNorm(dim): eps 1e-5, scale 1, bias 0; statistics in float32 (or float64), two-pass variance."""

    def __init__(self, dim: int, *, dtype, param_dtype):
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.promote_types(self.dtype, jnp.float32))
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)
        return y.astype(self.dtype)


class Conv(nnx.Module):
    """nn.Conv2d on NHWC data, HWIO kernel, PyTorch default init: kaiming-uniform(a=√5) = U(±1/√fan_in) weight,
    U(±1/√fan_in) bias (the official custom init leaves convs alone)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, *, stride: int = 1, padding: int = 0, dtype,
                 param_dtype, keys: KeySeq):
        self.dtype, self.stride, self.padding = dtype, stride, padding
        init = torch_uniform_init(in_chans * kernel * kernel)
        self.kernel = nnx.Param(init(keys(), (kernel, kernel, in_chans, out_chans), param_dtype))
        self.bias = nnx.Param(init(keys(), (out_chans,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         (self.stride, self.stride), [(self.padding, self.padding)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class Embedding(nnx.Module):
    """nn.Embedding(num, dim) with PyTorch's default N(0, 1) init (untouched by the official custom init)."""

    def __init__(self, num: int, dim: int, *, dtype, param_dtype, keys: KeySeq):
        self.dtype = dtype
        self.embedding = nnx.Param(jax.random.normal(keys(), (num, dim), param_dtype))

    def __call__(self, idx: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], idx, axis=0).astype(self.dtype)


class PatchEmbed(nnx.Module):
    """Conv2d(C→D, kernel = stride = p) then flatten the (H/p)×(W/p) grid in raster order: (B,H,W,C) → (B,N,D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype, param_dtype, keys: KeySeq):
        self.proj = Conv(in_chans, embed_dim, patch_size, stride=patch_size, dtype=dtype, param_dtype=param_dtype,
                         keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """(B, N, p·p·C) tokens → (B, H, W, C).

    Token (i, j) of the raster grid, channel (p1·p + p2)·C + c goes to pixel (i·p + p1, j·p + p2), channel c.
    """
    b, n, _ = x.shape
    h = w = int(round(math.sqrt(n)))
    if h * w != n:
        raise ValueError(f"unpatchify needs a square token grid, got {n} tokens")
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch_size, w * patch_size, channels)


class Attention(nnx.Module):
    """Multi-head self-attention; qkv channels laid out [q|k|v][head][dh]; no mask, no dropout.

    `attention_impl` goes to jax.nn.dot_product_attention: None/"xla" (XLA; softmax in float32), or "cudnn"
    (cuDNN flash attention: GPU, bf16/fp16 only).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False, qk_scale: float | None = None,
                 attention_impl: str | None = None, dtype, param_dtype, keys: KeySeq):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attention_impl = num_heads, attention_impl
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.proj = Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if q.dtype == jnp.float64:
            # jax.nn.dot_product_attention always runs its softmax in float32; keep float64 runs float64 throughout.
            probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, scale=self.scale, implementation=self.attention_impl)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 → exact (erf) GELU → fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, keys: KeySeq):
        self.fc1 = Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc2 = Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block; with `skip=True` a long skip enters first: x ← skip_linear(concat([x, skip]))."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, skip: bool = False, attention_impl: str | None = None, dtype,
                 param_dtype, keys: KeySeq):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.skip_linear = Linear(2 * dim, dim, **kw) if skip else None
        self.norm1 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attention_impl=attention_impl,
                              **kw)
        self.norm2 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        if self.skip_linear is not None:
            x = self.skip_linear(jnp.concatenate([x, skip], axis=-1))  # replaces x; no residual around it
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
