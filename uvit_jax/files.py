"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename onto `path` (atomic on POSIX); a crash leaves only the temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"  # keep the extension: np.savez appends .npz to names without it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON at `path`, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    write_atomic(path, write)


def write_npz(path: str, arrays: dict) -> None:
    """numpy arrays as an (uncompressed) .npz at `path`, atomically."""
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))
