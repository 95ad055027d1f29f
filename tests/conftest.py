"""Test setup: 8 fake CPU devices, CPU only, quiet TensorFlow, malloc as main.py sets it.

These must be set before JAX initialises its backend, hence at import time of conftest.
"""
import os
import tempfile

from uvit_jax import host_malloc

host_malloc.tune_for_xla_cpu()  # as main.py does, before any thread starts
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One persistent XLA compilation cache for every process of the suite: both pytest-xdist workers and each main.py a
# test starts (they inherit this environment). The tiny train step, samplers and checkpoint digest are then compiled
# once and loaded by the next process that needs them, instead of costing each subprocess test its compile time.
# The cache key is the program and the compiler's version and options, so a hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "uvit-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs too: loading beats compiling

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The bundled MNIST digits prepared once per session as a TFDS dataset (no download)."""
    from uvit_jax.data import digits
    d = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(d)
    return d


@pytest.fixture
def x64():
    """Enable float64 for one test only."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)
