"""The Stable-Diffusion KL-f8 autoencoder: official `libs/autoencoder.py` `FrozenAutoencoderKL` (the CompVis LDM
Encoder/Decoder; docs/official_behaviour.md §6.2-6.3), frozen, in Flax NNX.

Attribute names follow the official state dict (`encoder.down.0.block.1.conv1`, `encoder.mid.attn_1.q`,
`decoder.up.3.upsample.conv`, `quant_conv`, ...) so that conversion is a structural rename; leaves are `kernel`
(Conv, HWIO), `bias` and `scale` (GroupNorm). Images are NHWC in [-1, 1]; latents and moments are NHWC.

Numerics: GroupNorm(32 groups, eps 1e-6) statistics and the attention softmax run in at least float32; convs and
matmuls compute in `dtype` (default float32) with parameters stored in `param_dtype`. On GPU and TPU, XLA runs
float32 convs and matmuls with TF32 / bf16 passes by default (errors ~1e-3): where parity with the official
float32 outputs matters (latent extraction, converter checks) call the methods under
`jax.default_matmul_precision("highest")`. On CPU that is already the behaviour.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from uvit_jax.models.layers import Conv, KeySeq

GN_GROUPS, GN_EPS = 32, 1e-6  # the official Normalize(): GroupNorm(32, eps=1e-6, affine=True)
LOGVAR_RANGE = (-30.0, 20.0)  # the official posterior clamps the log-variance

# `libs.autoencoder.get_model`: the SD KL-f8 autoencoder behind every latent U-ViT (83,653,863 parameters).
KL_F8_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0)
KL_F8_EMBED_DIM = 4

_DDCONFIG_KEYS = frozenset(KL_F8_DDCONFIG)


def check_ddconfig(ddconfig: Mapping) -> dict:
    """The official `ddconfig` as a plain dict; a missing or unknown key, or double_z False, raises a ValueError.

    (The official Encoder/Decoder silently ignore unknown keys; a typo here would build another network.)
    """
    ddconfig = dict(ddconfig.to_dict() if hasattr(ddconfig, "to_dict") else ddconfig)  # also a ConfigDict
    missing, unknown = sorted(_DDCONFIG_KEYS - set(ddconfig)), sorted(set(ddconfig) - _DDCONFIG_KEYS)
    if missing or unknown:
        raise ValueError(f"ddconfig: missing keys {missing}, unknown keys {unknown}; expected exactly "
                         f"{sorted(_DDCONFIG_KEYS)}")
    if not ddconfig["double_z"]:
        raise ValueError("ddconfig double_z must be True (the official FrozenAutoencoderKL asserts it: the "
                         "encoder outputs [mean | logvar])")
    return ddconfig


def posterior_sample(moments: jax.Array, noise: jax.Array, scale_factor: float) -> jax.Array:
    """Official posterior draw: scale_factor * (mean + exp(0.5 * clip(logvar, -30, 20)) * noise).

    moments: (..., 2 * embed_dim) = [mean | logvar] (channels last); noise: standard normal, shaped like mean.
    """
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))
    return scale_factor * (mean + std * noise)


class GroupNorm(nnx.Module):
    """nn.GroupNorm(32, C, eps=1e-6) on NHWC: groups are contiguous channel blocks; statistics in >= float32."""

    def __init__(self, channels: int, *, dtype, param_dtype):
        if channels % GN_GROUPS:
            raise ValueError(f"GroupNorm needs channels divisible by {GN_GROUPS}, got {channels}")
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = x.astype(jnp.promote_types(self.dtype, jnp.float32)).reshape(b, h, w, GN_GROUPS, c // GN_GROUPS)
        mean = g.mean((1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean((1, 2, 4), keepdims=True)  # two-pass, biased, like torch
        y = ((g - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
    """norm1 → swish → conv1 → norm2 → swish → conv2, plus the input (through a 1×1 `nin_shortcut` when the
    channel count changes). No time embedding (temb_channels 0); dropout is off in the frozen model."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype, param_dtype, keys: KeySeq):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(in_ch, **kw)
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1, keys=keys, **kw)
        self.norm2 = GroupNorm(out_ch, **kw)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1, keys=keys, **kw)
        self.nin_shortcut = Conv(in_ch, out_ch, 1, keys=keys, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all h·w positions: GroupNorm, 1×1-conv q/k/v, softmax(q kᵀ · C^-½) over the
    keys, 1×1-conv proj_out, residual. (k.bias shifts every score of a query equally, so it has no effect.)"""

    def __init__(self, ch: int, *, dtype, param_dtype, keys: KeySeq):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(ch, **kw)
        self.q = Conv(ch, ch, 1, keys=keys, **kw)
        self.k = Conv(ch, ch, 1, keys=keys, **kw)
        self.v = Conv(ch, ch, 1, keys=keys, **kw)
        self.proj_out = Conv(ch, ch, 1, keys=keys, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(x)
        b, hh, ww, c = h.shape
        q, k, v = (f(h).reshape(b, hh * ww, c) for f in (self.q, self.k, self.v))
        acc = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=acc) * c ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, hh, ww, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Zero-pad one row at the bottom and one column at the right, then a 3×3 stride-2 conv (no padding)."""

    def __init__(self, ch: int, *, dtype, param_dtype, keys: KeySeq):
        self.conv = Conv(ch, ch, 3, stride=2, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour ×2 (F.interpolate(scale_factor=2.0)), then a 3×3 conv."""

    def __init__(self, ch: int, *, dtype, param_dtype, keys: KeySeq):
        self.conv = Conv(ch, ch, 3, padding=1, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class _Level(nnx.Module):
    """One resolution: `block` (ResnetBlocks, in_ch → out_ch), each followed by its `attn` when the level is in
    attn_resolutions (the official `attn` list is empty otherwise)."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, with_attn: bool, kw: dict):
        self.block = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **kw) for i in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(out_ch, **kw) for _ in range(num_blocks)] if with_attn else [])

    def _blocks(self, h: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Down(_Level):
    """Encoder level `down.{i}`: blocks, then `downsample` (every level but the last)."""

    def __init__(self, in_ch, out_ch, num_blocks, *, with_attn: bool, downsample: bool, kw: dict):
        super().__init__(in_ch, out_ch, num_blocks, with_attn, kw)
        self.downsample = Downsample(out_ch, **kw) if downsample else None

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self._blocks(h)
        return h if self.downsample is None else self.downsample(h)


class Up(_Level):
    """Decoder level `up.{i}`: num_res_blocks + 1 blocks, then `upsample` (every level but 0)."""

    def __init__(self, in_ch, out_ch, num_blocks, *, with_attn: bool, upsample: bool, kw: dict):
        super().__init__(in_ch, out_ch, num_blocks, with_attn, kw)
        self.upsample = Upsample(out_ch, **kw) if upsample else None

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self._blocks(h)
        return h if self.upsample is None else self.upsample(h)


class Mid(nnx.Module):
    """`mid`: block_1 → attn_1 → block_2 at the lowest resolution."""

    def __init__(self, ch: int, kw: dict):
        self.block_1 = ResnetBlock(ch, ch, **kw)
        self.attn_1 = AttnBlock(ch, **kw)
        self.block_2 = ResnetBlock(ch, ch, **kw)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nnx.Module):
    """conv_in → down.0 … down.{L-1} → mid → norm_out → swish → conv_out (2·z_channels: [mean | logvar])."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 kw: dict):
        nlev, chans, res, down = len(ch_mult), [ch] + [ch * m for m in ch_mult], resolution, []
        self.conv_in = Conv(in_channels, ch, 3, padding=1, **kw)
        for i in range(nlev):
            down.append(Down(chans[i], chans[i + 1], num_res_blocks, with_attn=res in attn_resolutions,
                             downsample=i != nlev - 1, kw=kw))
            res = res // 2 if i != nlev - 1 else res
        self.down = nnx.List(down)
        self.mid = Mid(chans[-1], kw)
        self.norm_out = GroupNorm(chans[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = Conv(chans[-1], 2 * z_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    """conv_in → mid → up.{L-1} … up.0 (run in reverse index order) → norm_out → swish → conv_out."""

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 kw: dict):
        nlev = len(ch_mult)
        block_in, res = ch * ch_mult[-1], resolution // 2 ** (nlev - 1)
        self.conv_in = Conv(z_channels, block_in, 3, padding=1, **kw)
        self.mid = Mid(block_in, kw)
        up = {}
        for i in reversed(range(nlev)):  # in data order (deepest first): each level's input is the previous output
            up[i] = Up(block_in, ch * ch_mult[i], num_res_blocks + 1, with_attn=res in attn_resolutions,
                       upsample=i != 0, kw=kw)
            block_in, res = ch * ch_mult[i], res * 2 if i != 0 else res
        self.up = nnx.List([up[i] for i in range(nlev)])  # indexed by level: up[0] is the full resolution
        self.norm_out = GroupNorm(block_in, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = Conv(block_in, out_ch, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class FrozenAutoencoderKL(nnx.Module):
    """The official FrozenAutoencoderKL(ddconfig, embed_dim, scale_factor): encoder + quant_conv (1×1,
    2·z_channels → 2·embed_dim), post_quant_conv (1×1, embed_dim → z_channels) + decoder.

    Methods (NHWC; outputs in the input's dtype, computation in `dtype`):
      encode_moments(x)  images (B, H, W, in_channels) → moments (B, H/f, W/f, 2·embed_dim) = [mean | logvar]
      sample(moments, key) → scaled latent z = scale_factor · (mean + std · n)
      encode(x, key)     sample(encode_moments(x), key)
      decode(z)          scaled latent → images: decoder(post_quant_conv(z / scale_factor))
    Parameters are initialised like PyTorch's defaults; real use loads weights with
    `uvit_jax.convert.autoencoder_from_official`.
    """

    def __init__(self, ddconfig: Mapping, embed_dim: int, scale_factor: float = 0.18215, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = check_ddconfig(ddconfig)
        self.embed_dim, self.scale_factor, self.in_channels = embed_dim, scale_factor, cfg["in_channels"]
        self.dtype = dtype
        keys = KeySeq(rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        arch = dict(ch=cfg["ch"], ch_mult=tuple(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
                    attn_resolutions=tuple(cfg["attn_resolutions"]), resolution=cfg["resolution"],
                    z_channels=cfg["z_channels"], kw=kw)
        self.encoder = Encoder(in_channels=cfg["in_channels"], **arch)
        self.decoder = Decoder(out_ch=cfg["out_ch"], **arch)
        self.quant_conv = Conv(2 * cfg["z_channels"], 2 * embed_dim, 1, **kw)
        self.post_quant_conv = Conv(embed_dim, cfg["z_channels"], 1, **kw)

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """Images NHWC in [-1, 1] → moments [mean | logvar] (B, H/8, W/8, 2·embed_dim for KL-f8)."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, H, W, {self.in_channels}) (NHWC), got {x.shape}")
        return self.quant_conv(self.encoder(x)).astype(x.dtype)

    def sample(self, moments: jax.Array, key: jax.Array) -> jax.Array:
        """A posterior draw, scaled: scale_factor · (mean + exp(½·clip(logvar, -30, 20)) · n), n ~ N(0, I)."""
        noise = jax.random.normal(key, moments.shape[:-1] + (moments.shape[-1] // 2,), moments.dtype)
        return posterior_sample(moments, noise, self.scale_factor)

    def encode(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """Images → a scaled latent drawn from the posterior."""
        return self.sample(self.encode_moments(x), key)

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled latent (B, h, w, embed_dim) → images NHWC, roughly in [-1, 1] (not clipped)."""
        if z.ndim != 4 or z.shape[-1] != self.embed_dim:
            raise ValueError(f"expected latents of shape (B, h, w, {self.embed_dim}) (NHWC), got {z.shape}")
        # (1 / s) * z, not z / s: the official operation, so float32 roundings agree.
        return self.decoder(self.post_quant_conv((1.0 / self.scale_factor) * z)).astype(z.dtype)
