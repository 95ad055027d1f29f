"""One process of a 2-process jax.distributed training run on localhost (used by test_multiprocess.py).

    python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS DIGITS_DIR WORKDIR OUT.npz
"""
import os
import sys

port, pid, nproc, ndev, digits_dir, workdir, out = sys.argv[1:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from uvit_jax import parallel, train  # noqa: E402

parallel.maybe_initialize_distributed(f"127.0.0.1:{port}", int(nproc), int(pid))
assert jax.device_count() == int(nproc) * int(ndev), jax.devices()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny_config  # noqa: E402

config = tiny_config(digits_dir, n_steps=4)
state = train.train_and_evaluate(config, workdir)
flat = {"/".join(str(k) for k in path): np.asarray(jax.device_get(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
if jax.process_index() == 0:
    np.savez(out, **flat)
