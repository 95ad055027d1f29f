"""U-ViT for unconditional and class-conditional diffusion (official `libs/uvit.py`, UVIT_SPEC.md §1).

Constructor: the official arguments, then keyword-only `dtype` (compute), `param_dtype`, `attention_impl`
(None = XLA, "cudnn" = cuDNN flash attention on GPU with bf16/fp16) and `rngs`.
Call: `model(x, t, y=None)`, x NHWC (B, H, W, C), t (B,) or a scalar (continuous or discrete timesteps), y (B,) int
labels for class models. Returns the predicted noise, NHWC, in x's dtype (computation runs in `dtype`).
Token order: [label, time, patches] for class models, [time, patches] otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uvit_jax.models.layers import (Block, Conv, Embedding, KeySeq, LayerNorm, Linear, PatchEmbed,
                                    timestep_embedding, trunc_normal_init, unpatchify)


class TimeMLP(nnx.Module):
    """`mlp_time_embed=True`: Linear(D→4D) → SiLU → Linear(4D→D) (official `time_embed.0` / `time_embed.2`)."""

    def __init__(self, dim: int, *, dtype, param_dtype, keys: KeySeq):
        self.fc1 = Linear(dim, 4 * dim, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc2 = Linear(4 * dim, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(x)))


class UViTBase(nnx.Module):
    """What every U-ViT shares: patch embedding, time token, positional embedding, U-shaped trunk with long skips,
    head (norm → decoder_pred → unpatchify → optional 3×3 conv). Subclasses add their condition tokens."""

    def _build(self, *, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
               qk_scale, mlp_time_embed, conv, skip, use_checkpoint, extras, attention_impl, dtype, param_dtype,
               keys):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.extras = embed_dim, extras
        self.use_checkpoint = use_checkpoint
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        num_patches = (img_size // patch_size) ** 2

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **kw)
        self.time_embed = TimeMLP(embed_dim, **kw) if mlp_time_embed else None
        self.pos_embed = nnx.Param(trunc_normal_init()(keys(), (1, extras + num_patches, embed_dim), param_dtype))
        block_kw = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, attention_impl=attention_impl, **kw)
        self.in_blocks = nnx.List([Block(embed_dim, num_heads, **block_kw) for _ in range(depth // 2)])
        self.mid_block = Block(embed_dim, num_heads, **block_kw)
        self.out_blocks = nnx.List([Block(embed_dim, num_heads, skip=skip, **block_kw) for _ in range(depth // 2)])
        self.norm = LayerNorm(embed_dim, dtype=dtype, param_dtype=param_dtype)
        self.decoder_pred = Linear(embed_dim, patch_size ** 2 * in_chans, **kw)
        self.final_layer = Conv(in_chans, in_chans, 3, padding=1, **kw) if conv else None

    def _check_image(self, x: jax.Array) -> None:
        want = (self.img_size, self.img_size, self.in_chans)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected x of shape (B, {want[0]}, {want[1]}, {want[2]}) (NHWC), got {x.shape}")

    def _time_token(self, t: jax.Array, batch: int) -> jax.Array:
        """(B, 1, D) time token in the compute dtype, from a float32 sinusoid."""
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        emb = timestep_embedding(t, self.embed_dim)
        if self.time_embed is not None:
            emb = self.time_embed(emb)
        return emb.astype(self.dtype)[:, None, :]

    def _run_block(self, block: Block, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        if not self.use_checkpoint:
            return block(x, skip)
        # Rematerialise the block in the backward pass (memory only; numerically identical).
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda s, h, sk: nnx.merge(graphdef, s)(h, sk))(state, x, skip)

    def _trunk_and_head(self, tokens: jax.Array, out_dtype) -> jax.Array:
        """tokens (B, extras + N, D) without pos_embed → eps (B, H, W, C) in out_dtype."""
        x = tokens + self.pos_embed[...].astype(self.dtype)
        skips = []
        for blk in self.in_blocks:
            x = self._run_block(blk, x)
            skips.append(x)
        x = self._run_block(self.mid_block, x)
        for blk in self.out_blocks:
            x = self._run_block(blk, x, skips.pop())  # LIFO: out_blocks[0] gets the last in_block's output
        x = self.decoder_pred(self.norm(x))
        x = unpatchify(x[:, self.extras:], self.patch_size, self.in_chans)
        if self.final_layer is not None:
            x = self.final_layer(x)
        return x.astype(out_dtype)


class UViT(UViTBase):
    """U-ViT, unconditional (`num_classes <= 0`) or class-conditional (label embedding table of `num_classes`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: float | None = None,
                 mlp_time_embed: bool = False, num_classes: int = -1, conv: bool = True, skip: bool = True,
                 use_checkpoint: bool = False, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = None, rngs: nnx.Rngs):
        self.num_classes = num_classes
        keys = KeySeq(rngs)
        self._build(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    mlp_time_embed=mlp_time_embed, conv=conv, skip=skip, use_checkpoint=use_checkpoint,
                    extras=2 if num_classes > 0 else 1, attention_impl=attention_impl, dtype=dtype,
                    param_dtype=param_dtype, keys=keys)
        self.label_emb = (Embedding(num_classes, embed_dim, dtype=dtype, param_dtype=param_dtype, keys=keys)
                          if num_classes > 0 else None)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """x (B,H,W,C), t (B,) or scalar, y (B,) int labels (required iff num_classes > 0) → eps (B,H,W,C)."""
        self._check_image(x)
        if self.label_emb is not None and y is None:
            raise ValueError(f"this U-ViT is class-conditional (num_classes={self.num_classes}): pass labels y; "
                             "for the unconditional branch of CFG pass the null label (the last index)")
        if self.label_emb is None and y is not None:
            raise ValueError("this U-ViT is unconditional (num_classes <= 0) but labels y were given")
        tokens = [self._time_token(t, x.shape[0]), self.patch_embed(x.astype(self.dtype))]
        if self.label_emb is not None:
            tokens.insert(0, self.label_emb(jnp.asarray(y))[:, None, :])  # [label, time, patches]
        return self._trunk_and_head(jnp.concatenate(tokens, axis=1), x.dtype)
