"""U-ViT for unconditional and class-conditional diffusion (official `libs/uvit.py`, docs/official_behaviour.md §1).

Constructor: the official arguments, then keyword-only `dtype` (compute: matmul inputs), `param_dtype`,
`attention_impl` ("xla", "cudnn" or "einsum"; see layers.resolve_attention), `remat_policy` (see `resolve_remat`),
`precision` (which parts stay float32; layers.Precision) and `rngs`.
Call: `model(x, t, y=None)`, x NHWC (B, H, W, C), t (B,) or a scalar (continuous or discrete timesteps), y (B,) int
labels for class models. Returns the predicted noise, NHWC, in x's dtype (computation runs in `dtype`).
Token order: [label, time, patches] for class models, [time, patches] otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uvit_jax.models.layers import (Block, Conv, Embedding, KeySeq, LayerNorm, Linear, PatchEmbed, Precision,
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
               qk_scale, mlp_time_embed, conv, skip, use_checkpoint, extras, attention_impl, remat_policy, precision,
               dtype, param_dtype, keys):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.extras = embed_dim, extras
        self.use_checkpoint = use_checkpoint
        self.remat_policy = resolve_remat(remat_policy, use_checkpoint)
        self.dtype = dtype
        precision = precision or Precision()
        self.residual_dtype = precision.residual_dtype(dtype)  # the dtype of the tokens and the residual stream
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        num_patches = (img_size // patch_size) ** 2

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **kw)
        self.time_embed = TimeMLP(embed_dim, **kw) if mlp_time_embed else None
        self.pos_embed = nnx.Param(trunc_normal_init()(keys(), (1, extras + num_patches, embed_dim), param_dtype))
        block_kw = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, attention_impl=attention_impl,
                        precision=precision, **kw)
        self.in_blocks = nnx.List([Block(embed_dim, num_heads, **block_kw) for _ in range(depth // 2)])
        self.mid_block = Block(embed_dim, num_heads, **block_kw)
        self.out_blocks = nnx.List([Block(embed_dim, num_heads, skip=skip, **block_kw) for _ in range(depth // 2)])
        head_kw = dict(kw, dtype=precision.part_dtype("final_layer", dtype))
        self.norm = LayerNorm(embed_dim, dtype=head_kw["dtype"], param_dtype=param_dtype)
        self.decoder_pred = Linear(embed_dim, patch_size ** 2 * in_chans, **head_kw)
        self.final_layer = Conv(in_chans, in_chans, 3, padding=1, **head_kw) if conv else None

    def _check_image(self, x: jax.Array) -> None:
        want = (self.img_size, self.img_size, self.in_chans)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected x of shape (B, {want[0]}, {want[1]}, {want[2]}) (NHWC), got {x.shape}")

    def _time_token(self, t: jax.Array, batch: int) -> jax.Array:
        """(B, 1, D) time token in the residual stream's dtype, from a float32 sinusoid."""
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        emb = timestep_embedding(t, self.embed_dim)
        if self.time_embed is not None:
            emb = self.time_embed(emb)
        return emb.astype(self.residual_dtype)[:, None, :]

    def _run_block(self, block: Block, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        if self.remat_policy == "none":
            return block(x, skip)
        graphdef, state = nnx.split(block)
        fn = lambda s, h, sk: nnx.merge(graphdef, s)(h, sk)
        if self.remat_policy == "dots":
            return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names("linear"))(state, x, skip)
        return _remat_in_order(fn)(state, x, skip)

    def _trunk_and_head(self, tokens: jax.Array, out_dtype) -> jax.Array:
        """tokens (B, extras + N, D) without pos_embed → eps (B, H, W, C) in out_dtype."""
        x = tokens.astype(self.residual_dtype) + self.pos_embed[...].astype(self.residual_dtype)
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
                 attention_impl: str = "xla", remat_policy: str | None = None, precision: Precision | None = None,
                 rngs: nnx.Rngs):
        self.num_classes = num_classes
        keys = KeySeq(rngs)
        self._build(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    mlp_time_embed=mlp_time_embed, conv=conv, skip=skip, use_checkpoint=use_checkpoint,
                    extras=2 if num_classes > 0 else 1, attention_impl=attention_impl, remat_policy=remat_policy,
                    precision=precision, dtype=dtype, param_dtype=param_dtype, keys=keys)
        # The label token joins the residual stream (an embedding lookup is not a matmul).
        self.label_emb = (Embedding(num_classes, embed_dim, dtype=self.residual_dtype, param_dtype=param_dtype,
                                    keys=keys) if num_classes > 0 else None)

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



REMAT_POLICIES = ("none", "block", "dots")


def resolve_remat(policy: str | None, use_checkpoint: bool) -> str:
    """The rematerialisation a network runs (config key `remat_policy`; None follows nnet.use_checkpoint).

    "block": each block is recomputed in the backward pass from its inputs (the official use_checkpoint), in
    block order (`_remat_in_order`): the least memory, ~24% more FLOPs per train step. "dots": per block, the
    outputs of the Linear layers are kept and the rest (norms, GELU, attention) recomputed: ~1% more FLOPs, about
    60% of the memory of "none". Compile-only estimates, U-ViT-L/2 bf16 at batch 128 per device: none 78 GiB,
    dots 46 GiB, block 11.8 GiB. Numerically identical to "none" in every case.
    """
    if policy is None:
        return "block" if use_checkpoint else "none"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"config.remat_policy: must be one of {REMAT_POLICIES} or None (got {policy!r})")
    return policy


def _after(tree, deps):
    """`tree` + 0 · (a scalar read from every leaf of `deps`): the same values (for finite deps), but XLA can
    compute nothing from `tree` before `deps` exist. (Optimisation barriers would say this, but XLA:CPU removes
    them before it schedules.)"""
    zero = 0.0 * sum(jnp.ravel(d)[0].astype(jnp.float32) for d in jax.tree.leaves(deps))
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), tree)


def _remat_in_order(fn):
    """fn(state, x, skip) recomputed in the backward pass, block after block.

    jax.checkpoint keeps only the block inputs too, but leaves the compiler free to run every block's
    recomputation at the start of the backward pass and every weight gradient at its end, which keeps all
    activations alive at once (U-ViT-L/2, batch 128: 100 GiB of temporaries with jax.checkpoint, 7.5 GiB
    here). So a block's recomputation waits for its output cotangent, and the input cotangent it passes on
    waits for its weight gradients.
    """
    @jax.custom_vjp
    def run(state, x, skip):
        return fn(state, x, skip)

    def fwd(state, x, skip):
        return fn(state, x, skip), (state, x, skip)

    def bwd(residuals, g):
        state, x, skip = residuals
        x, skip = _after((x, skip), g)
        _, vjp = jax.vjp(fn, state, x, skip)
        d_state, dx, dskip = vjp(g)
        return (d_state, *_after((dx, dskip), d_state))

    run.defvjp(fwd, bwd)
    return run
