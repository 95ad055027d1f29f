"""Two jax.distributed processes (4 CPU devices each) train to the same params as one process with 8 devices; an error
on one process stops both, each saying why."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from uvit_jax import train
from helpers import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(digits_dir, tmp_path):
    port, out = free_port(), str(tmp_path / "mp_params.npz")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(port), str(i), "2",
                               "4", digits_dir, str(tmp_path / "mp"), out], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    config = tiny_config(digits_dir, n_steps=4)
    state = train.train_and_evaluate(config, str(tmp_path / "single"))
    flat = {"/".join(str(k) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    multi = np.load(out)
    assert set(multi.files) == set(flat)
    for k, v in flat.items():
        np.testing.assert_allclose(multi[k], v, atol=1e-6, rtol=0, err_msg=k)


@pytest.mark.parametrize("fault,failing,why", [
    ("lock", 0, "was removed or taken over"),
    ("save", 0, "disk full (ENOSPC)"),
    ("data", 1, "train-00003.npy is truncated"),
])
def test_an_error_on_one_process_stops_every_process_saying_why(digits_dir, tmp_path, fault, failing, why):
    """A lock lost on process 0, a save failure on process 0, a dataset error on process 1: before, the others
    waited in the next collective (until JAX's heartbeat timeout killed them, naming nothing). Each process must
    exit non-zero (a hang fails through the subprocess timeout) and say why."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_fault_worker.py"), fault, str(port),
                               str(i), digits_dir, str(tmp_path / "w")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]  # start-up and compiling dominate
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode not in (0, None), log[-3000:]
        assert why in log, log[-3000:]
        if i != failing:
            assert f"process {failing} of 2 stopped at" in log, log[-3000:]
