"""Atomic writes and the removal of what interrupted ones leave behind."""
import os
import subprocess
import sys

import numpy as np

from uvit_jax import files


def dead_pid() -> int:
    """The id of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    files.write_npz(str(tmp_path / "a" / "batch_00000.npz"), {"x": np.zeros(3)})
    dead, live = dead_pid(), os.getpid()
    (tmp_path / "a" / f"batch_00001.tmp-{dead}.npz").write_bytes(b"half a file")
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "a" / "b" / f"moments-00003.tmp-{dead}.npy").write_bytes(b"x")
    (tmp_path / "a" / f"captions-00000.tmp-{live}.json").write_text("{")  # this process may be writing it now
    (tmp_path / "a" / "notes.tmp.txt").write_text("not ours")

    removed = files.remove_dead_leftovers(str(tmp_path / "a"))

    assert sorted(os.path.basename(p) for p in removed) == [f"batch_00001.tmp-{dead}.npz",
                                                            f"moments-00003.tmp-{dead}.npy"]
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "a") for d, _, n in os.walk(tmp_path / "a")
                  for f in n)
    assert left == ["batch_00000.npz", f"captions-00000.tmp-{live}.json", "notes.tmp.txt"]


def test_a_killed_atomic_write_leaves_a_file_the_cleaner_removes(tmp_path):
    target = tmp_path / "out" / "moments-00000.npy"
    code = ("import sys, time; from uvit_jax import files\n"
            "def write(tmp):\n    open(tmp, 'wb').write(b'partial'); print('writing', flush=True); time.sleep(60)\n"
            f"files.write_atomic({str(target)!r}, write)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait()
    assert len(os.listdir(tmp_path / "out")) == 1 and not target.exists()
    assert len(files.remove_dead_leftovers(str(tmp_path / "out"))) == 1
    assert os.listdir(tmp_path / "out") == []
