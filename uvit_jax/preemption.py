"""Preemption: when a long loop should save and stop.

Under `jax.distributed` JAX owns SIGTERM: its preemption notifier agrees with every host on a sync step, and
`should_stop(step)` asks it (call it at every step on every host). In a single process, `sigterm_guard()` turns
SIGTERM into a flag that `preemption_requested()` and `should_stop(step)` read. Nothing here runs at import time or
in a constructor: the loop that owns the process installs the guard.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import jax
from jax.experimental import multihost_utils

# Set by the SIGTERM handler; stays set for the life of the process (a preempted process is expected to exit).
_SIGTERM_RECEIVED = threading.Event()


def _on_sigterm(signum, frame):
    del signum, frame
    _SIGTERM_RECEIVED.set()  # No logging here: the handler may interrupt code that holds the logging lock.


def preemption_requested() -> bool:
    """True once this process received SIGTERM inside `sigterm_guard()` (cheap to poll in any loop)."""
    return _SIGTERM_RECEIVED.is_set()


def reset_preemption_request() -> None:
    """Forget a received SIGTERM: for a run restarted inside the same process (tests, notebooks)."""
    _SIGTERM_RECEIVED.clear()


@contextlib.contextmanager
def sigterm_guard():
    """Within the block a SIGTERM sets the flag `preemption_requested()` reads instead of killing the process.

    Installed only in the main thread of a single-process run: under jax.distributed JAX's own handler stays in
    charge (replacing it would leave the hosts disagreeing about when to stop). The previous handler is restored
    on exit.
    """
    install = not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)


def should_stop(step: int) -> bool:
    """Whether to save and stop at `step`: JAX's preemption sync point under jax.distributed (call it at every step
    on every host, they agree on the step), else the SIGTERM flag."""
    if jax.distributed.is_initialized():
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return preemption_requested()
