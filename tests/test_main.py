"""main.py end to end: train (and resume), sample (and resume), eval; bad config and missing data fail fast."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import ROOT, tiny_config
from uvit_jax import sample, train


def run_main(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_fails_fast_naming_it(tmp_path):
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--config.train.bogus_key=3")
    assert r.returncode != 0
    assert "bogus_key" in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_invalid_config_value_fails_naming_the_key(tmp_path):
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--config.train.batch_size=12")
    assert r.returncode != 0
    assert "config.train.batch_size" in r.stderr


def test_missing_dataset_fails_fast_with_a_clear_message(tmp_path):
    empty = tmp_path / "no_tfds_here"
    empty.mkdir()
    r = run_main("--config", "configs/cifar10_uvit_s2.py", "--workdir", str(tmp_path / "w"),
                 f"--config.dataset.data_dir={empty}", "--config.dtype=float32", timeout=120)
    assert r.returncode != 0
    assert "cifar10" in r.stderr and str(empty) in r.stderr


def test_main_trains_then_resumes(digits_dir, tmp_path):
    workdir = str(tmp_path / "run")
    common = ["--config", "configs/test_tiny.py", "--workdir", workdir, f"--config.dataset.data_dir={digits_dir}"]
    r = run_main(*common, "--config.train.n_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "grids", "step_00000002.png"))
    # the resumed run also computes FID-16 every 2 steps (stand-in features, reference stats from the digits)
    r = run_main(*common, "--config.train.n_steps=4", "--config.train.fid_interval=2",
                 "--config.train.fid_n_samples=16", "--config.eval.inception_path=standin",
                 "--config.eval.ref_stats=", "--config.eval.batch_size=256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from step 2" in r.stderr
    assert "step 4: FID-16" in r.stderr
    assert os.path.exists(os.path.join(workdir, "eval", "ref_stats_uvit_digits_32.npz"))
    assert sorted(int(os.path.basename(d)) for d in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                  if os.path.basename(d).isdigit())[-1] == 4


def test_sample_resume_and_eval(digits_dir, tmp_path):
    """Sample mode writes exactly N images; a re-run after losing a batch regenerates just that batch, identically;
    eval mode writes metrics computed with a stand-in feature network."""
    workdir = str(tmp_path)
    config = tiny_config(digits_dir, n_steps=2)
    train.train_and_evaluate(config, workdir)
    config.sample.n_samples = 40  # batches of 16: 16 + 16 + 8
    out = sample.sample_to_dir(config, workdir)
    files = sample.sample_files(out)
    assert len(files) == 3
    images = [np.load(f)["images"] for f in files]
    assert sum(len(x) for x in images) == 40
    assert images[0].dtype == np.uint8 and images[0].shape[1:] == (32, 32, 1)
    labels = np.concatenate([np.load(f)["labels"] for f in files])
    assert labels.min() >= 0 and labels.max() <= 9

    # "preempted" before batch 1 was written: a re-run makes only that batch, identical to the lost one
    lost = files[1]
    before = {f: os.path.getmtime(f) for f in files if f != lost}
    os.remove(lost)
    sample.sample_to_dir(config, workdir)
    np.testing.assert_array_equal(np.load(lost)["images"], images[1])
    assert all(os.path.getmtime(f) == t for f, t in before.items())
    assert sum(np.load(f)["images"].shape[0] for f in sample.sample_files(out)) == 40

    # the same EMA params as a converted-checkpoint dir (what `python -m uvit_jax.convert` writes) sample the same
    from uvit_jax import convert
    params, _ = sample.load_ema_params(config, workdir)
    convert.save_converted(str(tmp_path / "converted"), jax.device_get(params), dict(config.nnet))
    config.sample.params_dir = str(tmp_path / "converted")
    config.sample.path = str(tmp_path / "from_converted")
    config.sample.n_samples = 16
    sample.sample_to_dir(config, workdir)
    np.testing.assert_array_equal(np.load(tmp_path / "from_converted" / "batch_000000.npz")["images"], images[0])
    config.sample.params_dir, config.sample.path = None, None

    config.eval.inception_path = "standin"
    config.eval.ref_stats = None
    metrics = sample.evaluate_workdir(config, workdir)
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(metrics[k]), k
    assert metrics["n_samples"] == 40
    written = glob.glob(os.path.join(workdir, "eval", "metrics_*.json"))
    assert len(written) == 1 and json.load(open(written[0]))["fid"] == pytest.approx(metrics["fid"])


def test_quickstart_config_runs_end_to_end(digits_dir, tmp_path):
    """A few steps of the real quickstart config through main.py, with its grid (the full run is a README command)."""
    r = run_main("--config", "configs/quickstart.py", "--workdir", str(tmp_path), f"--config.dataset.data_dir={digits_dir}",
                 "--config.train.n_steps=3", "--config.train.eval_interval=3", "--config.train.log_interval=1",
                 "--config.sample.grid_size=20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(tmp_path / "grids" / "step_00000003.png")
    assert "loss=" in r.stderr
