"""Building blocks of U-ViT (docs/official_behaviour.md §1), with the official initialisation (§1.2).

Attribute names follow the official PyTorch modules (`attn.qkv`, `mlp.fc1`, `skip_linear`, ...) so that weight
conversion is a structural rename; leaves are `kernel` (Linear (in, out), Conv HWIO), `bias`, `scale` (LayerNorm),
`embedding`. The small Linear/LayerNorm/Conv/Embedding here replace flax's so that the numerics (torch's eps, exact
GELU, two-pass variance) and the init are explicit, and so that construction draws keys cheaply (see KeySeq).
Images are NHWC. Parameters are stored in `param_dtype`; computation runs in `dtype` (LayerNorm statistics and
the attention softmax are always at least float32).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

LN_EPS = 1e-5  # torch.nn.LayerNorm default (flax's is 1e-6)


def trunc_normal_init(std: float = 0.02, bound: float = 2.0):
    """Normal(0, std²) truncated at ±`bound` ABSOLUTE (timm's trunc_normal_), i.e. effectively untruncated.

    jax's initializer takes its cut-offs in units of std (its default ±2σ would truncate for real)."""
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-bound / std, upper=bound / std)


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
    """nn.Linear with the U-ViT init: kernel (in, out) trunc-normal std .02 (±2 absolute), bias 0.

    `out_sharding` (static, None by default): the sharding the output is constrained to, set on every Linear of a
    network by `pin_activations` (parallel.activation_sharding: FSDP gathers the kernel, not the batch)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype, param_dtype,
                 keys: KeySeq):
        self.dtype = dtype
        self.out_sharding = None
        self.kernel = nnx.Param(trunc_normal_init()(keys(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # Named for remat_policy="dots", which keeps these products and recomputes the rest.
        y = checkpoint_name(_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype)), "linear")
        if self.out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, self.out_sharding)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def pin_activations(model: nnx.Module, sharding: jax.sharding.Sharding | None) -> nnx.Module:
    """`model` with every Linear's output constrained to `sharding` (None: unconstrained); returns `model`."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            module.out_sharding = sharding
    return model


def gelu(x: jax.Array) -> jax.Array:
    """nn.GELU(): x/2 (1 + erf(x/√2)), PyTorch's formula. jax.nn.gelu(approximate=False) writes it with erfc,
    which XLA expands into exponentials and selects: ~3x the cost (13% of a small U-ViT's CPU train step)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w, with the backward pass written out (the same two products as autodiff's).

    With autodiff's, XLA:CPU wants the output cotangent transposed for the weight gradient and fuses the whole
    chain of residual-stream cotangents into each transposing copy, recomputing it for every block: ~15% of a
    U-ViT train step on CPU. Written out, the weight gradient contracts the token axis of both operands in place.
    """
    return jnp.dot(x, w)


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    tokens = (((0,), (0,)), ((), ()))
    dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), tokens)
    return jnp.dot(g, w.T), dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


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


@dataclasses.dataclass(frozen=True)
class Precision:
    """Which parts of a U-ViT stay float32 when the compute dtype (matmul inputs) is lower, e.g. bfloat16.

    LayerNorm statistics and the attention logits/softmax are float32 in every case. The official runs (fp16
    autocast) keep the residual stream float32 up to the first long-skip merge ("until_skip": the time/label
    tokens, pos_embed and the in-blocks' residual adds are float32; skip_linear's output is half precision), and
    cast q, k, v to float32 before attention.
      residual     "float32" (the whole residual stream, including the tokens), "until_skip" (the official
                   behaviour) or "compute" (everything in the compute dtype)
      attention    "float32": q, k, v in float32 (the official .float(); rules out cuDNN flash attention), or
                   "compute"
      final_layer  "float32": final norm -> decoder_pred -> 3x3 conv in float32, or "compute"
    """

    residual: str = "float32"
    attention: str = "compute"
    final_layer: str = "float32"

    def __post_init__(self):
        allowed = {"residual": ("float32", "until_skip", "compute"), "attention": ("float32", "compute"),
                   "final_layer": ("float32", "compute")}
        for part, choices in allowed.items():
            if getattr(self, part) not in choices:
                raise ValueError(f"config.precision.{part}: must be one of {choices} "
                                 f"(got {getattr(self, part)!r})")

    def residual_dtype(self, dtype):
        """The dtype the residual stream starts in (float64 compute stays float64)."""
        return jnp.promote_types(dtype, jnp.float32) if self.residual != "compute" else jnp.dtype(dtype)

    def part_dtype(self, part: str, dtype):
        """The compute dtype of `part` ("attention" or "final_layer")."""
        return jnp.promote_types(dtype, jnp.float32) if getattr(self, part) == "float32" else jnp.dtype(dtype)


ATTENTION_CHOICES = ("auto", "xla", "cudnn", "einsum")  # values of the config key `attention`


def resolve_attention(name: str, *, backend: str, dtype, training: bool = True, head_dim: int | None = None) -> str:
    """The attention implementation ("xla", "cudnn" or "einsum") that config `attention=name` runs.

    "auto" picks by backend and compute dtype: cuDNN flash attention on GPU with bf16/fp16 (head dim a multiple
    of 8, <= 128), XLA's fused attention on TPU and GPU float32; on CPU the explicit einsum when `training` (its
    backward pass costs less: a U-ViT-S/2 train step ~10% and a tiny U-ViT's ~19% less CPU time than with XLA's
    attention) and XLA's for sampling (the two forwards are equal within noise); float64 always runs the einsum
    (XLA's softmax is float32).
    "cudnn" asked for where JAX cannot run it raises a ValueError naming the key, backend and dtype.
    """
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"config.attention: must be one of {ATTENTION_CHOICES} (got {name!r})")
    dtype = jnp.dtype(dtype)
    half = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "cudnn":
        # jax.nn.dot_product_attention(implementation="cudnn"): CUDA GPUs, bf16/fp16, head dim % 8 == 0 and
        # <= 256 (Hopper; JAX checks the <= 128 of older GPUs when it lowers).
        if backend not in ("gpu", "cuda") or not half or (head_dim is not None and (head_dim % 8 or head_dim > 256)):
            raise ValueError(
                f"config.attention='cudnn' needs a CUDA GPU backend and bfloat16/float16 compute "
                f"(head dim a multiple of 8, <= 256); got backend {backend!r}, dtype {dtype.name}"
                + (f", head dim {head_dim}" if head_dim is not None else "")
                + ". Use attention='auto' or 'xla'.")
        return name
    if name != "auto":
        return name
    if dtype == jnp.float64 or backend == "cpu":
        return "einsum" if training or dtype == jnp.float64 else "xla"
    if backend in ("gpu", "cuda") and half and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)):
        return "cudnn"
    return "xla"


class Attention(nnx.Module):
    """Multi-head self-attention; qkv channels laid out [q|k|v][head][dh]; no mask, no dropout.

    `attention_impl` (resolved, see `resolve_attention`): "xla" / "cudnn" go to jax.nn.dot_product_attention,
    "einsum" is the same maths written out (logits and softmax in float32, or float64 for float64 compute).
    Float64 compute always takes the einsum path, as XLA's softmax is float32.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False, qk_scale: float | None = None,
                 attention_impl: str = "xla", attention_dtype=None, dtype, param_dtype, keys: KeySeq):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if attention_impl not in ("xla", "cudnn", "einsum"):
            raise ValueError(f"attention_impl must be resolved to 'xla', 'cudnn' or 'einsum' (resolve_attention), "
                             f"got {attention_impl!r}")
        self.num_heads, self.attention_impl = num_heads, attention_impl
        self.attention_dtype = attention_dtype  # None: the compute dtype; float32: the official q, k, v .float()
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.proj = Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        if self.attention_dtype is not None:
            qkv = qkv.astype(self.attention_dtype)
        if self.attention_impl == "einsum" or qkv.dtype == jnp.float64:
            out = _einsum_attention(qkv, self.scale)
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            out = jax.nn.dot_product_attention(q, k, v, scale=self.scale, implementation=self.attention_impl)
        return self.proj(out.reshape(b, n, d))


def _einsum_attention(qkv: jax.Array, scale: float) -> jax.Array:
    """softmax(q kᵀ · scale) v from qkv (B, N, 3, H, dh) → (B, N, H, dh); XLA's numerics, written out."""
    q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))  # (B, H, N, dh) each: batch axes first, as the dots want them
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    probs = jax.nn.softmax(logits * jnp.asarray(scale, logits.dtype), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


class Mlp(nnx.Module):
    """fc1 → exact (erf) GELU → fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, keys: KeySeq):
        self.fc1 = Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc2 = Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block; with `skip=True` a long skip enters first: x ← skip_linear(concat([x, skip]))."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, skip: bool = False, attention_impl: str = "xla",
                 precision: Precision = Precision(), dtype, param_dtype, keys: KeySeq):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.skip_linear = Linear(2 * dim, dim, **kw) if skip else None
        # residual="float32" keeps the stream float32 after a long-skip merge too ("until_skip" does not).
        self.merged_dtype = precision.residual_dtype(dtype) if precision.residual == "float32" else None
        self.norm1 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        attention_dtype = precision.part_dtype("attention", dtype) if precision.attention == "float32" else None
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attention_impl=attention_impl,
                              attention_dtype=attention_dtype, **kw)
        self.norm2 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        if self.skip_linear is not None:
            x = self.skip_linear(jnp.concatenate([x, skip], axis=-1))  # replaces x; no residual around it
            if self.merged_dtype is not None:
                x = x.astype(self.merged_dtype)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
