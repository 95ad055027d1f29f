"""Training system: sharded == unsharded, warm-up/EMA/AdamW numbers, exact resume after SIGTERM, other topologies."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uvit_jax import parallel, preemption, rng, train, train_step
from uvit_jax.benchmark import synthetic_batch

from helpers import load_config, tiny_config


def run_steps(trainer, state, batches):
    for b in batches:
        state, metrics = trainer.step_fn(state, trainer.to_global(b))
    return state, metrics


def host_batches(config, n, seed=0):
    out = []
    for i in range(n):
        b = synthetic_batch(config, config.train.batch_size)
        rng = np.random.default_rng(seed + i)
        b["image"] = rng.uniform(-1, 1, b["image"].shape).astype(np.float32)
        out.append(b)
    return out


def max_abs_diff(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_step_equals_single_device(digits_dir):
    config = tiny_config(digits_dir)
    config.dataset.p_uncond = 0.3  # exercise the condition drop too
    batches = host_batches(config, 3)
    one = train_step.Trainer(config, mesh=parallel.make_mesh(devices=jax.devices()[:1]), null_cond=10)
    eight = train_step.Trainer(config, null_cond=10)
    fsdp = load_config("test_tiny")
    fsdp.mesh.fsdp = 2
    fsdp.dataset.p_uncond = 0.3
    eight_fsdp = train_step.Trainer(fsdp, null_cond=10)
    s1, m1 = run_steps(one, one.init(), batches)
    s8, m8 = run_steps(eight, eight.init(), batches)
    sf, mf = run_steps(eight_fsdp, eight_fsdp.init(), batches)
    assert float(m1["loss"]) > 0
    assert max_abs_diff(s1["params"], s8["params"]) < 1e-6
    assert max_abs_diff(s1["ema_params"], s8["ema_params"]) < 1e-6
    assert max_abs_diff(s1["params"], sf["params"]) < 1e-6
    assert abs(float(m1["loss"]) - float(m8["loss"])) < 1e-6


def test_gradient_accumulation_averages_micro_batch_gradients(digits_dir):
    """An accumulated step applies the mean of the micro-batch gradients (each with its own derived key)."""
    config = tiny_config(digits_dir)
    config.train.grad_accum_steps = 2
    config.optimizer.lr, config.lr_scheduler.warmup_steps = 1e-3, 0
    trainer = train_step.Trainer(config, null_cond=10)
    state = trainer.init()
    params0 = jax.device_get(state["params"])
    host = host_batches(config, 1)[0]
    new_state, metrics = trainer.step_fn(state, trainer.to_global(host))

    loss_fn = train_step.make_loss_fn(config, null_cond=10)
    key = rng.stream_key(config.seed, rng.TRAIN, 0)
    micro = train_step.split_micro_batches(jax.tree.map(jnp.asarray, host), 2)
    results = [jax.value_and_grad(loss_fn)(params0, jax.tree.map(lambda x: x[a], micro), jax.random.fold_in(key, a))
               for a in range(2)]
    grads = jax.tree.map(lambda g0, g1: (g0 + g1) / 2, results[0][1], results[1][1])
    tx = train_step.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params0), params0)
    expected = jax.tree.map(lambda p, u: p + u, params0, updates)
    # Adam's first step is nearly sign(g): params pin the direction, the gradient norm pins the averaging.
    assert max_abs_diff(expected, new_state["params"]) < 1e-5
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx((float(results[0][0]) + float(results[1][0])) / 2, rel=1e-5)


def test_warmup_lr_matches_official_numbers():
    sched = train_step.warmup_schedule(2e-4, 5000)
    lrs = [float(sched(jnp.asarray(k))) for k in range(3)]
    np.testing.assert_allclose(lrs, [0.0, 4e-8, 8e-8], rtol=1e-6, atol=0)
    assert float(sched(jnp.asarray(5000))) == pytest.approx(2e-4)
    assert float(sched(jnp.asarray(10 ** 6))) == pytest.approx(2e-4)  # no decay


def test_adamw_and_ema_follow_the_official_update():
    """Two steps of our optimizer + EMA against a NumPy transcription of torch.optim.AdamW and the official ema()."""
    config = load_config("test_tiny")
    config.optimizer.lr, config.lr_scheduler.warmup_steps = 1e-2, 1
    config.ema_rate = 0.5  # a missed or doubled EMA update moves the result by a visible amount
    tx = train_step.make_optimizer(config)
    p = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = [np.array([0.1, -0.2, 0.3]), np.array([-0.4, 0.5, 0.05])]
    state, ema = tx.init(p), p
    ref_p, m, v = np.array(p["w"]), np.zeros(3), np.zeros(3)
    ref_ema = ref_p.copy()
    b1, b2 = config.optimizer.betas
    wd, eps = config.optimizer.weight_decay, config.optimizer.eps
    for k, g in enumerate(grads):
        upd, state = tx.update({"w": jnp.asarray(g)}, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, upd)
        ema = train_step.ema_update(ema, p, config.ema_rate)
        lr = 1e-2 * min(k / 1, 1.0)
        ref_p = ref_p * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref_p = ref_p - lr * (m / (1 - b1 ** (k + 1))) / (np.sqrt(v / (1 - b2 ** (k + 1))) + eps)
        ref_ema = ref_ema * config.ema_rate + ref_p * (1 - config.ema_rate)
    np.testing.assert_allclose(np.asarray(p["w"]), ref_p, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ema["w"]), ref_ema, rtol=1e-6)
    # the first step ran at lr 0: only step two moved the weights
    assert not np.allclose(ref_p, [0.5, -1.0, 2.0])


def test_train_step_traces_once(digits_dir):
    config = tiny_config(digits_dir)
    traces = []
    step = train_step.make_train_step(config, null_cond=10)

    def counted(state, batch):
        traces.append(1)
        return step(state, batch)

    trainer = train_step.Trainer(config, null_cond=10)
    fn = jax.jit(counted, in_shardings=(trainer.state_sharding, trainer.batch_sharding),
                 out_shardings=(trainer.state_sharding, trainer.replicated), donate_argnums=0)
    state = trainer.init()
    for b in host_batches(config, 3):
        state, _ = fn(state, trainer.to_global(b))
    assert len(traces) == 1


def sigterm_after_step(monkeypatch, stop_step):
    """SIGTERM this process while step `stop_step` runs (when the batch of the step after it is drawn)."""
    original = train.data.make_train_batches

    def batches(*args, start_step=0, **kwargs):
        it = original(*args, start_step=start_step, **kwargs)

        class Wrapped:
            step = start_step

            def __next__(self):
                self.step += 1
                if self.step == stop_step:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(it)

            def close(self):
                it.close()

        return Wrapped()

    monkeypatch.setattr(train.data, "make_train_batches", batches)


def test_exact_resume_after_sigterm_and_on_fewer_devices(digits_dir, tmp_path):
    """8 straight steps == 4 steps, SIGTERM, restart to 8 (bitwise); and a restart on a 4-device mesh continues."""
    n = 8
    straight = train.train_and_evaluate(tiny_config(digits_dir, n_steps=n), str(tmp_path / "straight"))

    config = tiny_config(digits_dir, n_steps=n, save_interval=100)
    workdir = str(tmp_path / "interrupted")
    with pytest.MonkeyPatch.context() as mp:
        sigterm_after_step(mp, n // 2)
        first = train.train_and_evaluate(config, workdir)
    assert int(first["step"]) == n // 2  # stopped early on SIGTERM, after saving
    assert saved_steps(workdir) == [n // 2]
    preemption.reset_preemption_request()  # a real restart is a new process
    resumed = train.train_and_evaluate(tiny_config(digits_dir, n_steps=n), workdir)
    assert int(resumed["step"]) == n
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The checkpoint saved on 8 devices resumes on a 4-device mesh and keeps training.
    four = parallel.make_mesh(devices=jax.devices()[:4])
    more = train.train_and_evaluate(tiny_config(digits_dir, n_steps=n + 2), workdir, mesh=four)
    assert int(more["step"]) == n + 2
    leaf = jax.tree.leaves(more["params"])[0]
    assert len(leaf.sharding.device_set) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(more["params"]))


def test_training_writes_grid_events_and_config(digits_dir, tmp_path):
    config = tiny_config(digits_dir, n_steps=2, eval_interval=2, log_interval=1)
    train.train_and_evaluate(config, str(tmp_path))
    assert os.path.exists(tmp_path / "config.json")
    assert os.path.exists(tmp_path / "grids" / "step_00000002.png")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def saved_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def _force_infinite_lr(config, monkeypatch):
    """optimizer.lr = inf, which config.validate refuses, forced through: the next update makes every param
    non-finite, as a diverging run would."""
    monkeypatch.setattr(train_step, "validate", lambda *args, **kwargs: None)
    config.optimizer.lr = float("inf")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(digits_dir, tmp_path, monkeypatch):
    config = tiny_config(digits_dir, n_steps=4, save_interval=2, log_interval=2)
    train.train_and_evaluate(config, str(tmp_path))  # a good checkpoint at 2 and 4
    config = tiny_config(digits_dir, n_steps=8, save_interval=2, log_interval=2)
    _force_infinite_lr(config, monkeypatch)
    with pytest.raises(train.NonFiniteLossError, match="newest checkpoint is step 4 .*restored at start"):
        train.train_and_evaluate(config, str(tmp_path))
    assert saved_steps(str(tmp_path)) == [2, 4]


def test_nan_just_before_preemption_is_never_saved(digits_dir, tmp_path, monkeypatch):
    """A NaN step followed by SIGTERM: the preemption save refuses the NaN state; step 4 stays the newest."""
    train.train_and_evaluate(tiny_config(digits_dir, n_steps=4, save_interval=2), str(tmp_path))
    config = tiny_config(digits_dir, n_steps=8, save_interval=100, log_interval=100)
    _force_infinite_lr(config, monkeypatch)
    sigterm_after_step(monkeypatch, 5)
    try:
        with pytest.raises(train.NonFiniteLossError, match="non-finite loss or parameters at step 5.*step 4"):
            train.train_and_evaluate(config, str(tmp_path))
    finally:
        preemption.reset_preemption_request()
    assert saved_steps(str(tmp_path)) == [2, 4]


def test_fid_during_training_keeps_the_best_checkpoint_and_sample_mode_uses_it(digits_dir, tmp_path):
    """FID at every save (stand-in features) writes eval/fid_<step>.json; the best step is recorded in best.json,
    survives max_to_keep=1, and sample mode picks it by default."""
    import json

    from uvit_jax import eval_mode, sample
    workdir = str(tmp_path)
    config = tiny_config(digits_dir, n_steps=6, save_interval=2, fid_interval=2, max_to_keep=1, fid_n_samples=16)
    config.eval.feature_fn, config.eval.ref_stats = "standin_features:make", None
    real_fid = eval_mode.make_training_fid_callback(config, workdir)
    pretend = {2: 5.0, 4: 1.0, 6: 3.0}  # the loop sees these instead of the real values

    def callback(step, state):
        record = real_fid(step, state)
        assert np.isfinite(record["fid"])
        return {**record, "fid": pretend[step]}

    train.train_and_evaluate(config, workdir, eval_callback=callback)
    for step in (2, 4, 6):
        record = json.load(open(tmp_path / "eval" / f"fid_{step}.json"))
        assert record["step"] == step and record["n_samples"] == 16 and record["sampler"]["steps"] == 50
    assert json.load(open(tmp_path / "eval" / "best.json")) == {"step": 4, "fid": 1.0}
    assert saved_steps(workdir) == [4, 6]  # max_to_keep=1 kept the newest and the best
    _, where = sample.load_ema_params(config, workdir, parallel.make_mesh())
    assert where == "checkpoint step 4"
    config.sample.step = "latest"
    assert "step 6" in sample.load_ema_params(config, workdir, parallel.make_mesh())[1]


def test_config_differences():
    saved = {"nnet": {"depth": 12, "embed_dim": 512, "mlp_ratio": 4}, "dataset": {"name": "cifar10"},
             "optimizer": {"betas": [0.99, 0.999]}}
    same = {"nnet": {"depth": 12, "embed_dim": 512, "mlp_ratio": 4}, "dataset": {"name": "cifar10", "path": "x"},
            "optimizer": {"betas": (0.99, 0.999)}}
    assert train.config_differences(saved, same, keys=("nnet", "dataset.name", "optimizer")) == []
    other = {"nnet": {"depth": 16, "embed_dim": 512}, "dataset": {"name": "celeba64"}}
    assert train.config_differences(saved, other, keys=("nnet", "dataset.name", "dataset.image_size")) == [
        ("nnet.depth", 12, 16), ("nnet.mlp_ratio", 4, "<missing>"), ("dataset.name", "cifar10", "celeba64")]


class _Killed(Exception):
    """Stands for the process being killed: raised by a scripted FID callback right after a save."""


def _scripted_fids(fids: dict, calls: list):
    """An eval_callback returning the FID chosen for each step (None: the run is killed before that FID)."""
    def callback(step, state):
        calls.append(step)
        if fids[step] is None:
            raise _Killed(step)
        return {"fid": fids[step]}
    return callback


def test_the_best_checkpoint_survives_resumes_with_max_to_keep_1(digits_dir, tmp_path, monkeypatch):
    """A finished run extended twice, FIDs 2156 / 176 / 839 at steps 2 / 4 / 6 (down, then up across resumes), with
    max_to_keep=1: step 4 stays the best, in eval/best.json and on disk, and sample mode restores it. (On the code
    before rundir.py the best came from checkpoint metadata written before the step's own FID: after the second
    resume best.json named step 6 and step 4 was deleted.)"""
    import json

    from uvit_jax import sample
    monkeypatch.setattr(train._GridWriter, "write", lambda *a: None)  # grids are not the point here
    workdir, calls = str(tmp_path), []
    for n_steps, fids in ((2, {2: 2156.0}), (4, {4: 176.0}), (6, {6: 839.0})):
        config = tiny_config(digits_dir, n_steps=n_steps, save_interval=2, fid_interval=2, max_to_keep=1)
        train.train_and_evaluate(config, workdir, eval_callback=_scripted_fids(fids, calls))
    assert calls == [2, 4, 6]
    assert json.load(open(tmp_path / "eval" / "best.json")) == {"step": 4, "fid": 176.0}
    assert saved_steps(workdir) == [4, 6]
    assert sample.load_ema_params(config, workdir, parallel.make_mesh())[1] == "checkpoint step 4"  # sample.step=best


def test_a_step_saved_without_its_fid_gets_it_at_the_next_start(digits_dir, tmp_path, monkeypatch):
    """Killed between the save of step 6 and its FID: the next run computes step 6's FID first; being the lowest,
    step 6 becomes the best, and step 4 (the best until then) was kept through the crash with max_to_keep=1. (On the
    code before rundir.py step 6 never got a FID and step 4 stayed the best.)"""
    import json

    monkeypatch.setattr(train._GridWriter, "write", lambda *a: None)
    workdir, calls = str(tmp_path), []
    config = tiny_config(digits_dir, n_steps=8, save_interval=2, fid_interval=2, max_to_keep=1)
    with pytest.raises(_Killed):
        train.train_and_evaluate(config, workdir, eval_callback=_scripted_fids({2: 5.0, 4: 1.0, 6: None}, calls))
    assert saved_steps(workdir) == [4, 6]  # the best so far outlived max_to_keep=1
    assert json.load(open(tmp_path / "eval" / "best.json")) == {"step": 4, "fid": 1.0}
    train.train_and_evaluate(config, workdir, eval_callback=_scripted_fids({6: 0.5, 8: 3.0}, calls))
    assert calls == [2, 4, 6, 6, 8]
    assert json.load(open(tmp_path / "eval" / "best.json")) == {"step": 6, "fid": 0.5}
    assert saved_steps(workdir) == [6, 8]


@pytest.mark.parametrize("key, value, rule", [
    ("seed", 7, "refuse"), ("train.batch_size", 8, "adapt"), ("optimizer.lr", 5e-4, "warn"),
    ("dtype", "bfloat16", "warn"), ("ema_rate", 0.999, "warn"), ("train.grad_accum_steps", 2, "warn"),
    ("dataset.path", "/data/moved", "warn")])
def test_resume_with_a_changed_setting_follows_its_rule(digits_dir, tmp_path, caplog, key, value, rule):
    """Per key: refuse in one line, or take the new value with one warning line naming old -> new (the batch size
    also continues from the saved data position). (Before: all of these were accepted silently.)"""
    from uvit_jax.checkpoint import CheckpointMismatchError
    saved = tiny_config(digits_dir)
    metadata = {"step": 4, "data_position": 64, "config": train._config_dict(saved)}
    config = tiny_config(digits_dir)
    section, _, name = key.rpartition(".")
    old = (config[section] if section else config)[name]
    (config[section] if section else config)[name] = value
    with caplog.at_level("WARNING"):
        if rule == "refuse":
            with pytest.raises(CheckpointMismatchError, match=rf"{key}: checkpoint {old!r}, now {value!r}\. Use a "
                                                              "new --workdir"):
                train._resume_position(metadata, config, 4, tmp_path)
            return
        position = train._resume_position(metadata, config, 4, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{key}: {old!r} -> {value!r}"), warnings
    assert position == 64


def test_a_resume_with_another_batch_size_continues_from_the_data_position(digits_dir, tmp_path, monkeypatch):
    """Steps 1-2 at batch 16 trained on examples 0-31 of the shuffled stream; a resume at batch 8 goes on with
    examples 32-47 (before: with 16-31, seen twice), saves data position 48, and the change goes to
    config_history.jsonl before config.json is rewritten (before: config.json was silently overwritten)."""
    import json

    from uvit_jax import data
    monkeypatch.setattr(train._GridWriter, "write", lambda *a: None)
    seen, make = [], data.make_train_batches

    def spy(dataset, **kwargs):
        seen.append((kwargs["start_step"], kwargs.get("start_position"), kwargs["global_batch_size"]))
        return make(dataset, **kwargs)

    monkeypatch.setattr(train.data, "make_train_batches", spy)
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(digits_dir, n_steps=2), str(workdir))
    config = tiny_config(digits_dir, n_steps=4, batch_size=8)
    config.optimizer.lr = 5e-4
    train.train_and_evaluate(config, str(workdir))
    assert seen == [(0, 0, 16), (2, 32, 8)]
    metadata = json.loads((workdir / "checkpoints" / "4" / "metadata" / "metadata").read_text())
    assert metadata["data_position"] == 48
    # What the batch-8 steps 3 and 4 read is what one batch-16 step 3 would have read (examples 32-47).
    whole = make(config.dataset, global_batch_size=16, seed=config.seed, start_step=2)
    halves = make(config.dataset, global_batch_size=8, seed=config.seed, start_step=2, start_position=32)
    try:
        np.testing.assert_array_equal(np.concatenate([next(halves)["image"], next(halves)["image"]]),
                                      next(whole)["image"])
    finally:
        whole.close()
        halves.close()
    history = [json.loads(line) for line in open(workdir / "config_history.jsonl")]
    assert len(history) == 1 and history[0]["step"] == 2
    assert history[0]["changed"]["train.batch_size"] == [16, 8]
    assert history[0]["changed"]["optimizer.lr"] == [1e-3, 5e-4]
    assert json.load(open(workdir / "config.json"))["train"]["batch_size"] == 8


def test_bfloat16_train_step_runs(digits_dir):
    """The accelerator default: the network computes in bfloat16 while params, optimizer state and EMA stay float32."""
    config = tiny_config(digits_dir)
    config.dtype = "bfloat16"
    trainer = train_step.Trainer(config, null_cond=10)
    state, metrics = run_steps(trainer, trainer.init(), host_batches(config, 2))
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["all_finite"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
