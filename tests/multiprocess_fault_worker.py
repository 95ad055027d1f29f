"""One process of a 2-process run through main.py in which one process meets an error (test_multiprocess.py).

    python tests/multiprocess_fault_worker.py FAULT PORT PROCESS_ID DIGITS_DIR WORKDIR

FAULT: "lock" (process 0's workdir lock is deleted during step 2, so its check before the save fails), "save"
(process 0 reports a failed background save after step 2), "data" (process 1's data reader fails at step 3).
"""
import os
import sys

fault, port, pid, digits_dir, workdir = sys.argv[1:6]
pid = int(pid)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
os.chdir(root)

import main as entry  # noqa: E402
from absl import app  # noqa: E402
from uvit_jax import checkpoint, data  # noqa: E402
from uvit_jax.rundir import RunDir  # noqa: E402


def failing_batches(at: int, action):
    make = data.make_train_batches

    def make_train_batches(*args, **kwargs):
        batches = make(*args, **kwargs)

        class Batches:
            n = 0

            def __next__(self):
                self.n += 1
                if self.n == at:
                    action()
                return next(batches)

            def close(self):
                batches.close()
        return Batches()
    return make_train_batches


def truncated_shard():
    raise ValueError("feature shard train-00003.npy is truncated (simulated)")


if fault == "lock" and pid == 0:
    data.make_train_batches = failing_batches(2, lambda: os.unlink(RunDir(workdir).lock))
elif fault == "data" and pid == 1:
    data.make_train_batches = failing_batches(3, truncated_shard)
elif fault == "save" and pid == 0:
    save, check_health = checkpoint.Checkpointer.save, checkpoint.Checkpointer.check_health

    def save_once(self, step, *args, **kwargs):
        self.saved_step = step
        return save(self, step, *args, **kwargs)

    def failed_in_background(self):
        check_health(self)
        if getattr(self, "saved_step", None):
            raise checkpoint.CheckpointSaveError(self.saved_step, self.directory, "disk full (ENOSPC)", "simulated")
    checkpoint.Checkpointer.save, checkpoint.Checkpointer.check_health = save_once, failed_in_background

sys.argv = ["main.py", "--config", "configs/test_tiny.py", "--workdir", workdir,
            f"--config.dataset.data_dir={digits_dir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"]
app.run(entry.main, flags_parser=entry.parse_flags)
