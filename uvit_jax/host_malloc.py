"""glibc malloc settings that spare XLA:CPU from faulting in every step's temporaries again (CPU runs only).

XLA:CPU allocates all temporaries of one execution as a single block: 205 MiB for the tiny U-ViT train step of
benchmarks/cpu_side_by_side.py, 1.7 GiB for U-ViT-S/2 at batch 8. glibc serves a block that large with mmap and
unmaps it when it is freed, so each step writes to fresh pages: 59k (tiny) to 443k (S/2) page faults per step,
0.1-0.9 s of kernel time. From one heap that is never trimmed, the block is reused step after step instead: on 2
cores the S/2 train step takes 12% less time, the tiny one 18% (README, "Speed and memory"); the quickstart's small
step is the same within noise.

The settings must be made before JAX starts its threads (a thread keeps the arena it first used), so main.py
calls `tune_for_xla_cpu` first thing. They change nothing where JAX will run on an accelerator (a JAX plugin is
installed and JAX_PLATFORMS does not say cpu), where the C library is not glibc, or with UVIT_HOST_MALLOC=default.
Cost: memory freed by the process stays mapped (its resident size keeps its peak), which a training process
reaches every step anyway.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os

from uvit_jax import tpu_env

# mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {M_ARENA_MAX: 1,  # every thread allocates from the main heap ...
            M_MMAP_MAX: 0,  # ... never from a mapping of its own (glibc still maps when the heap cannot grow)
            M_TRIM_THRESHOLD: 2 ** 31 - 1}  # ... and free memory at the heap's top stays there (mallopt takes an int)
OPT_OUT = "UVIT_HOST_MALLOC"
applied = False  # set by tune_for_xla_cpu; benchmark.json records it


def jax_will_use_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting JAX."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    # A GPU plugin (jax_cuda12_plugin, jax_rocm...) makes JAX compute on the GPU; libtpu alone does only where a
    # TPU is attached (it is also installed to compile for TPU topologies from a CPU machine: uvit_jax/tpu_plan.py).
    has_plugin = len(importlib.metadata.entry_points(group="jax_plugins")) > 0
    tpu = importlib.util.find_spec("libtpu") is not None and tpu_env.tpu_attached()
    return not (has_plugin or tpu or importlib.util.find_spec("jax_plugins"))


def tune_for_xla_cpu() -> bool:
    """Apply SETTINGS when JAX will compute on the CPU; True if they were applied."""
    global applied
    if os.environ.get(OPT_OUT, "").lower() == "default" or not jax_will_use_cpu():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (macOS; musl has no mallopt)
        return False
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return applied
