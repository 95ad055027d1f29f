"""Checkpointer: round trip, checksum record, re-sharding onto fewer devices, clear errors, SIGTERM, EMA-only restore.

Faults (corrupt steps, failed saves, the workdir lock, hostile files) are in test_faults.py.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from uvit_jax import preemption
from uvit_jax.checkpoint import CheckpointMismatchError, Checkpointer, NoCheckpointError, restore_ema_params
from uvit_jax.convert.uvit import read_params_dir as load_params_dir
from uvit_jax.integrity import NonFiniteStateError
from uvit_jax.parallel import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sharding(mesh, x):
    """2-D leaves split over (data, fsdp), 1-D leaves over fsdp, the rest replicated (when the sizes divide)."""
    d, f = mesh.shape["data"], mesh.shape["fsdp"]
    if x.ndim == 2 and x.shape[0] % d == 0 and x.shape[1] % f == 0:
        return NamedSharding(mesh, P("data", "fsdp"))
    if x.ndim == 1 and x.shape[0] % f == 0:
        return NamedSharding(mesh, P("fsdp"))
    return NamedSharding(mesh, P())


def _make_state(mesh, step=0, scale=1.0):
    """A small train-state-like dict: int32 step, params, EMA (different values), AdamW state (namedtuples)."""
    params = {"dense": {"kernel": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) * scale,
                        "bias": jnp.linspace(-1, 1, 16, dtype=jnp.float32)},
              "emb": jnp.full((3, 5), 0.5 * scale, jnp.bfloat16)}
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
    state = {"step": jnp.asarray(step, jnp.int32), "params": params,
             "ema_params": jax.tree.map(lambda p: p * 2 + 1, params), "opt_state": opt_state}
    return jax.device_put(state, jax.tree.map(lambda x: _sharding(mesh, x), state))


def _abstract(state, mesh):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(mesh, x)), state)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def _assert_shardings(tree, abstract):
    for x, a in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)):
        assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)


def _snapshot(directory):
    """Every path under `directory` with its size and modification time."""
    return sorted((os.path.relpath(os.path.join(root, name), directory), os.stat(os.path.join(root, name)).st_size,
                   os.stat(os.path.join(root, name)).st_mtime_ns)
                  for root, dirs, files in os.walk(directory) for name in dirs + files)


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(fsdp=2)


def test_save_restore_round_trip_and_max_to_keep(tmp_path, mesh8):
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=2)
    saved = {}
    for step in (2, 4, 5):
        state = _make_state(mesh8, step, scale=step)
        saved[step] = state
        assert ckpt.save(step, state, {"config": {}, "data_position": step * 4})
        ckpt.check_health()
    assert not ckpt.save(5, saved[4], {"config": {}, "data_position": 16})  # never overwrites
    assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5

    abstract = _abstract(saved[5], mesh8)
    state, metadata, step = ckpt.restore_latest(abstract)  # right after an async save: it waits, not "corrupt"
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]
    assert step == 5 and int(state["step"]) == 5
    assert metadata == {"config": {}, "data_position": 20}  # the checksum record is the checkpointer's own
    _assert_tree_equal(state, saved[5])
    _assert_shardings(state, abstract)
    assert type(state["opt_state"][0]).__name__ == "ScaleByAdamState"
    on_disk = json.loads((tmp_path / "checkpoints" / "5" / "metadata" / "metadata").read_text())
    assert on_disk["checksums"]["step"] == 5
    leaves = on_disk["checksums"]["leaves"]
    assert len(leaves) == len(jax.tree.leaves(saved[5])) and leaves["params/emb"]["dtype"] == "bfloat16"
    assert leaves["params/dense/kernel"]["sum"] != leaves["ema_params/dense/kernel"]["sum"]

    # A fresh Checkpointer (a restarted run) sees the same steps; an empty directory gives None.
    with Checkpointer(tmp_path / "checkpoints") as again:
        assert again.all_steps() == [4, 5]
        assert again.restore_latest(abstract)[2] == 5
    with Checkpointer(tmp_path / "empty") as empty:
        assert empty.restore_latest(abstract) is None


def test_protected_step_outlives_max_to_keep(tmp_path, mesh8):
    state = _make_state(mesh8, 1)
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (2, 4, 6, 8):
            ckpt.save(step, state, {})
            if step == 4:
                ckpt.protect_step(4)  # e.g. the best FID so far
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6, 8]
        ckpt.protect_step(8)  # a better one: 4 goes back to the normal policy
        ckpt.save(10, state, {})
        ckpt.wait()
        assert ckpt.all_steps() == [8, 10]
    assert sorted(os.listdir(tmp_path), key=int) == ["8", "10"]


def test_constructor_has_no_side_effects_but_the_directory(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert signal.getsignal(signal.SIGTERM) is before  # signal handling belongs to the loop (preemption.py)
    assert os.listdir(tmp_path) == ["checkpoints"] and os.listdir(tmp_path / "checkpoints") == []
    ckpt.close()
    ckpt.close()  # idempotent


def test_restore_onto_fewer_devices_and_fsdp_layout(tmp_path, mesh8):
    state8 = _make_state(mesh8, 7)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state8, {"data_position": 0})
    mesh4 = make_mesh(fsdp=4, devices=jax.devices()[:4])
    abstract4 = _abstract(state8, mesh4)
    with Checkpointer(tmp_path) as ckpt:
        state4, _, step = ckpt.restore_latest(abstract4)
    assert step == 7
    _assert_tree_equal(state4, state8)
    _assert_shardings(state4, abstract4)
    kernel = state4["params"]["dense"]["kernel"]
    assert len(kernel.sharding.device_set) == 4 and kernel.addressable_shards[0].data.shape == (8, 4)


def test_mismatched_target_is_a_clear_error_and_moves_nothing(tmp_path, mesh8):
    state = _make_state(mesh8, 2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, {})
        ckpt.save(4, state, {})
        ckpt.wait()
        wrong = _abstract(state, mesh8)
        wrong["params"]["dense"]["bias"] = jax.ShapeDtypeStruct((17,), jnp.float32, sharding=NamedSharding(mesh8, P()))
        wrong["params"]["extra"] = wrong["params"]["emb"]
        with pytest.raises(CheckpointMismatchError, match=r"step 4 .*params/extra: missing from the checkpoint; "
                                                          r"params/dense/bias: checkpoint shape \(16,\) != target \(17,\)"):
            ckpt.restore_latest(wrong)
        unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        with pytest.raises(ValueError, match=r"abstract_state\['ema_params'\].*sharding"):
            ckpt.restore_latest(unsharded)
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


def test_restore_ema_params_reads_only_the_ema_subtree_and_creates_nothing(tmp_path, mesh8):
    states = {s: _make_state(mesh8, s, scale=s) for s in (3, 6)}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, {})
    before = _snapshot(tmp_path / "ckpt")
    mesh4 = make_mesh(devices=jax.devices()[:4])
    abstract = _abstract(states[6]["ema_params"], mesh4)
    ema, step = restore_ema_params(tmp_path / "ckpt", abstract)
    ema3, step3 = restore_ema_params(str(tmp_path / "ckpt"), abstract, step=3)
    assert (step, step3) == (6, 3) and set(ema) == {"dense", "emb"}
    _assert_tree_equal(ema, states[6]["ema_params"])
    _assert_shardings(ema, abstract)
    _assert_tree_equal(ema3, states[3]["ema_params"])
    with pytest.raises(NoCheckpointError, match=r"no checkpoint for step 5 in .*ckpt; saved steps: 3, 6"):
        restore_ema_params(tmp_path / "ckpt", abstract, step=5)
    wrong = dict(abstract, emb=jax.ShapeDtypeStruct((5, 3), jnp.bfloat16, sharding=NamedSharding(mesh4, P())))
    with pytest.raises(CheckpointMismatchError, match=r"emb: checkpoint shape \(3, 5\) != target \(5, 3\)"):
        restore_ema_params(tmp_path / "ckpt", wrong)
    # Missing directories and empty ones are NoCheckpointError (a FileNotFoundError), and nothing is created.
    for missing in (tmp_path / "nowhere", tmp_path / "empty"):
        if missing.name == "empty":
            missing.mkdir()
        with pytest.raises(FileNotFoundError, match=f"no checkpoint .*{missing.name}"):
            restore_ema_params(missing, abstract)
    assert not (tmp_path / "nowhere").exists() and os.listdir(tmp_path / "empty") == []
    assert _snapshot(tmp_path / "ckpt") == before


def test_load_params_dir(tmp_path, mesh8):
    params = jax.device_get(_make_state(mesh8)["params"])
    with pytest.raises(FileNotFoundError, match="params is missing"):
        load_params_dir(tmp_path / "nothing_here")
    conv = tmp_path / "converted"
    conv.mkdir()
    (conv / "nnet.json").write_text(json.dumps({"img_size": 32, "depth": 2}))
    with pytest.raises(FileNotFoundError, match=r"converted/params is missing"):
        load_params_dir(conv)
    (conv / "params").mkdir()
    with pytest.raises(ValueError, match="cannot read the params checkpoint"):
        load_params_dir(conv)  # an empty (or half-written) params dir

    (conv / "params").rmdir()
    saver = ocp.StandardCheckpointer()
    saver.save(conv / "params", params)
    saver.wait_until_finished()
    saver.close()
    host, nnet = load_params_dir(conv)
    assert nnet == {"img_size": 32, "depth": 2}
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    _assert_tree_equal(host, params)
    abstract = _abstract(params, mesh8)
    placed, _ = load_params_dir(conv, abstract)
    wrong = dict(abstract, emb=jax.ShapeDtypeStruct((5, 3), jnp.bfloat16, sharding=NamedSharding(mesh8, P())))
    with pytest.raises(CheckpointMismatchError, match=r"emb: checkpoint shape \(3, 5\) != target \(5, 3\)"):
        load_params_dir(conv, wrong)
    _assert_tree_equal(placed, params)
    _assert_shardings(placed, abstract)


def test_typed_keys_bad_metadata_and_nonfinite_state_are_clear_errors(tmp_path, mesh8):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"state\['rng'\] is a typed PRNG key"):
            ckpt.save(1, {"rng": jax.random.key(0), "x": jnp.zeros(2)}, {})
        with pytest.raises(TypeError, match="JSON-serialisable"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"bad": object()})
        with pytest.raises(ValueError, match="'checksums' is reserved"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"checksums": 1})
        state = _make_state(mesh8, 1)
        state["ema_params"]["dense"]["bias"] = state["ema_params"]["dense"]["bias"].at[3].set(jnp.nan)
        with pytest.raises(NonFiniteStateError, match=r"state of step 1: non-finite values in ema_params/dense/bias"):
            ckpt.save(1, state, {})
        assert ckpt.all_steps() == []
    assert os.listdir(tmp_path) == []


def test_checksums_do_not_depend_on_sharding(mesh8):
    from uvit_jax.integrity import digest  # the one property the restore check relies on
    state8 = _make_state(mesh8, 3, scale=3.0)
    mesh4 = make_mesh(fsdp=4, devices=jax.devices()[:4])
    state4 = jax.device_put(state8, jax.tree.map(lambda x: _sharding(mesh4, x), state8))
    host = jax.device_get(state8)
    sums = [[s for _, _, s, _ in digest(tree)] for tree in (state8, state4, host)]
    assert sums[0] == sums[1] == sums[2] and len(set(sums[0])) == len(sums[0])
    flipped = jax.tree.map(lambda x: x, state8)
    kernel = flipped["params"]["dense"]["kernel"]  # one bit of one value changes
    flipped["params"]["dense"]["kernel"] = kernel.at[5, 7].set(jnp.nextafter(kernel[5, 7], jnp.inf))
    changed = [a != b for a, b in zip(sums[0], [s for _, _, s, _ in digest(flipped)])]
    assert sum(changed) == 1


_CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from uvit_jax import preemption
    from uvit_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    state = {"step": jnp.asarray(0, jnp.int32), "params": {"w": jnp.zeros((4, 4))}}
    bump = jax.jit(lambda s: {"step": s["step"] + 1, "params": {"w": s["params"]["w"] + 1.0}})
    with preemption.stop_guard():
        for step in range(1, 100000):
            state = bump(state)
            ckpt.check_health()
            if step % 1000 == 0 or preemption.should_stop(step):
                ckpt.save(step, state, {"data_position": step})
            if preemption.should_stop(step):
                ckpt.close()
                print(f"PREEMPTED {step}", flush=True)
                sys.exit(0)
            print(f"step {step}", flush=True)
            time.sleep(0.01)
""")


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        for line in child.stdout:
            if line.startswith("step 20"):
                child.send_signal(signal.SIGTERM)
                break
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    stopped = [int(line.split()[1]) for line in out.splitlines() if line.startswith("PREEMPTED")]
    assert len(stopped) == 1 and stopped[0] >= 20

    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(make_mesh(), P())),
                "params": {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=NamedSharding(make_mesh(), P()))}}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == stopped  # only the preemption save: no interval or initial save before it
        state, metadata, step = ckpt.restore_latest(abstract)
    assert step == stopped[0] == int(state["step"]) == metadata["data_position"]
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 4), step, np.float32))


def test_stop_guard_sets_the_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    preemption.reset_preemption_request()
    try:
        with preemption.stop_guard():
            assert not preemption.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert preemption.preemption_requested() and preemption.should_stop(2)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        preemption.reset_preemption_request()
