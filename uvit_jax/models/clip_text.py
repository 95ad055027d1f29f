"""CLIP text encoder (`transformers.CLIPTextModel`'s last_hidden_state), as U-ViT's text-to-image features use it.

U-ViT's `libs/clip.py` FrozenCLIPEmbedder runs openai/clip-vit-large-patch14's text tower on 77 ids padded with the
end token and passes NO attention mask, so only the causal mask applies and pad positions are encoded like ordinary
tokens; it keeps all 77 output rows (docs/official_behaviour.md §6.4). The network:
  x = token_embedding[ids] + position_embedding[0:L]
  per layer (pre-LN):  x += out_proj(causal MHA(layer_norm1(x)))   (q/k/v/out with bias, scale head_dim**-0.5)
                       x += fc2(act(fc1(layer_norm2(x))))          (act = quick_gelu: x * sigmoid(1.702 x))
  last_hidden_state = final_layer_norm(x)                          (LayerNorm eps 1e-5 throughout)
Constructor arguments are `transformers.CLIPTextConfig`'s; the defaults are ViT-L/14's text tower (123,060,480
parameters). Attribute names follow the HF modules (`embeddings.token_embedding`, `encoder.layers.{i}.self_attn.
q_proj`, `mlp.fc1`, `final_layer_norm`, ...), so `uvit_jax.convert.clip_text` is a structural rename.

The weights always come from a checkpoint (`uvit_jax.convert.clip_text_from_hf`); the initialisation is only
U-ViT's layers' default. On GPU and TPU, float32 matmuls default to TF32 / bf16 passes: run parity checks and
feature extraction under `jax.default_matmul_precision("highest")`, or the features drift by ~1e-3.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uvit_jax.models.layers import LN_EPS, Embedding, KeySeq, LayerNorm, Linear

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's (ViT-L/14)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
}


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (all with bias); no padding mask."""

    def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, keys: KeySeq):
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {num_heads}")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.q_proj, self.k_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)
        self.v_proj, self.out_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if q.dtype == jnp.float64:
            # jax.nn.dot_product_attention always runs its softmax in float32; keep float64 runs float64 throughout.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
            probs = jax.nn.softmax(jnp.where(jnp.tri(n, dtype=bool), logits, -jnp.inf), axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, scale=self.scale, is_causal=True)
        return self.out_proj(out.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, keys: KeySeq):
        self.act = act
        self.fc1 = Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc2 = Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x += attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    def __init__(self, dim: int, hidden: int, num_heads: int, act: str, *, dtype, param_dtype, keys: KeySeq):
        self.self_attn = CLIPAttention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.layer_norm1 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.mlp = CLIPMLP(dim, hidden, act, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.layer_norm2 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nnx.Module):
    """token_embedding[ids] + position_embedding[0:L]."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, *, dtype, param_dtype, keys: KeySeq):
        self.token_embedding = Embedding(vocab_size, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.position_embedding = Embedding(max_positions, dim, dtype=dtype, param_dtype=param_dtype, keys=keys)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[-1]))


class CLIPEncoder(nnx.Module):
    """The stack of encoder layers (an nnx.List, as HF's `encoder.layers`)."""

    def __init__(self, layers: list[CLIPEncoderLayer]):
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nnx.Module):
    """`model(input_ids)` (B, L) int ids, L <= max_position_embeddings -> last_hidden_state (B, L, hidden_size).

    Arguments as `transformers.CLIPTextConfig`'s (defaults: openai/clip-vit-large-patch14's text tower). Parameters
    are stored in `param_dtype`, computation runs in `dtype` (LayerNorm statistics at least float32).
    """

    def __init__(self, vocab_size: int = 49408, hidden_size: int = 768, intermediate_size: int = 3072,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12, max_position_embeddings: int = 77,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        if layer_norm_eps != LN_EPS:  # the shared LayerNorm has torch's (and CLIP's) eps built in
            raise ValueError(f"layer_norm_eps {layer_norm_eps} is not supported; only {LN_EPS} (CLIP's)")
        self.dtype, self.max_position_embeddings = dtype, max_position_embeddings
        keys = KeySeq(rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings, **kw)
        self.encoder = CLIPEncoder([CLIPEncoderLayer(hidden_size, intermediate_size, num_attention_heads, hidden_act,
                                                     **kw) for _ in range(num_hidden_layers)])
        self.final_layer_norm = LayerNorm(hidden_size, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """(B, L) token ids -> (B, L, hidden_size) last_hidden_state in `dtype`."""
        if input_ids.ndim != 2 or input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"expected input_ids of shape (B, L) with L <= {self.max_position_embeddings}, "
                             f"got {input_ids.shape}")
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
