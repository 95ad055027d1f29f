"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import numpy as np


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename onto `path` (atomic on POSIX); a crash leaves only the temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _tmp_name(path, os.getpid())
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tmp_name(path: str, pid: int) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.tmp-{pid}{ext}"  # keep the extension: np.savez appends .npz to names without it


_TMP = re.compile(r"\.tmp-(\d+)(\.[^.]*)?$")  # what `_tmp_name` appends


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_leftovers(directory: str) -> list[str]:
    """Delete the temporary files of `write_atomic` calls whose process is gone (a kill mid-write leaves them, up to
    a whole shard's size) in `directory` and below; returns their paths. Files of live processes on this host
    (including this one) are kept: they may be writing now."""
    removed = []
    for root, _, names in os.walk(directory):
        for name in names:
            m = _TMP.search(name)
            if m and not _alive(int(m.group(1))):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                except FileNotFoundError:  # another cleaner was first
                    continue
                removed.append(path)
    return removed


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
