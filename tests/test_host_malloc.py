"""The malloc settings main.py makes on CPU: a step stops faulting in its large temporaries again every time."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from uvit_jax import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function with a 64 MiB intermediate (16384 x 1024 float32), run 5 times: minor page faults per run.
FAULTS_PER_RUN = """
import resource, sys
from uvit_jax import host_malloc
if sys.argv[1] == "tuned":
    assert host_malloc.tune_for_xla_cpu()
import jax, jax.numpy as jnp
x, w, w2 = jnp.ones((16384, 64)), jnp.full((64, 1024), 0.01), jnp.full((1024, 64), 0.01)
f = jax.jit(lambda x, w, w2: ((x @ w) @ w2).sum())
for _ in range(3):
    f(x, w, w2).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x, w, w2).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_run(mode: str) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(host_malloc.OPT_OUT, None)
    r = subprocess.run([sys.executable, "-c", FAULTS_PER_RUN, mode], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split()[-1])


def test_tuned_malloc_reuses_a_large_intermediate_instead_of_faulting_it_in_again():
    default = faults_per_run("default")
    if default < 8192:  # under 32 MiB of 4 KiB pages: this C library keeps the block already
        pytest.skip(f"glibc's defaults fault only {default:.0f} pages per run here: nothing to compare")
    tuned = faults_per_run("tuned")
    assert tuned < 0.05 * default, (tuned, default)


def test_settings_apply_only_where_jax_computes_on_the_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_malloc.jax_will_use_cpu()
    assert not host_malloc.tune_for_xla_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.jax_will_use_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    fake_plugin = importlib.metadata.EntryPoint("cuda", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [fake_plugin] if group == "jax_plugins" else [])
    assert not host_malloc.jax_will_use_cpu()  # an installed accelerator plugin: JAX will pick the accelerator
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(host_malloc.OPT_OUT, "default")
    assert not host_malloc.tune_for_xla_cpu()  # the opt-out


def test_libtpu_without_a_tpu_chip_still_means_the_cpu(monkeypatch):
    """libtpu is installed to compile for TPU topologies on any machine (uvit_jax/tpu_plan.py): JAX computes on the
    CPU unless a TPU chip is attached, so the CPU settings still apply."""
    import importlib.util

    from uvit_jax import tpu_env
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else None if name == "jax_plugins"
                        else real(name, *a))
    monkeypatch.setattr(tpu_env, "tpu_attached", lambda: False)
    assert host_malloc.jax_will_use_cpu()
    monkeypatch.setattr(tpu_env, "tpu_attached", lambda: True)
    assert not host_malloc.jax_will_use_cpu()
