"""Preemption and interrupts: when a long loop should save and stop, and how a stop signal ends the process.

Two phases. During start-up (`exit_on_stop_signals()`, installed by main before JAX starts) there is nothing to
save: SIGTERM or SIGINT (Ctrl-C) prints one line and ends the process at once, instead of a silent rc -15 or a
KeyboardInterrupt unwinding through a compilation. Inside a loop (`stop_guard()`), a SIGTERM or a first Ctrl-C sets
the flag that `should_stop(step)` reads, so the loop saves at its next step and returns (exit 0); a second Ctrl-C
ends the process at once without saving (the newest checkpoint stays).

Under `jax.distributed` JAX owns SIGTERM: its preemption notifier agrees with every host on a sync step, and
`should_stop(step)` asks it (call it at every step on every host). Ctrl-C there keeps the start-up behaviour (stop
at once, with a line): a flag set on one host only would leave the others waiting in the next collective. Nothing
here runs at import time or in a constructor: the code that owns the process installs the handlers.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils

# Set by a stop signal inside `stop_guard()`; stays set for the life of the process (a stopped process exits).
_STOP_REQUESTED = threading.Event()


def _say(line: str) -> None:
    # os.write, not logging or print: a handler may interrupt code that holds the logging lock or a stream's buffer.
    os.write(2, f"{time.strftime('%H:%M:%S')} {line}\n".encode())


def _exit_now(signum, frame):
    del frame
    name = signal.Signals(signum).name
    _say(f"error: stopped by {name} during start-up, before the first step: nothing to save; run the same command "
         "again to start")
    os._exit(128 + signum)


def _on_stop_signal(signum, frame):
    del frame
    if signum == signal.SIGINT and _STOP_REQUESTED.is_set():
        _say("error: Ctrl-C again: stopped at once without saving; the newest checkpoint is kept (run the same "
             "command again to resume from it)")
        os._exit(128 + signum)
    if not _STOP_REQUESTED.is_set():
        _say(f"{signal.Signals(signum).name}: stopping at the next step, after saving it"
             + (" (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""))
    _STOP_REQUESTED.set()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_on_stop_signals() -> None:
    """Start-up: SIGTERM and SIGINT print one line and end the process at once (exit code 128 + signal)."""
    if _main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_now)


def preemption_requested() -> bool:
    """True once this process received a stop signal inside `stop_guard()` (cheap to poll in any loop)."""
    return _STOP_REQUESTED.is_set()


def reset_preemption_request() -> None:
    """Forget a received stop signal: for a run restarted inside the same process (tests, notebooks)."""
    _STOP_REQUESTED.clear()


@contextlib.contextmanager
def stop_guard():
    """Within the block SIGTERM and a first SIGINT set the flag `should_stop` reads instead of ending the process;
    a second SIGINT ends it at once. The previous handlers are restored on exit.

    Installed only in the main thread of a single-process run: under jax.distributed JAX's own SIGTERM handler
    stays in charge (replacing it would leave the hosts disagreeing about when to stop).
    """
    install = not jax.distributed.is_initialized() and _main_thread()
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if install else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def should_stop(step: int) -> bool:
    """Whether to save and stop at `step`: JAX's preemption sync point under jax.distributed (call it at every step
    on every host, they agree on the step), else the stop flag."""
    if jax.distributed.is_initialized():
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return preemption_requested()
