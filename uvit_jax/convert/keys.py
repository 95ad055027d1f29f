"""What the PyTorch converters share: the strict key check (which keys a checkpoint lacks and which it has in
excess), PyTorch's weight layouts, and the checked copy of a state dict into our parameter tree."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

SHOWN = 10  # keys listed of each kind: a checkpoint of another model differs in hundreds; the rest are counted


def key_mismatch(expected: Iterable[str], given: Iterable[str], *, name: Callable[[str], str] = repr) -> str | None:
    """None when the key sets are equal, else "missing keys [...], unexpected keys [...]": sorted, each key
    written by `name`, at most SHOWN of each kind followed by "... (+N more)"."""
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not (missing or unexpected):
        return None
    return f"missing keys {_listed(missing, name)}, unexpected keys {_listed(unexpected, name)}"


def _listed(keys: list[str], name: Callable[[str], str]) -> str:
    more = f", ... (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return "[" + ", ".join(map(name, keys[:SHOWN])) + more + "]"


# Our kernel axes in PyTorch's order: Linear (in, out) -> weight (out, in); Conv HWIO -> weight OIHW.
_TORCH_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Our leaf `leaf` ("kernel", "bias", ...) in PyTorch's layout."""
    axes = _TORCH_AXES.get(value.ndim) if leaf == "kernel" else None
    return value if axes is None else value.transpose(axes)


def from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of our leaf `leaf` (the inverse of to_torch_layout)."""
    axes = _TORCH_AXES.get(value.ndim) if leaf == "kernel" else None
    return value if axes is None else value.transpose(np.argsort(axes))


def params_from_state_dict(sd: Mapping[str, Any], target: Mapping[tuple, Any], official_key: Callable[[tuple], str],
                           *, model: str, detail: str, param_dtype, name: Callable[[str], str] = repr,
                           order: Callable[[str], Any] | None = None) -> dict[tuple, np.ndarray]:
    """{path: array} for the flat abstract parameters `target` ({path: array or ShapeDtypeStruct}), read from `sd`
    under the names `official_key(path)`, moved out of PyTorch's layout and cast to `param_dtype`.

    Strict: a key mismatch raises "checkpoint does not match {model}{detail}: ...", a shape mismatch names the key
    (written by `name`) and both shapes in PyTorch's layout. `order` sorts the keys checked, so that the first
    mismatch reported is the first in the file's order."""
    expected = {official_key(path): path for path in target}
    mismatch = key_mismatch(expected, sd, name=name)
    if mismatch:
        raise ValueError(f"checkpoint does not match {model}{detail}: {mismatch}")
    flat = {}
    for key in (sorted(expected, key=order) if order else expected):
        path = expected[key]
        value = from_torch_layout(path[-1], np.asarray(sd[key]))
        want = tuple(target[path].shape)
        if value.shape != want:
            torch_want = to_torch_layout(path[-1], np.empty(want, np.uint8)).shape
            raise ValueError(f"shape mismatch for {name(key)}: checkpoint has {tuple(np.shape(sd[key]))}, "
                             f"{model} expects {tuple(torch_want)}")
        flat[path] = value.astype(param_dtype)
    return flat
