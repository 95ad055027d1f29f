"""Hugging Face CLIP checkpoints (openai/clip-vit-large-patch14) -> our CLIPTextModel (text tower only).

Files: `model.safetensors` (read with `safetensors.numpy`) or `pytorch_model.bin` (torch zip format, read without
torch by `uvit_jax.convert.pth`), or a directory holding one of them, or a dict of arrays. Key layouts:
  * CLIPModel: `text_model.embeddings.token_embedding.weight`, ..., plus the image tower and the heads
    (`vision_model.*`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`), which are ignored;
  * CLIPTextModel: the same `text_model.*` keys alone, or without the `text_model.` prefix.
`embeddings.position_ids` (a buffer some transformers versions save) is ignored too. Our module attributes carry the
HF names, so a key is our parameter path joined by "." with the leaf renamed (kernel/scale/embedding -> weight);
Linear weights are (out, in) -> kernel (in, out). Strict: a missing or unexpected text-tower key, or a shape
mismatch, is a ValueError naming the key (as the file spells it) and both shapes.
"""
from __future__ import annotations

import inspect
import os
import struct
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx, traverse_util

from uvit_jax import console
from uvit_jax.convert.keys import key_mismatch
from uvit_jax.convert.pth import load_state_dict
from uvit_jax.models.clip_text import CLIPTextModel

PREFIX = "text_model."
# A full CLIPModel's keys outside the text tower; U-ViT uses last_hidden_state only.
_OTHER_TOWER_PREFIX = "vision_model."
_OTHER_HEADS = {"visual_projection.weight", "text_projection.weight", "logit_scale"}
_BUFFER = "embeddings.position_ids"  # arange(77): derived, not learned
# CLIPTextConfig fields that do not change last_hidden_state at inference: accepted and dropped.
_NON_ARCH_CONFIG = {"projection_dim", "attention_dropout", "dropout", "initializer_range", "initializer_factor",
                    "pad_token_id", "bos_token_id", "eos_token_id"}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _is_safetensors(path: str) -> bool:
    """A safetensors file: 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def load_hf_state_dict(source) -> dict[str, np.ndarray]:
    """State dict from a dict of arrays, a safetensors / torch / npz file, or a HF snapshot directory."""
    if isinstance(source, Mapping):
        return load_state_dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in _HF_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise console.MissingFileError(f"{path} holds none of {list(_HF_FILES)}")
        path = found[0]
    if os.path.isfile(path) and _is_safetensors(path):
        return safetensors.numpy.load_file(path)
    return load_state_dict(path)


def text_tower(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """Split a CLIP / CLIPText state dict: (text-tower tensors keyed without `text_model.`, the prefix the file
    uses ("text_model." or ""), keys outside that prefix that are neither ignored nor in the tower).

    The image tower, the projection heads and the position_ids buffer are dropped.
    """
    keys = [k for k in state_dict if not k.startswith(_OTHER_TOWER_PREFIX) and k not in _OTHER_HEADS]
    prefix = PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
    tower = {k[len(prefix):]: state_dict[k] for k in keys if k.startswith(prefix)}
    tower.pop(_BUFFER, None)
    return tower, prefix, sorted(k for k in keys if not k.startswith(prefix))


def hf_key(path: tuple) -> str:
    """HF key of a path: ('encoder', 'layers', 0, 'mlp', 'fc1', 'kernel') -> 'encoder.layers.0.mlp.fc1.weight'"""
    return ".".join(map(str, path[:-1] + (_LEAF_TO_TORCH[path[-1]],)))


def split_config(config_kwargs: Mapping) -> dict:
    """CLIPTextConfig kwargs -> CLIPTextModel kwargs: fields irrelevant to last_hidden_state dropped, others checked."""
    params = inspect.signature(CLIPTextModel.__init__).parameters
    allowed = {k for k, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD and k != "self"}
    unknown = sorted(set(config_kwargs) - allowed - _NON_ARCH_CONFIG)
    if unknown:
        raise ValueError(f"unknown CLIP text config option(s) {unknown}; allowed: {sorted(allowed | _NON_ARCH_CONFIG)}")
    return {k: v for k, v in config_kwargs.items() if k in allowed}


def _abstract_model(config: Mapping, dtype, param_dtype) -> CLIPTextModel:
    return nnx.eval_shape(lambda: CLIPTextModel(**config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def params_from_hf(state_dict_or_path, config: Mapping | None = None, *, param_dtype=np.float32) -> dict:
    """HF CLIP checkpoint (see the module docstring) -> our pure params dict of numpy arrays.

    `config`: CLIPTextConfig kwargs (default: ViT-L/14's text tower). Strict: raises ValueError naming missing /
    unexpected keys, or the key and both shapes on a mismatch.
    """
    config = split_config(config or {})
    tower, prefix, stray = text_tower(load_hf_state_dict(state_dict_or_path))
    abstract = _abstract_model(config, jnp.float32, jnp.float32)
    target = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    expected = {hf_key(path): path for path in target}
    # Keys as the file spells them: with its prefix, and the stray keys outside that prefix.
    mismatch = key_mismatch([prefix + k for k in expected], [prefix + k for k in tower] + stray)
    if mismatch:
        raise ValueError(f"checkpoint does not match the CLIP text encoder {config}: {mismatch}")
    flat = {}
    for key, path in expected.items():
        value = np.asarray(tower[key])
        want = tuple(target[path].shape)
        torch_want = want[::-1] if path[-1] == "kernel" else want
        if value.shape != torch_want:
            raise ValueError(f"shape mismatch for {prefix + key!r}: checkpoint has {value.shape}, the network "
                             f"expects {torch_want}")
        flat[path] = (value.T if path[-1] == "kernel" else value).astype(param_dtype)
    return traverse_util.unflatten_dict(flat)


def clip_text_from_hf(state_dict_or_path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      **config_kwargs) -> CLIPTextModel:
    """A CLIPTextModel (compute `dtype`, params `param_dtype`) holding the text tower of a HF CLIP checkpoint.

    `config_kwargs`: transformers.CLIPTextConfig's (defaults: openai/clip-vit-large-patch14). float64 needs
    jax_enable_x64. On GPU/TPU run the model under `jax.default_matmul_precision("highest")` (see models.clip_text).
    """
    config = split_config(config_kwargs)
    params = params_from_hf(state_dict_or_path, config, param_dtype=param_dtype)
    graphdef, state = nnx.split(_abstract_model(config, dtype, param_dtype))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, param_dtype), params))
    return nnx.merge(graphdef, state)
