"""Official U-ViT state dicts (PyTorch names and layouts) <-> our parameters (docs/official_behaviour.md §7).

Our module attributes carry the official names, so a parameter path maps to an official key by joining with "."
and renaming the leaf (kernel/scale/embedding -> weight); the only other rename is the optional time MLP
(`time_embed.fc1/fc2` <-> `time_embed.0/2`). Layouts: Linear weight (out, in) <-> kernel (in, out); Conv2d weight
OIHW <-> kernel HWIO. Conversion is strict: every official key must be used and every parameter filled.

A converted checkpoint directory (written by `save_converted`, read by `load_converted`) holds
  DIR/params     orbax StandardCheckpointer save of the pure params dict (float32 unless chosen otherwise)
  DIR/nnet.json  the network description: constructor kwargs plus "name" ("uvit" | "uvit_t2i")
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from uvit_jax import checkpoint, console
from uvit_jax.convert.keys import params_from_state_dict, to_torch_layout
from uvit_jax.convert.pth import load_state_dict
from uvit_jax.models import abstract_params, build_model, nnet_kwargs

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_TIME_MLP = {"fc1": "0", "fc2": "2"}
# Order of the official state_dict (a module's own parameters first, then submodules in registration order).
_OFFICIAL_ORDER = ["pos_embed", "patch_embed", "time_embed", "label_emb", "context_embed", "in_blocks", "mid_block",
                   "out_blocks", "norm", "decoder_pred", "final_layer", "norm1", "attn", "qkv", "proj", "norm2",
                   "mlp", "fc1", "fc2", "skip_linear", "weight", "bias"]


def official_key(path: tuple) -> str:
    """Our parameter path, e.g. ('in_blocks', 0, 'attn', 'qkv', 'kernel') -> 'in_blocks.0.attn.qkv.weight'."""
    parts = [str(p) for p in path]
    if len(parts) == 3 and parts[0] == "time_embed":
        parts[1] = _TIME_MLP[parts[1]]
    if len(parts) > 1:
        parts[-1] = _LEAF_TO_TORCH[parts[-1]]
    return ".".join(parts)


def _official_sort_key(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, _OFFICIAL_ORDER.index(p), p) for p in key.split("."))


def _strip_module_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a uniform 'module.' prefix (a checkpoint saved from a DataParallel/DDP wrapper)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def params_from_official(state_dict, nnet: Mapping, *, param_dtype=np.float32) -> dict:
    """Official state dict (a dict of arrays or a checkpoint path) -> our pure params dict of numpy arrays.

    Strict: raises ValueError listing missing / unexpected keys, or naming the key and both shapes on a mismatch.
    """
    sd = _strip_module_prefix(load_state_dict(state_dict))
    flat = params_from_state_dict(sd, flatten_dict(abstract_params(nnet)), official_key, model="the network",
                                  detail=f" {dict(nnet)}", param_dtype=param_dtype)
    return unflatten_dict(flat)


def params_to_official(params: Mapping, nnet: Mapping | None = None) -> dict[str, np.ndarray]:
    """Our pure params dict -> official state dict (PyTorch names and layouts), dtypes kept.

    With `nnet`, the params' structure and shapes are checked against that network first.
    """
    flat = flatten_dict(params)
    if nnet is not None:
        # Compare by official key, so str block indices (an orbax restore without a target) are fine too.
        want = {official_key(k): tuple(v.shape) for k, v in flatten_dict(abstract_params(nnet)).items()}
        got = {official_key(k): tuple(np.shape(v)) for k, v in flat.items()}
        problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
        problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
        problems += [f"{k}: shape {got[k]}, expected {want[k]}" for k in sorted(want.keys() & got.keys())
                     if got[k] != want[k]]
        if problems:
            raise ValueError(f"params do not match the network {dict(nnet)}: {problems}")
    sd = {official_key(path): np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(v)))
          for path, v in flat.items()}
    return {k: sd[k] for k in sorted(sd, key=_official_sort_key)}


def _split_official_kwargs(kwargs: dict) -> dict:
    """Official constructor kwargs (as in tests/fixtures/uvit_manifest.json) -> nnet dict; "clip_dim" means text."""
    nnet = dict(kwargs)
    nnet.setdefault("name", "uvit_t2i" if "clip_dim" in nnet else "uvit")
    return nnet


def from_official(state_dict_or_path, *, dtype=jnp.float32, param_dtype=jnp.float32, **official_kwargs):
    """Build a UViT / UViTT2I module (compute `dtype`, params `param_dtype`) holding official weights.

    `official_kwargs` are the official constructor arguments (a "name" key may select the class explicitly).
    float64 needs jax_enable_x64.
    """
    nnet = _split_official_kwargs(official_kwargs)
    params = params_from_official(state_dict_or_path, nnet, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: build_model(nnet, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, param_dtype), params))
    return nnx.merge(graphdef, state)


def to_official(model: nnx.Module) -> dict[str, np.ndarray]:
    """Official state dict (names, PyTorch layouts, param dtype) of a UViT / UViTT2I module."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return params_to_official(jax.tree.map(np.asarray, params))


def save_converted(directory: str, params: Mapping, nnet: Mapping) -> None:
    """Write DIR/params (orbax) and DIR/nnet.json. `directory` must not hold a previous `params`."""
    import orbax.checkpoint as ocp

    nnet_kwargs(nnet)  # validate before writing anything
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), dict(params))
    with open(os.path.join(directory, "nnet.json"), "w") as f:
        json.dump(dict(nnet), f, indent=1, sort_keys=True)


def load_converted(directory: str, *, param_dtype=jnp.float32, shardings=None) -> tuple[dict, dict]:
    """Read a directory written by `save_converted` -> (nnet, params) (via `read_params_dir`).

    `shardings`: optional tree of jax Shardings matching the params (e.g. FSDP over a mesh); default: one device.
    """
    path = os.path.join(os.path.abspath(directory), "nnet.json")
    if not os.path.exists(path):
        raise console.MissingFileError(f"{directory} is not a converted checkpoint: {path} is missing")
    with open(path) as f:
        nnet = json.load(f)
    # Restoring against the abstract tree keeps the int keys of the block lists (orbax would give str keys).
    target = abstract_params(nnet, param_dtype=param_dtype)
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    params, _ = read_params_dir(directory, target)
    return nnet, params


def read_params_dir(path: str | os.PathLike, abstract_params: Any = None) -> tuple[Any, dict]:
    """Read a converted-official params dir: `path/params` (orbax StandardCheckpointer) + `path/nnet.json`.

    Returns (params, nnet kwargs). With `abstract_params` (ShapeDtypeStructs with shardings) the params come back as
    sharded jax.Arrays; without, as host numpy arrays in the saved tree structure. Raises FileNotFoundError for a
    missing part, CheckpointMismatchError when names or shapes differ from `abstract_params`, ValueError when
    unreadable.
    """
    path = epath.Path(path)
    params_dir, nnet_file = path / "params", path / "nnet.json"
    for p in (params_dir, nnet_file):
        if not p.exists():
            raise console.MissingFileError(f"{path} is not a converted params dir: {p} is missing (write one with "
                                    "`python main.py --mode convert`)")
    try:
        nnet = json.loads(nnet_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{nnet_file} is not valid JSON: {e}") from e
    if not isinstance(nnet, dict):
        raise ValueError(f"{nnet_file} must hold a JSON object of model kwargs, got {type(nnet).__name__}")
    if abstract_params is not None:
        checkpoint.check_abstract(abstract_params, "abstract_params")
    start = time.perf_counter()
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        try:
            saved = checkpointer.metadata(params_dir).item_metadata.tree
        except Exception as e:  # noqa: BLE001 - name the directory whatever orbax complained about.
            raise ValueError(f"cannot read the params checkpoint {params_dir}: {checkpoint.short_error(e)}") from e
        if abstract_params is None:
            args = ocp.args.PyTreeRestore(
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved))
        else:
            checkpoint.check_compatible(saved, abstract_params, f"params checkpoint {params_dir}")
            args = ocp.args.PyTreeRestore(
                item=abstract_params, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params))
        try:
            params = checkpointer.restore(params_dir, args=args)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read the params checkpoint {params_dir}: {checkpoint.short_error(e)}") from e
    finally:
        checkpointer.close()
    logging.info("checkpoint: loaded params from %s in %.3f s", params_dir, time.perf_counter() - start)
    return params, nnet
