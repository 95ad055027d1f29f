"""U-ViT for text-to-image: CLIP token embeddings as condition.

The official `libs/uvit_t2i.py` (docs/official_behaviour.md §1).

Call: `model(x, t, context)`, x NHWC (B, H, W, C), t (B,) or a scalar, context (B, num_clip_token, clip_dim).
Token order: [time, context tokens, patches]. No learned null token: the unconditional context is the CLIP
encoding of the empty prompt.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uvit_jax.models.layers import KeySeq, Linear, Precision
from uvit_jax.models.uvit import UViTBase


class UViTT2I(UViTBase):
    """Text-conditional U-ViT: `context_embed` = Linear(clip_dim → D) on each of the num_clip_token tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: float | None = None,
                 mlp_time_embed: bool = False, clip_dim: int = 768, num_clip_token: int = 77, conv: bool = True,
                 skip: bool = True, use_checkpoint: bool = False, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", remat_policy: str | None = None, precision: Precision | None = None,
                 rngs: nnx.Rngs):
        self.clip_dim, self.num_clip_token = clip_dim, num_clip_token
        keys = KeySeq(rngs)
        self._build(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    mlp_time_embed=mlp_time_embed, conv=conv, skip=skip, use_checkpoint=use_checkpoint,
                    extras=1 + num_clip_token, attention_impl=attention_impl, remat_policy=remat_policy,
                    precision=precision, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.context_embed = Linear(clip_dim, embed_dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        """x (B,H,W,C), t (B,) or scalar, context (B, num_clip_token, clip_dim) → eps (B,H,W,C)."""
        self._check_image(x)
        want = (self.num_clip_token, self.clip_dim)
        if context is None or context.ndim != 3 or tuple(context.shape[1:]) != want:
            got = None if context is None else context.shape
            raise ValueError(f"expected context of shape (B, {want[0]}, {want[1]}), got {got}")
        tokens = [self._time_token(t, x.shape[0]), self.context_embed(context.astype(self.dtype)),
                  self.patch_embed(x.astype(self.dtype))]
        return self._trunk_and_head(jnp.concatenate(tokens, axis=1), x.dtype)
