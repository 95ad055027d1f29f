"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`, also used by torch-fidelity) -> our model.

The file is the state dict of pytorch-fid's `fid_inception_v3()` (torchvision `Inception3` names, no aux head,
1008-way fc): per conv block `<name>.conv.weight` (O, I, kh, kw) and `<name>.bn.{weight,bias,running_mean,
running_var}` (optionally `.bn.num_batches_tracked`, a counter that carries no weight and is ignored), plus
`fc.weight` (1008, 2048) and `fc.bias`. 94 conv blocks -> 94 * 5 + 2 = 472 tensors (566 with the counters).
The key list is derived from our model's structure (`expected_keys`), so the two cannot drift apart.

Conversion: conv (O, I, kh, kw) -> HWIO (transpose 2, 3, 1, 0); fc (out, in) -> (in, out); BatchNorm weight/bias/
running_mean/running_var -> scale/bias/mean/var. Every key must be consumed and every shape must match, otherwise a
ValueError names the offending keys (and both shapes).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax import console
from uvit_jax.convert.keys import key_mismatch
from uvit_jax.models import inception

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"


def _torch_key_and_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Our variable path + shape -> the pytorch-fid key and the tensor shape stored under it."""
    *module, leaf = path
    prefix = ".".join(module)
    if module[-1] == "conv" and leaf == "kernel":  # HWIO <- OIHW
        kh, kw, cin, cout = shape
        return f"{prefix}.weight", (cout, cin, kh, kw)
    if module[-1] == "bn":
        return f"{prefix}.{_BN_NAMES[leaf]}", shape
    if module == ["fc"] and leaf == "kernel":
        return "fc.weight", (shape[1], shape[0])
    if module == ["fc"] and leaf == "bias":
        return "fc.bias", shape
    raise AssertionError(f"no pytorch-fid name for model variable {'.'.join(path)}")


@functools.lru_cache(maxsize=1)
def _expected_keys() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    out = {}
    for path, shape in inception.state_shapes().items():
        key, torch_shape = _torch_key_and_shape(path, shape)
        out[key] = (path, torch_shape)
    return out


def expected_keys() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{pytorch-fid key: (our variable path, torch shape)} for every tensor the model needs (472)."""
    return dict(_expected_keys())


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """pytorch-fid state dict (numpy arrays) -> our model's state as a pure nested dict of float32 numpy arrays.

    Raises ValueError listing missing keys, unexpected keys and shape mismatches (key, file shape, expected shape).
    """
    expected = expected_keys()
    given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    if not set(given) & set(expected):
        raise ValueError(
            f"this is not a pytorch-fid Inception state dict: none of its {len(state_dict)} keys is an Inception "
            f"key (found e.g. {sorted(state_dict)[:5]}; expected e.g. {list(expected)[:3]}). Use pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's weights-inception-2015-12-05-6726825d.pth is "
            "the same file).")
    mismatch = key_mismatch(expected, given)
    problems = [mismatch] if mismatch else []
    for key in sorted(set(expected) & set(given)):
        got = tuple(np.shape(given[key]))
        if got != expected[key][1]:
            problems.append(f"shape mismatch for {key}: file has {got}, model expects {expected[key][1]}")
    if problems:
        raise ValueError("cannot convert the Inception state dict:\n  " + "\n  ".join(problems))

    tree: dict = {}
    for key, (path, _) in expected.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _to_flax_layout(path, np.asarray(given[key], dtype=np.float32))
    return tree


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict from a PyTorch `.pth` (via `convert.pth.load_torch_file`, no torch) or an `.npz` of it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise console.MissingFileError(f"Inception weights not found: {path} (pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded here)")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    from uvit_jax.convert.pth import load_torch_file  # imported here: only .pth input needs the reader

    try:
        state_dict = load_torch_file(path)
    except ValueError as e:
        # Both torch formats (zip and the legacy one of the 2019 release file) are read; an .npz export is the fallback.
        raise ValueError(f"{e}\nAlternatively export the weights once where torch is installed: "
                         "np.savez('pt_inception.npz', **{k: v.numpy() for k, v in torch.load(PATH).items()}) "
                         "and pass the .npz") from e
    return {k: np.asarray(v) for k, v in state_dict.items()}


def model_from_state_dict(state_dict: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST) -> inception.InceptionV3:
    """Build an InceptionV3 holding the converted weights (no random init is run)."""
    return inception.model_from_pure_dict(convert_state_dict(state_dict), dtype=dtype, precision=precision)


def load_inception(path: str | os.PathLike, *, dtype=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) -> inception.InceptionV3:
    """pytorch-fid weights file (.pth or .npz) -> InceptionV3 with those weights. See `convert_state_dict`."""
    return model_from_state_dict(read_state_dict(path), dtype=dtype, precision=precision)
