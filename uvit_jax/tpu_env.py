"""Whether this machine has a TPU attached, and libtpu's start-up settings off a TPU VM (no JAX import here).

With libtpu installed (it is, wherever `--benchmark_topology` is used), JAX tries the TPU runtime when it starts;
off a TPU VM libtpu then prints a page of warnings that it cannot tell the accelerator type and worker hostnames.
Telling it (one local host of a v5e chip) silences them; and since there is no chip to guard, several processes
may load libtpu at once (it otherwise locks /tmp/libtpu_lockfile). On a TPU VM nothing is set.
"""
from __future__ import annotations

import glob
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of this vendor (as jax._src.hardware_utils looks for)


def tpu_attached() -> bool:
    """Whether a TPU chip is attached to this machine."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_off_tpu() -> None:
    """Give libtpu the host identity it asks for when no TPU is attached; call before JAX starts a backend."""
    if not tpu_attached():
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
