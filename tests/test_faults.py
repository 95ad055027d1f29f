"""Faults and hostile files: corrupt checkpoints, failed and stuck saves, hard exit, the workdir lock, pickles that
would run code, oversized checkpoint pickles."""
import errno
import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from uvit_jax import checkpoint, console, data
from uvit_jax.checkpoint import CheckpointCorruptError, CheckpointSaveError, Checkpointer
from uvit_jax.convert import pth
from uvit_jax.parallel import make_mesh
from uvit_jax.workdir_lock import WorkdirLock, WorkdirLockedError
from helpers import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(fsdp=2)


def _state(mesh, step):
    """A train-state-like dict whose largest leaf is 128 KB of random floats, so that the largest file of a saved
    step is array data (random floats do not compress)."""
    spec = {"step": P(), "kernel": P("data", "fsdp"), "bias": P("fsdp"), "count": P()}
    key = jax.random.key(step)
    params = {"kernel": jax.random.normal(key, (64, 512), jnp.float32), "bias": jnp.full((512,), step, jnp.float32)}
    state = {"step": jnp.asarray(step, jnp.int32), "params": params,
             "ema_params": jax.tree.map(lambda p: p * 0.5, params),
             "opt_state": {"count": jnp.asarray(step, jnp.int32), "mu": jax.tree.map(jnp.zeros_like, params)}}
    shard = {"step": spec["step"], "params": {"kernel": spec["kernel"], "bias": spec["bias"]},
             "ema_params": {"kernel": spec["kernel"], "bias": spec["bias"]},
             "opt_state": {"count": spec["count"], "mu": {"kernel": spec["kernel"], "bias": spec["bias"]}}}
    return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), shard))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _files(directory):
    """{relative path: bytes} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _largest_file(step_dir):
    return max((os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns), key=os.path.getsize)


# ------------------------------------------------------------------------------------------ corruption matrix


def _truncate(ckpt_dir, mesh):
    big = _largest_file(ckpt_dir / "4")
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)


def _garbage(ckpt_dir, mesh):
    big = _largest_file(ckpt_dir / "4")
    size = os.path.getsize(big)
    assert size > 8192, f"the largest file {big} should be array data, got {size} bytes"
    with open(big, "r+b") as f:  # same size, 4 KB of random bytes in the middle
        f.seek(size // 2 - 2048)
        f.write(np.random.default_rng(0).bytes(4096))


def _delete(ckpt_dir, mesh):
    os.remove(_largest_file(ckpt_dir / "4"))


def _garble_json(ckpt_dir, mesh):
    (ckpt_dir / "4" / "metadata" / "metadata").write_text("{garbled")


def _nan_written_by_plain_orbax(ckpt_dir, mesh):
    """Step 4 written around the Checkpointer's checks (which refuse NaN), e.g. by an older version of this code."""
    shutil.rmtree(ckpt_dir / "4")
    state = _state(mesh, 4)
    state["params"]["bias"] = state["params"]["bias"].at[7].set(jnp.nan)
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "metadata"))
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            metadata=ocp.args.JsonSave({"data_position": 4})))
    manager.close()


def _stale_state_files(ckpt_dir, mesh):
    """Well-formed files holding other values (step 2's state under step 4's record): only checksums see it."""
    shutil.rmtree(ckpt_dir / "4" / "state")
    shutil.copytree(ckpt_dir / "2" / "state", ckpt_dir / "4" / "state")


CORRUPTIONS = [_truncate, _garbage, _delete, _garble_json, _nan_written_by_plain_orbax, _stale_state_files]


@pytest.fixture
def orbax_read_errors():
    """Orbax's failed reads of the other shards end in coroutines nobody awaits, which pytest reports as unraisable
    exceptions (quiet_orbax_logging keeps them off a real console): collect them inside the test, where the
    warning filter below applies, rather than at some later test or at exit."""
    yield
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("orbax_read_errors")
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_newest_is_detected_set_aside_and_the_previous_step_restores(tmp_path, mesh, caplog, corrupt):
    states = {s: _state(mesh, s) for s in (2, 4)}
    with Checkpointer(tmp_path) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, {"data_position": s})
    corrupt(tmp_path, mesh)
    corrupted = _files(tmp_path / "4")

    ckpt = Checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        state, metadata, step = ckpt.restore_latest(_abstract(states[2]))
    assert step == 2 and metadata == {"data_position": 2}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ours = [r.getMessage() for r in caplog.records if r.pathname == checkpoint.__file__]
    assert len(ours) == 1 and "\n" not in ours[0], ours  # one warning line
    assert "step 4" in ours[0] and "set aside as 4.corrupt-0" in ours[0] and "resuming from step 2" in ours[0]
    # Set aside, not deleted: every byte is still there, under a name orbax ignores.
    assert not (tmp_path / "4").exists() and _files(tmp_path / "4.corrupt-0") == corrupted
    assert ckpt.all_steps() == [2]

    # The resumed run reaches step 4 again: it saves, and the next restart restores that.
    assert ckpt.save(4, states[4], {"data_position": 4})
    ckpt.close()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(_abstract(states[2]))[2] == 4
    assert (tmp_path / "4.corrupt-0").is_dir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("orbax_read_errors")
def test_nothing_usable_raises_and_moves_nothing(tmp_path, mesh):
    state = _state(mesh, 2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, {})
        ckpt.save(4, state, {})
    _garble_json(tmp_path, mesh)
    (tmp_path / "2" / "metadata" / "metadata").write_text("[1, 2")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"no checkpoint in .* is usable \(nothing was moved\): "
                                                         r"step 4: JSONDecodeError.*; step 2: JSONDecodeError"):
            ckpt.restore_latest(_abstract(state))
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("orbax_read_errors")
def test_restore_ema_params_skips_a_corrupt_step_and_moves_nothing(tmp_path, mesh):
    states = {s: _state(mesh, s) for s in (2, 4)}
    with Checkpointer(tmp_path) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, {})
    _stale_state_files(tmp_path, mesh)
    abstract = _abstract(states[2]["ema_params"])
    params, step = checkpoint.restore_ema_params(tmp_path, abstract)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(params["kernel"]), np.asarray(states[2]["ema_params"]["kernel"]))
    with pytest.raises(CheckpointCorruptError, match="EMA params of checkpoint step 4 .*ema_params/kernel: checksum"):
        checkpoint.restore_ema_params(tmp_path, abstract, step=4)
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), MemoryError(),
                                   RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0G"),
                                   TypeError("unsupported operand (a bug)")],
                         ids=["transient_io", "host_oom", "device_oom", "bug"])
def test_a_restore_error_without_evidence_of_corruption_stops_and_moves_nothing(tmp_path, mesh, monkeypatch, error):
    """Only evidence (checksums, non-finite values, undecodable or missing files) sets a step aside; any other
    error stops the restore with that error and leaves every step in place. (Before: step 4 was set aside as
    4.corrupt-0 and the run resumed silently from step 2.)"""
    states = {s: _state(mesh, s) for s in (2, 4)}
    with Checkpointer(tmp_path) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, {})
    before = _files(tmp_path)
    restore = ocp.CheckpointManager.restore
    failures = [error]  # the newest step fails once; an older one would restore

    def flaky(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(type(error)) as raised:
            ckpt.restore_latest(_abstract(states[2]))
    assert raised.value is error and any("left in place" in note for note in raised.value.__notes__)
    assert _files(tmp_path) == before
    with Checkpointer(tmp_path) as ckpt:  # the cause gone, the next start restores the newest step
        assert ckpt.restore_latest(_abstract(states[2]))[2] == 4


def _rename_step(run, step, to):
    os.rename(run / str(step), run / str(to))


def _link_step_of_another_run(run, step, to):
    other = run.parent / "other_run"
    shutil.copytree(run, other)
    os.symlink(other / str(step), run / str(to))


@pytest.mark.parametrize("how, message", [(_rename_step, r"/6 holds step 4, not 6 \(was it renamed\?\): move it back "
                                                         r"to .*/4"),
                                          (_link_step_of_another_run, r"/6 is a link to .*other_run/4: a run restores "
                                                                      r"only the steps it wrote")],
                         ids=["renamed", "linked"])
def test_a_step_that_is_not_what_its_name_says_is_refused(tmp_path, mesh, how, message):
    """`mv checkpoints/4 checkpoints/6`, or a link into another run: refused in one line before anything is read or
    moved. (Before: the run resumed "at step 6" with step 4's state, or restored another run's step.)"""
    run = tmp_path / "run"
    states = {s: _state(mesh, s) for s in (2, 4)}
    with Checkpointer(run) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, {})
    how(run, 4, 6)
    before = sorted(os.listdir(run))
    with Checkpointer(run) as ckpt:
        with pytest.raises(checkpoint.CheckpointIdentityError, match=message) as raised:
            ckpt.restore_latest(_abstract(states[2]))
    assert "\n" not in str(raised.value)
    with pytest.raises(checkpoint.CheckpointIdentityError, match=message):
        checkpoint.restore_ema_params(run, _abstract(states[2]["ema_params"]))
    assert sorted(os.listdir(run)) == before


def test_a_renamed_step_stops_main_in_one_line(digits_dir, tmp_path):
    """The `mv checkpoints/10 checkpoints/30` of a user: main.py says so in one `error:` line, exit code 2."""
    from uvit_jax.rundir import RunDir
    run = RunDir(tmp_path / "w")
    with Checkpointer(run.checkpoints) as ckpt:  # the check comes before the tree is compared with the model
        ckpt.save(10, {"step": jnp.asarray(10, jnp.int32)}, {"step": 10})
    os.rename(os.path.join(run.checkpoints, "10"), os.path.join(run.checkpoints, "30"))
    r = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--config", "configs/test_tiny.py",
                        "--workdir", run.root, f"--config.dataset.data_dir={digits_dir}"], capture_output=True,
                       text=True, env=dict(ENV, JAX_PLATFORMS="cpu"), cwd=REPO, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "holds step 10, not 30" in errors[0], r.stderr[-2000:]


def test_interrupted_save_leftovers_are_removed_at_start(tmp_path, mesh, caplog):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, _state(mesh, 2), {})
    for name in ("4.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1700000000"):
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "state" / "partial").write_bytes(b"x" * 100)
    kept = _files(tmp_path / "2")
    with caplog.at_level("WARNING"):
        Checkpointer(tmp_path).close()
    assert sorted(os.listdir(tmp_path)) == ["2"] and _files(tmp_path / "2") == kept
    removed = [r.getMessage() for r in caplog.records if "left by an interrupted save" in r.getMessage()]
    assert len(removed) == 2


# ---------------------------------------------------------------------------------------------- failed saves


_FAILED_SAVE_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import jax, jax.numpy as jnp
    from uvit_jax import checkpoint, console
    console.quiet_orbax_logging()
    directory, how = sys.argv[1], sys.argv[2]
    state = {"step": jnp.asarray(2, jnp.int32), "w": jnp.arange(16.0).reshape(4, 4)}
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(2, state, {})
    ckpt.wait()
    # Root ignores permission bits, so the portable fault is the checkpoint directory replaced by a regular file
    # (a vanished mount looks much the same).
    if how == "replaced_by_file":
        os.rename(directory, directory + ".moved")
        open(directory, "w").write("not a directory")
    else:
        os.chmod(directory, 0o500)
    start = time.monotonic()
    try:
        ckpt.save(4, state, {})
        while time.monotonic() - start < 30:
            ckpt.check_health()
            time.sleep(0.01)
        failure = None
    except checkpoint.CheckpointSaveError as e:
        failure = e
    elapsed = time.monotonic() - start
    ckpt.close()  # already reported: not raised again
    if how == "replaced_by_file":
        os.remove(directory)
        os.rename(directory + ".moved", directory)
    else:
        os.chmod(directory, 0o700)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with checkpoint.Checkpointer(directory) as again:
        restored = again.restore_latest(abstract)[2]
    print("RESULT " + json.dumps({"message": str(failure), "cause": getattr(failure, "cause", None),
                                  "elapsed": elapsed, "restored": restored}), flush=True)
    # orbax's writers of the failed step wait 300 s for a signal that never comes; do not join them at exit
    os._exit(0)
""")


# In a subprocess: after a failed save orbax leaves non-daemon threads waiting for minutes, which would hold up
# the test process at exit.
@pytest.mark.parametrize("how", ["replaced_by_file", pytest.param("read_only", marks=pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into read-only directories"))])
def test_failed_background_save_is_reported_at_once_and_the_previous_step_survives(tmp_path, how):
    directory = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", _FAILED_SAVE_CHILD, str(directory), how], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=120)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == 1, done.stderr[-3000:]
    result = json.loads(results[0][len("RESULT "):])
    print(f"failing save -> CheckpointSaveError: {result['elapsed']:.3f} s")
    assert result["elapsed"] < 5 and "\n" not in result["message"]
    assert result["message"].startswith(f"checkpoint save of step 4 to {directory} failed: "), result
    assert result["cause"] == ("other" if how == "replaced_by_file" else "permission denied"), result
    assert result["restored"] == 2


def test_failure_causes_are_classified():
    where = "/ckpt"
    cases = {OSError(errno.ENOSPC, "No space left on device"): "disk full (ENOSPC)",
             OSError(errno.EDQUOT, "Disk quota exceeded"): "disk quota exceeded (EDQUOT)",
             PermissionError(errno.EACCES, "Permission denied"): "permission denied",
             OSError(errno.EROFS, "Read-only file system"): "read-only filesystem (EROFS)",
             ValueError('Error writing "d/abc": [OS error: No space left on device]'): "disk full (ENOSPC)",
             ValueError("PERMISSION_DENIED: gs://bucket/run/checkpoints/4"): "permission denied",
             NotADirectoryError(errno.ENOTDIR, "Not a directory"): "other"}
    for error, cause in cases.items():
        assert checkpoint._save_error(4, where, error).cause == cause, error
    try:  # the cause is found in the chain of a wrapped error
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("background save failed") from inner
    except RuntimeError as outer:
        wrapped = checkpoint._save_error(4, where, outer)
    assert wrapped.cause == "disk full (ENOSPC)"
    assert str(wrapped) == "checkpoint save of step 4 to /ckpt failed: disk full (ENOSPC): [Errno 28] No space left " \
                           "on device"


def test_a_stuck_save_times_out_instead_of_hanging(tmp_path, mesh, monkeypatch):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, _state(mesh, 2), {})
    ckpt.wait()
    monkeypatch.setattr(ckpt._manager, "is_saving_in_progress", lambda: True)  # a write that never finishes
    start = time.monotonic()
    with pytest.raises(CheckpointSaveError, match=r"failed: timed out: still writing after 0 s"):
        ckpt.close(timeout_s=0.3)
    assert time.monotonic() - start < 30  # bounded: a hang, not a slow machine, is what this catches
    monkeypatch.undo()
    ckpt._manager.close()


_EXIT_CHILD = textwrap.dedent("""
    import os, sys, threading, time
    import jax.numpy as jnp
    from uvit_jax import checkpoint, console
    console.quiet_orbax_logging()
    directory = sys.argv[1]
    ckpt = checkpoint.Checkpointer(directory)
    state = {"w": jnp.ones((4, 4))}
    ckpt.save(1, state, {})
    ckpt.wait()
    # A non-daemon thread that never ends (as a stuck orbax writer would be): a normal exit would wait for it.
    threading.Thread(target=threading.Event().wait, name="stuck").start()
    os.rename(directory, directory + ".moved")
    open(directory, "w").write("not a directory")
    print(f"FAILING {time.time()}", flush=True)
    try:
        ckpt.save(2, state, {})
        while True:
            ckpt.check_health()
            time.sleep(0.01)
    except checkpoint.CheckpointSaveError as e:
        if sys.argv[2] == "close_hangs":  # orbax's close blocks forever too
            ckpt._manager.close = threading.Event().wait
        checkpoint.exit_after_save_failure(e, ckpt, close_timeout_s=1.0)
""")


@pytest.mark.parametrize("close", ["close_returns", "close_hangs"])
def test_exit_after_save_failure_exits_nonzero_even_with_a_stuck_thread(tmp_path, close):
    child = subprocess.Popen([sys.executable, "-c", _EXIT_CHILD, str(tmp_path / "checkpoints"), close],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        failing_at = float(child.stdout.readline().split()[1])
        _, err = child.communicate(timeout=60)
        exited_after = time.time() - failing_at
    finally:
        if child.poll() is None:
            child.kill()
    print(f"failing save -> process exit ({close}): {exited_after:.2f} s")
    assert child.returncode == 1  # and within communicate's 60 s: a hang would have raised TimeoutExpired
    ours = [line for line in err.splitlines() if "checkpoint save of step 2" in line]
    assert len(ours) == 1 and f"{tmp_path / 'checkpoints'} failed: other: NotADirectoryError" in ours[0]
    assert "Traceback" not in err, err  # orbax's errors are cut to one line each


# --------------------------------------------------------------------------------------------- workdir lock


_LOCK_CHILD = textwrap.dedent("""
    import sys, time
    from uvit_jax.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    print("LOCKED", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    with WorkdirLock(tmp_path / "run") as lock:
        lock.check()
        record = json.loads((tmp_path / "run" / ".lock").read_text())
        assert record["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", _LOCK_CHILD, str(tmp_path / "run"), "0"], capture_output=True,
                               text=True, env=ENV, cwd=REPO, timeout=60)
        assert other.returncode != 0 and "LOCKED" not in other.stdout
        last = other.stderr.strip().splitlines()[-1]
        assert last.startswith("uvit_jax.workdir_lock.WorkdirLockedError: workdir ")
        assert f"pid {os.getpid()} since {record['since']}" in last and f"delete {tmp_path / 'run' / '.lock'}" in last
        with pytest.raises(WorkdirLockedError):  # also from this process
            WorkdirLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / ".lock").exists()
    with WorkdirLock(tmp_path / "run"):  # released: the next run takes it
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    child = subprocess.Popen([sys.executable, "-c", _LOCK_CHILD, str(tmp_path), "60"], stdout=subprocess.PIPE,
                             text=True, env=ENV, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "LOCKED"
        with pytest.raises(WorkdirLockedError, match=f"pid {child.pid} since"):
            WorkdirLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with caplog.at_level("WARNING"), WorkdirLock(tmp_path) as lock:
        lock.check()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and f"pid {child.pid}" in r.getMessage() for r in caplog.records)


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("method", ["flock", "record"])
def test_a_stale_owner_record_is_taken_over_and_a_live_one_is_refused(tmp_path, caplog, method):
    import socket
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "since": "2026-01-01T00:00:00+00:00", "token": "x"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with caplog.at_level("WARNING"), WorkdirLock(tmp_path, method=method) as lock:
        assert any("stale lock" in r.getMessage() and f"pid {stale['pid']}" in r.getMessage()
                   for r in caplog.records)
        if method == "record":  # the owner record is all there is: another live run is refused, a takeover seen
            with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
                WorkdirLock(tmp_path, method="record").acquire()
            (tmp_path / ".lock").write_text(json.dumps(dict(stale, host="other-host", token="y")))
            with pytest.raises(WorkdirLockedError, match="lock .* was removed or taken over .*host other-host"):
                lock.check()
        else:
            (tmp_path / ".lock").unlink()
            with pytest.raises(WorkdirLockedError, match="was removed or taken over"):
                lock.check()


_LOCK_FIRST_RECORD_LATE = textwrap.dedent("""
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("LOCKED", flush=True)  # a winner between its flock and its owner record
    time.sleep(0.5)
    os.pwrite(fd, json.dumps({"host": "h", "pid": os.getpid(), "since": "then"}).encode(), 0)
    time.sleep(60)
""")


@pytest.mark.parametrize("kind", ["symlink", "dangling_symlink", "hardlink", "directory", "fifo"])
def test_a_planted_lock_file_is_refused_and_nothing_is_written_through_it(tmp_path, kind):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    lock_path = run / ".lock"
    {"symlink": lambda: lock_path.symlink_to(victim), "dangling_symlink": lambda: lock_path.symlink_to(tmp_path / "x"),
     "hardlink": lambda: os.link(victim, lock_path), "directory": lock_path.mkdir,
     "fifo": lambda: os.mkfifo(lock_path)}[kind]()
    what = {"symlink": "a symbolic link", "dangling_symlink": "a symbolic link", "hardlink": "a hard link",
            "directory": "a directory", "fifo": "a FIFO"}[kind]
    with pytest.raises(WorkdirLockedError, match=f"lock file {lock_path} is {what}.*remove it"):
        WorkdirLock(run).acquire()
    assert victim.read_text() == "precious\n"  # on main the symlink's target got the lock's JSON
    assert not (tmp_path / "x").exists()
    assert sorted(os.listdir(run)) == [".lock"]


def test_a_reused_pid_is_reported_as_such_not_as_gone(tmp_path, caplog):
    import socket
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from uvit_jax.workdir_lock import _process_start
        start = _process_start(child.pid)
        record = {"host": socket.gethostname(), "pid": child.pid, "pid_start": start - 1, "since": "then",
                  "token": "x"}
        for method in ("flock", "record"):
            (tmp_path / ".lock").write_text(json.dumps(record))
            caplog.clear()
            with caplog.at_level("WARNING"), WorkdirLock(tmp_path, method=method):
                pass
            lines = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
            assert len(lines) == 1, (method, lines)
            assert f"pid {child.pid} is alive but is another process" in lines[0] and "reused" in lines[0]
            assert "gone" not in lines[0]
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_run_that_loses_the_race_names_the_winner(tmp_path):
    lock_path = tmp_path / ".lock"
    child = subprocess.Popen([sys.executable, "-c", _LOCK_FIRST_RECORD_LATE, str(lock_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "LOCKED"
        with pytest.raises(WorkdirLockedError) as e:  # main said "an unknown process (no owner record)"
            WorkdirLock(tmp_path).acquire()
        assert f"pid {child.pid} since then" in str(e.value)
    finally:
        child.kill()
        child.wait(timeout=30)


def test_two_workdirs_sharing_a_checkpoint_directory_through_a_link_do_not_both_write(digits_dir, tmp_path):
    from uvit_jax import train
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "checkpoints").mkdir(parents=True)
    second.mkdir()
    (second / "checkpoints").symlink_to(first / "checkpoints")
    config = load_config("test_tiny")
    config.dataset.data_dir, config.train.n_steps = digits_dir, 2
    with WorkdirLock(first):  # a run in `first`
        with pytest.raises(WorkdirLockedError, match=f"writes into {first} through a link.*in use by another run"):
            train.train_and_evaluate(config, str(second))  # on main it trained and saved into first/checkpoints
    assert os.listdir(first / "checkpoints") == []
    with WorkdirLock(second) as lock:  # alone it may
        lock.check()
        assert (first / ".lock").exists() and (second / ".lock").exists()
    assert not (first / ".lock").exists() and not (second / ".lock").exists()


def test_a_network_filesystem_is_named_at_start(tmp_path, monkeypatch, caplog):
    from uvit_jax import workdir_lock
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n")
    monkeypatch.setattr(workdir_lock, "_MOUNTS", str(mounts))
    with caplog.at_level("WARNING"), WorkdirLock(tmp_path / "run"):
        pass
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "on a nfs4 filesystem" in lines[0] and "flock" in lines[0], lines
    caplog.clear()
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 {tmp_path} ext4 rw 0 0\n")
    with caplog.at_level("WARNING"), WorkdirLock(tmp_path / "run"):
        pass
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---------------------------------------------------------------------------------------- hostile data files


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution, visible as a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _save_pair(file, first, second):
    pair = np.empty(2, dtype=object)  # the official (older numpy) np.save((a, b)) layout
    pair[0], pair[1] = first, second
    np.save(file, pair, allow_pickle=True)


def test_pickled_payload_in_a_feature_dir_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    features = tmp_path / "features"
    features.mkdir()
    _save_pair(features / "0.npy", _WritesMarker(marker), 3)
    with pytest.raises(ValueError, match=r"features/0.npy: refusing to unpickle io.open"):
        data.latents.ImageNetLatents(str(features))
    hostile = tmp_path / "hostile.npy"
    _save_pair(hostile, _WritesMarker(marker), 3)
    assert not marker.exists()
    # The official format still loads, and a pickle of the wrong shape is a clear error.
    _save_pair(features / "0.npy", np.ones((8, 2, 2), np.float32), np.int64(7))
    source = data.latents.ImageNetLatents(str(features))
    assert source.read(np.array([0]), None, True)["label"].tolist() == [7]
    np.save(features / "0.npy", np.array([1, "two", 3.0], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"0.npy: expected a pickled pair \(moments, label\)"):
        data.latents.ImageNetLatents(str(features))
    # The fixture is live: NumPy's own loader with allow_pickle=True runs it.
    np.load(hostile, allow_pickle=True)
    assert marker.exists()


def _zip_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)


def test_checkpoint_pickles_past_the_limits_are_refused(tmp_path, monkeypatch):
    deep = tmp_path / "deep.pth"  # lists nested 500 levels: refused, not a RecursionError
    _zip_pickle(deep, b"\x80\x02" + b"]" * 500 + b"a" * 499 + b".")
    with pytest.raises(pth.RefusedPickleError, match="deep.pth: refusing a pickle nested more than 100 levels"):
        pth.load_torch_file(deep)
    shared = []
    for _ in range(60):  # 2**60 paths through 60 shared lists: resolved once each
        shared = [shared, shared]
    wide = tmp_path / "wide.pth"
    _zip_pickle(wide, pickle.dumps(shared, protocol=2))
    start = time.monotonic()
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        pth.load_torch_file(wide)
    assert time.monotonic() - start < 5
    good = tmp_path / "good.pth"
    pth.save_torch_file({"w": np.ones((2, 3), np.float32)}, good)
    monkeypatch.setattr(pth, "_MAX_PICKLE_BYTES", 64)
    with pytest.raises(pth.RefusedPickleError, match=r"good.pth: refusing good/data.pkl, larger than 64 bytes"):
        pth.load_torch_file(good)
    monkeypatch.setattr(pth, "_MAX_PICKLE_BYTES", 2 ** 20)
    monkeypatch.setattr(pth, "_MAX_PICKLE_OPS", 10)
    with pytest.raises(pth.RefusedPickleError, match="good.pth: refusing a pickle of more than 10 opcodes"):
        pth.load_torch_file(good)
    monkeypatch.undo()
    assert pth.load_torch_file(good)["w"].shape == (2, 3)


def test_convert_cli_refuses_a_hostile_pickle_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    _zip_pickle(evil, pickle.dumps(_WritesMarker(marker), protocol=2))
    done = subprocess.run([sys.executable, "main.py", "--config", "configs/cifar10_uvit_s2.py", "--workdir",
                           str(tmp_path / "w"), "--mode", "convert", f"--convert_input={evil}",
                           f"--convert_output={tmp_path / 'out'}"], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert lines[-1] == (f"error: {evil}: refusing to unpickle io.open (only tensors, parameters and "
                         "OrderedDicts are allowed in a checkpoint)"), done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sigkill_during_a_save_resumes_bit_for_bit(digits_dir, tmp_path):
    """A run killed (SIGKILL) while a checkpoint is being written resumes from the previous finalized step, cleans
    up the half-written one, and ends bit for bit where an uninterrupted run ends."""
    import glob

    from helpers import tiny_config
    from uvit_jax import train
    n = 8
    straight = train.train_and_evaluate(tiny_config(digits_dir, n_steps=n), str(tmp_path / "straight"))
    workdir = tmp_path / "killed"
    args = [sys.executable, "main.py", "--config", "configs/test_tiny.py", "--workdir", str(workdir),
            f"--config.dataset.data_dir={digits_dir}", f"--config.train.n_steps={n}", "--config.train.save_interval=2"]
    env = dict(ENV, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    child = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_mid_save, deadline = False, time.time() + 240
    try:
        while child.poll() is None and time.time() < deadline:
            steps = [p for p in glob.glob(str(workdir / "checkpoints" / "*")) if os.path.basename(p).isdigit()]
            if glob.glob(str(workdir / "checkpoints" / "*orbax-checkpoint-tmp*")) and steps:
                child.send_signal(signal.SIGKILL)  # a finalized step exists and the next one is being written
                killed_mid_save = True
                break
            time.sleep(0.005)
    finally:
        if child.poll() is None and not killed_mid_save:
            child.kill()
        child.wait(timeout=60)
    if not killed_mid_save:
        pytest.skip("the run finished its saves before a half-written one could be caught")
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not glob.glob(str(workdir / "checkpoints" / "*orbax-checkpoint-tmp*"))
    from uvit_jax import parallel, sample
    config = tiny_config(digits_dir, n_steps=n)
    resumed, where = sample.load_ema_params(config, str(workdir), parallel.make_mesh())
    assert f"step {n}" in where
    for a, b in zip(jax.tree.leaves(straight["ema_params"]), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------ interrupts


def _main_until(args, line_marker, sig, timeout=240):
    """Run main.py, send `sig` when a stderr line contains `line_marker`; returns (returncode, stderr)."""
    env = dict(ENV, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, "main.py", *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in child.stderr:
            lines.append(line)
            if line_marker in line:
                child.send_signal(sig)
                break
        lines += child.communicate(timeout=timeout)[1].splitlines(keepends=True)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    return child.returncode, "".join(lines)


def test_ctrl_c_saves_at_the_next_step_and_sigterm_at_start_up_says_so(digits_dir, tmp_path):
    """Ctrl-C mid-run saves the next step and exits 0 (main: a KeyboardInterrupt traceback, up to save_interval steps
    lost); SIGTERM during sample mode's start-up ends in one line (main: rc -15, nothing said)."""
    workdir = str(tmp_path / "w")
    common = ["--config", "configs/test_tiny.py", "--workdir", workdir, f"--config.dataset.data_dir={digits_dir}"]
    rc, err = _main_until([*common, "--config.train.n_steps=1000", "--config.train.save_interval=1000",
                           "--config.train.eval_interval=1000", "--config.train.log_interval=1"],
                          "step 1/1000", signal.SIGINT)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert "SIGINT: stopping at the next step" in err and "Preemption requested: saved step" in err, err[-3000:]
    steps = [int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 1000

    rc, err = _main_until([*common, "--mode", "sample", "--config.sample.n_samples=16"], "uvit-jax sample",
                          signal.SIGTERM)
    if rc == 0:  # the signal came after start-up: the sampling loop stopped at its next batch, as a preemption
        assert "Preemption requested" in err, err[-3000:]
    else:
        assert rc == 128 + signal.SIGTERM and "Traceback" not in err, (rc, err[-3000:])
        lines = [l for l in err.splitlines() if "error:" in l]
        assert len(lines) == 1 and "stopped by SIGTERM during start-up" in lines[0], err[-3000:]


def test_a_second_ctrl_c_stops_at_once_in_one_line():
    script = textwrap.dedent("""
        import os, signal, time
        from uvit_jax import preemption
        with preemption.stop_guard():
            os.kill(os.getpid(), signal.SIGINT)
            assert preemption.should_stop(1)  # the first one asks the loop to save and stop
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        print("not stopped")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=60)
    assert done.returncode == 128 + signal.SIGINT and "not stopped" not in done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [l for l in done.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Ctrl-C again: stopped at once without saving" in errors[0], done.stderr
