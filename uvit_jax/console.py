"""The console is for people: our own INFO lines, libraries' warnings, and nothing else unless asked.

`setup(verbosity, main_process)`: short "HH:MM:SS message" lines; INFO records from outside uvit_jax / main.py
(orbax's per-save lines, TFDS's "Downloading and preparing", JAX's backend probes) are dropped unless
`--verbosity >= 1`; known-harmless library warnings are dropped too. Processes other than 0 print warnings only.
`user_error(e)` turns the mistakes a person can fix (`UserError`) into one line, without a traceback.
`quiet_orbax_logging` keeps orbax's per-save lines and tracebacks off the console. `Progress` logs
"what: done/total unit, rate, ETA" for long passes; `format_duration` and `format_rate` are the one way durations
and rates are printed.
"""
from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
import time
import warnings

from absl import logging

_OURS = (os.sep + "uvit_jax" + os.sep, os.sep + "main.py")
# Library warnings that say nothing actionable to a user of this project.
_HARMLESS = ("OpenCV is not installed", "Unable to initialize backend", "Platform 'tpu'", "Platform 'cuda'",
             "tensorflow_datasets/core/", "pkg_resources is deprecated", "Event loop is closed",
             "Falling back to cpu", "An NVIDIA GPU may be present")


class _PeopleFilter(std_logging.Filter):
    def __init__(self, verbosity: int):
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: std_logging.LogRecord) -> bool:
        if self.verbosity >= 1:
            return True
        ours = any(p in record.pathname for p in _OURS)
        if record.levelno < std_logging.WARNING:
            return ours
        return ours or not any(h in record.getMessage() for h in _HARMLESS)


def setup(verbosity: int = 0, main_process: bool = True) -> None:
    """Configure absl and Python logging for the console (see the module docstring)."""
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for f in list(handler.filters):
        if isinstance(f, _PeopleFilter):
            handler.removeFilter(f)
    handler.addFilter(_PeopleFilter(verbosity))
    for name in ("jax", "orbax", "tensorflow", "absl", "etils"):
        std_logging.getLogger(name).addFilter(_PeopleFilter(verbosity))
    logging.set_verbosity(logging.INFO if main_process else logging.WARNING)
    if verbosity < 1:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*OpenCV.*")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(Exception):
    """A mistake the person running the program can fix (a file they named or must provide, a setting): main.py
    prints it as one `error:` line, without a traceback. An error of the program itself is never a UserError."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named, or must provide, does not exist; the message says which and where to get it."""


def user_error(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
    """Print `error: message` (one line) to stderr and exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_rate(per_second: float, unit: str) -> str:
    """"12.5 steps/s", or below one per second "41.2 s/step" (where "0.0 steps/s" would say nothing)."""
    if per_second >= 1:
        return f"{per_second:.1f} {unit}s/s"
    return f"{1 / max(per_second, 1e-9):.1f} s/{unit}"


class Progress:
    """Logs "what: done/total unit  rate unit/s  ETA" when `update` is called, at most once per `every_s`
    seconds and always for the last item (total known)."""

    def __init__(self, what: str, total: int | None, unit: str = "image", every_s: float = 30.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.start = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        finished = self.total is not None and done >= self.total
        if now - self.last < self.every_s and not finished:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        eta = (f"  ETA {format_duration((self.total - done) / max(rate, 1e-9))}"
               if self.total is not None and not finished else "")
        logging.info("%s: %d%s %ss  %s%s", self.what, done, of, self.unit, format_rate(rate, self.unit), eta)


class _OrbaxConsoleFilter(std_logging.Filter):
    """Drops orbax's records below WARNING and cuts the others to their first line (no traceback): a failed save is
    reported once, by the checkpointer's own error."""

    def __init__(self, orbax_dir: str):
        super().__init__()
        self.orbax_dir = orbax_dir

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not record.pathname.startswith(self.orbax_dir):
            return True
        if record.levelno < std_logging.WARNING:
            return False
        record.msg, record.args = record.getMessage().split("\n", 1)[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


_quiet_installed = False


def quiet_orbax_logging() -> None:
    """Keep orbax's chatter off the console: its per-save INFO lines go, its warnings and errors lose their
    tracebacks, and the errors of its orphaned coroutines ("Event loop is closed" at shutdown, the other shards'
    read errors of a corrupt checkpoint) are not printed.
    Call once at start-up; idempotent."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    # .../site-packages/orbax, found without importing orbax (and JAX with it)
    orbax_dir = os.path.dirname(os.path.dirname(os.path.abspath(importlib.util.find_spec("orbax.checkpoint").origin)))
    # orbax logs through absl's logger (its records carry orbax's file names); a plain "orbax" logger may exist too.
    for name in ("absl", "orbax"):
        std_logging.getLogger(name).addFilter(_OrbaxConsoleFilter(orbax_dir))
    std_logging.getLogger("orbax").setLevel(std_logging.WARNING)
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine that died with an error nobody awaited
        if ((isinstance(value, RuntimeError) and "Event loop is closed" in str(value))
                or (code is not None and code.co_filename.startswith(orbax_dir))):
            return  # orbax's background reads and writes failing after their caller got the error
        previous(unraisable)

    sys.unraisablehook = hook
