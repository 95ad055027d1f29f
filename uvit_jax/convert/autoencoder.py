"""KL-f8 autoencoder checkpoints <-> our `FrozenAutoencoderKL`, without torch (docs/official_behaviour.md §6.2-6.3).

Two layouts are read:
- CompVis / U-ViT (`assets/stable-diffusion/autoencoder_kl.pth`, `autoencoder_kl_ema.pth`): our attribute paths
  joined with "." (leaf kernel/scale -> weight), Conv2d weights OIHW <-> kernel HWIO.
- diffusers (`stabilityai/sd-vae-ft-ema`, `sd-vae-ft-mse`: `diffusion_pytorch_model.safetensors`): renamed to the
  CompVis names first (`_diffusers_to_compvis`), the mid-block attention's Linear (O, I) weights reshaped to the
  1×1-conv (O, I, 1, 1); then the CompVis path.

Conversion is strict, like the official loader (`load_state_dict` + `assert len(m) == 0 and len(u) == 0`): a
missing, unknown or mis-shaped key is refused, naming the key (and both shapes). The one exception: keys under
`loss.` (the LPIPS / discriminator of the CompVis LDM training checkpoints of this autoencoder) are dropped; they
are not part of the network, and U-ViT's own files hold none.

Float32 parity on GPU/TPU needs `jax.default_matmul_precision("highest")` around the calls (see
`uvit_jax.models.autoencoder`).
"""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx, traverse_util

from uvit_jax.convert.keys import params_from_state_dict, to_torch_layout
from uvit_jax.convert.pth import load_state_dict
from uvit_jax.models.autoencoder import FrozenAutoencoderKL, check_ddconfig

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_IGNORED_PREFIX = "loss."
# Order of the official state dict (each module's submodules in registration order).
_OFFICIAL_ORDER = ["encoder", "decoder", "quant_conv", "post_quant_conv", "conv_in", "down", "mid", "up", "norm_out",
                   "conv_out", "block", "attn", "downsample", "upsample", "block_1", "attn_1", "block_2", "norm1",
                   "conv1", "norm2", "conv2", "nin_shortcut", "norm", "q", "k", "v", "proj_out", "conv", "weight",
                   "bias"]

# diffusers -> CompVis renames of one attention block's children (newer names | the pre-0.14 ones).
_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
                   "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_DIFFUSERS_MARKERS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_norm_out.")


def official_key(path: tuple) -> str:
    """Our parameter path -> CompVis key, e.g. ('decoder', 'up', 3, 'upsample', 'conv', 'kernel') ->
    'decoder.up.3.upsample.conv.weight'."""
    return ".".join([str(p) for p in path[:-1]] + [_LEAF_TO_TORCH[path[-1]]])


def _official_sort_key(key: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, _OFFICIAL_ORDER.index(p)) for p in key.split("."))


def _abstract_model(ddconfig, embed_dim, scale_factor=1.0, dtype=jnp.float32, param_dtype=jnp.float32):
    return nnx.eval_shape(lambda: FrozenAutoencoderKL(ddconfig, embed_dim, scale_factor, dtype=dtype,
                                                      param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def _diffusers_key(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key -> its CompVis name (unknown names come back unchanged, to be refused)."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key
    part, rest = m.groups()
    for pattern, repl in [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", r"down.\1.block.\2.\3"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", r"down.\1.attn.\2.\3"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", r"down.\1.downsample.\2"),
        # diffusers numbers the decoder's up blocks in data order: up_blocks[i] is CompVis up[L-1-i].
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda g: f"up.{num_levels - 1 - int(g[1])}.block.{g[2]}.{g[3]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda g: f"up.{num_levels - 1 - int(g[1])}.attn.{g[2]}.{g[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", lambda g: f"up.{num_levels - 1 - int(g[1])}.upsample.{g[2]}"),
        (r"mid_block\.resnets\.([01])\.(.+)", lambda g: f"mid.block_{int(g[1]) + 1}.{g[2]}"),
        (r"mid_block\.attentions\.0\.(.+)", r"mid.attn_1.\1"),
        (r"conv_norm_out\.(.+)", r"norm_out.\1"),
    ]:
        new, n = re.subn(f"^{pattern}$", repl, rest)
        if n:
            rest = new
            break
    rest = re.sub(r"(block\.\d+\.)conv_shortcut\.", r"\1nin_shortcut.", rest)
    attn = re.fullmatch(r"(.*attn(?:_1|\.\d+)\.)(group_norm|to_[qkv]|query|key|value|to_out\.0|proj_attn)\.(\w+)",
                        rest)
    if attn:
        rest = f"{attn[1]}{_DIFFUSERS_ATTN[attn[2]]}.{attn[3]}"
    return f"{part}.{rest}"


def is_diffusers_layout(state_dict: Mapping) -> bool:
    """True when the keys are diffusers AutoencoderKL names (down_blocks / up_blocks / mid_block / conv_norm_out)."""
    return any(marker in k for k in state_dict for marker in _DIFFUSERS_MARKERS)


def _diffusers_to_compvis(sd: Mapping[str, np.ndarray], num_levels: int) -> tuple[dict, dict]:
    """(CompVis-named state dict, {CompVis name: diffusers name}); attention Linear weights become 1×1 convs."""
    out, origin = {}, {}
    for key, value in sd.items():
        new = _diffusers_key(key, num_levels)
        if re.search(r"attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (O, I) -> Conv2d (O, I, 1, 1)
        if new in out:
            raise ValueError(f"checkpoint holds both {origin[new]!r} and {key!r} (the same weight in the two "
                             "diffusers attention namings)")
        out[new], origin[new] = value, key
    return out, origin


def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def load_autoencoder_state_dict(source) -> dict[str, np.ndarray]:
    """State dict from a mapping, a `.safetensors` file (diffusers), a `.pth` or an `.npz` (dispatch on contents)."""
    if not isinstance(source, Mapping) and os.path.isfile(os.fspath(source)) and _is_safetensors(os.fspath(source)):
        return safetensors.numpy.load_file(os.fspath(source))
    return load_state_dict(source)


def autoencoder_params_from_official(state_dict_or_path, *, ddconfig: Mapping, embed_dim: int,
                                     param_dtype=np.float32) -> dict:
    """Official KL autoencoder weights (CompVis or diffusers layout: a mapping or a .pth / .safetensors / .npz
    path) -> our pure params dict of numpy arrays. Strict: see the module docstring."""
    sd = load_autoencoder_state_dict(state_dict_or_path)
    origin: dict[str, str] = {}
    if is_diffusers_layout(sd):
        sd, origin = _diffusers_to_compvis(sd, len(check_ddconfig(ddconfig)["ch_mult"]))
    sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIX)}

    def name(k):  # errors name the key as the file spells it
        return f"{k!r} (diffusers {origin[k]!r})" if origin.get(k, k) != k else repr(k)

    target = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(_abstract_model(ddconfig, embed_dim), nnx.Param)))
    flat = params_from_state_dict(sd, target, official_key, model="the autoencoder",
                                  detail=f" (ddconfig {dict(ddconfig)}, embed_dim {embed_dim})",
                                  param_dtype=param_dtype, name=name, order=_official_sort_key)
    return traverse_util.unflatten_dict(flat)


def autoencoder_from_official(state_dict_or_path, *, ddconfig: Mapping, embed_dim: int, scale_factor: float,
                              dtype=jnp.float32, param_dtype=jnp.float32) -> FrozenAutoencoderKL:
    """Build a `FrozenAutoencoderKL` (compute `dtype`, params `param_dtype`) holding official weights.

    `state_dict_or_path`: a mapping of official names to arrays, or a path to `autoencoder_kl*.pth` (CompVis
    layout), a diffusers `diffusion_pytorch_model.safetensors`, or an `.npz`; the layout is detected from the key
    names. The SD KL-f8 network is `ddconfig=KL_F8_DDCONFIG, embed_dim=KL_F8_EMBED_DIM`
    (`uvit_jax.models.autoencoder`); `scale_factor` is the config's (0.18215 ImageNet, 0.23010 MS-COCO).
    float64 needs jax_enable_x64.
    """
    params = autoencoder_params_from_official(state_dict_or_path, ddconfig=ddconfig, embed_dim=embed_dim,
                                              param_dtype=param_dtype)
    graphdef, state = nnx.split(_abstract_model(ddconfig, embed_dim, scale_factor, dtype, param_dtype))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, param_dtype), params))
    return nnx.merge(graphdef, state)


def autoencoder_to_official(model: FrozenAutoencoderKL) -> dict[str, np.ndarray]:
    """CompVis state dict (names, PyTorch layouts, param dtype, official order) of a `FrozenAutoencoderKL`."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    sd = {official_key(path): np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(v)))
          for path, v in flat.items()}
    return {k: sd[k] for k in sorted(sd, key=_official_sort_key)}
