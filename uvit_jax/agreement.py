"""Multi-host runs: an error on one process stops every process, at points all of them reach.

Code that only some processes run (their share of the data, process 0's lock check and file writes, a save that
failed on one host) must not raise there alone: the others would wait in the next collective until JAX's heartbeat
timeout. Inside `Faults.catch()` an error is recorded instead of raised (multi-process runs only; a single process
raises at once), the process carries on to the next agreement point, and `Faults.agree(where)`, called by every
process at the same points (the loop's first step, its log steps and saves), gathers a flag and a short message
from each. If any process failed, all of them raise: the failing one its own error, the others `PeerFailedError`
naming that process and why. A leaf module, like parallel.py.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.experimental import multihost_utils

_MESSAGE_BYTES = 400  # the start of each failing process's message, carried to the others


class PeerFailedError(RuntimeError):
    """Another process of the run stopped on an error; the message names it and its error."""


class Faults:
    """The first error this process met inside `catch()`, until every process agrees on it in `agree()`."""

    def __init__(self):
        self.error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @contextlib.contextmanager
    def catch(self):
        """Run the block; in a multi-process run, record its error (the first one) instead of raising it."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - raised again, on every process, by agree()
            if jax.process_count() == 1:
                raise
            if self.error is None:
                self.error = e

    def agree(self, where: str) -> None:
        """Every process calls this at the same point: raise if any process recorded an error."""
        if jax.process_count() == 1:
            if self.error is not None:
                raise self.error
            return
        row = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
        if self.error is not None:
            text = f"{type(self.error).__name__}: {' '.join(str(self.error).split())}".encode()[:_MESSAGE_BYTES]
            row[0], row[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
        rows = np.asarray(multihost_utils.process_allgather(row))
        if self.error is not None:
            raise self.error
        failed = np.flatnonzero(rows[:, 0])
        if failed.size:
            first = int(failed[0])
            text = bytes(rows[first, 1:]).rstrip(b"\0").decode("utf-8", "replace")
            raise PeerFailedError(f"process {first} of {jax.process_count()} stopped at {where} ({text}); process "
                                  f"{jax.process_index()} stops too")
