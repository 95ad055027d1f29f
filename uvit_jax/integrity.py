"""Integrity of a saved train state: a checksum of every leaf and a finiteness check, both computed on device.

The checksum is computed by one jitted pass: each 32-bit word of a leaf is mixed with its flat index and the mixed
words are summed modulo 2^32 (two independent lanes). Integer sums do not depend on the reduction order, so the
value is the same for any sharding or device count (a state saved on 8 devices is checked after a restore onto 4),
every process of a multi-host run gets the same replicated scalars without gathering or copying the state to the
host a second time, and it checks end to end: what the devices held when saving is what they hold after restoring.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ALGORITHM = "fmix32-index-sum-2x32"


class NonFiniteStateError(ValueError):
    """`save` was given a state with NaN or infinite floats; nothing was written."""


class IntegrityError(ValueError):
    """Restored values differ from the saved checksums, or are not finite: evidence that a checkpoint is corrupt."""


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte dtypes gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
    if unsigned is None or jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"cannot checksum an array of dtype {x.dtype}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest_leaf(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint32 [2] checksum, bool all-finite) of one array; sharding-independent (see the module docstring)."""
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):  # the flat index, built per axis so that no axis is gathered
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride % 2 ** 32)
        stride *= w.shape[axis]
    lanes = [jnp.sum(_fmix32(w ^ _fmix32(index * np.uint32(0x9E3779B9) + np.uint32(seed))), dtype=jnp.uint32)
             for seed in (0x243F6A88, 0x85A308D3)]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
    return jnp.stack(lanes), finite


@functools.lru_cache(maxsize=8)
def _digest_fn(mesh: Mesh | None):
    # One small program per leaf shape, dtype and sharding, shared by every leaf that has them (a train state repeats
    # a few shapes many times: params, EMA and both Adam moments, block after block): tracing and compiling one
    # program over all leaves took seconds at the first save. Replicated outputs, so that every process of a
    # multi-host run can read them.
    out = None if mesh is None else NamedSharding(mesh, P())
    return jax.jit(_digest_leaf, out_shardings=out)


def digest(tree: Any) -> list[tuple[str, Any, str, bool]]:
    """(path, leaf, checksum hex, all finite) for every leaf of `tree`, computed on the leaf's devices."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    results = [_digest_fn(x.sharding.mesh if isinstance(x.sharding, NamedSharding) else None)(x) for x in leaves]
    results = jax.device_get(results)  # one wait for all leaves' programs, dispatched above without waiting
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), x, f"{int(s[0]):08x}{int(s[1]):08x}", bool(ok))
            for (path, _), x, (s, ok) in zip(flat, leaves, results)]


def checksum_record(state: Any, where: str) -> dict:
    """The checksum record saved with a state; raises NonFiniteStateError if a float leaf is not finite."""
    leaves = digest(state)
    bad = [path for path, _, _, ok in leaves if not ok]
    if bad:
        raise NonFiniteStateError(f"refusing to save the {where}: non-finite values in {', '.join(bad[:5])}"
                                  + (f" ({len(bad)} leaves in all)" if len(bad) > 5 else ""))
    return {"algorithm": ALGORITHM,
            "leaves": {path: {"dtype": str(x.dtype), "shape": list(x.shape), "sum": s} for path, x, s, _ in leaves}}


def verify(tree: Any, record: Any, prefix: str) -> None:
    """Check restored arrays against the saved checksum record (leaf paths under `prefix`) and for finiteness.

    Leaves restored to another dtype than saved (orbax casts) are not compared. A checkpoint without a record (saved
    before checksums existed) is only checked for finiteness.
    """
    known = record.get("leaves", {}) if isinstance(record, dict) and record.get("algorithm") == ALGORITHM \
        else {}
    problems = []
    for path, x, s, ok in digest(tree):
        saved = known.get(prefix + path)
        if (isinstance(saved, dict) and saved.get("dtype") == str(x.dtype)
                and tuple(saved.get("shape", ())) == tuple(x.shape) and saved.get("sum") != s):
            problems.append(f"{prefix}{path}: checksum mismatch")
        if not ok:
            problems.append(f"{prefix}{path}: non-finite values")
    if problems:
        raise IntegrityError("; ".join(problems[:4]) + (f" ({len(problems)} problems in all)"
                                                         if len(problems) > 4 else ""))
