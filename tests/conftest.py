"""Test setup: 8 fake CPU devices, CPU only, quiet TensorFlow, malloc as main.py sets it.

These must be set before JAX initialises its backend, hence at import time of conftest.
"""
import os

from uvit_jax import host_malloc

host_malloc.tune_for_xla_cpu()  # as main.py does, before any thread starts
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

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
