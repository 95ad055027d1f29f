"""The strict key check that every converter runs: which keys a checkpoint lacks and which it has in excess."""
from __future__ import annotations

from collections.abc import Callable, Iterable

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
