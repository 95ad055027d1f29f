"""main.py end to end on the tiny config: every mode (train, sample, eval, benchmark, convert) and the mistakes a
person makes, each ending in one line without a traceback."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np

from helpers import ROOT, tiny_config
from uvit_jax import convert, generate, parallel, sample, train

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_main(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r, *fragments):
    """Failed, with a single `error:` line naming every fragment, and no traceback."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_unknown_config_key_fails_fast_naming_it(tmp_path):
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--config.train.n_step=3")
    line = one_line_error(r, "n_step", 'Did you mean "n_steps"')
    assert "\\n" not in line and "\\'" not in line  # not an escaped repr
    assert not os.listdir(tmp_path)


def test_invalid_config_value_fails_naming_the_key(tmp_path):
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--config.train.batch_size=12")
    one_line_error(r, "config.train.batch_size")
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--config.dataset.name=mnist")
    one_line_error(r, "config.dataset.name", "mnist")
    assert not os.listdir(tmp_path)


def test_device_count_other_than_the_launch_expects_stops(tmp_path):
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--config.mesh.expect_devices=3")
    one_line_error(r, "sees 8 devices", "expected 3", "mesh.expect_devices")
    assert not os.listdir(tmp_path)


def test_missing_dataset_fails_fast_with_a_clear_message(tmp_path):
    empty = tmp_path / "no_tfds_here"
    empty.mkdir()
    r = run_main("--config", "configs/cifar10_uvit_s2.py", "--workdir", str(tmp_path / "w"),
                 f"--config.dataset.data_dir={empty}", "--config.dtype=float32", timeout=120)
    one_line_error(r, "cifar10", str(empty), "tfds build")
    assert not os.path.exists(tmp_path / "w")


def test_sample_and_eval_on_an_empty_workdir_say_what_to_do(tmp_path):
    workdir = tmp_path / "never_trained"
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(workdir), "--mode", "sample")
    one_line_error(r, "Train first", "sample.params_dir")
    assert not os.path.exists(workdir)  # nothing left behind in a wrong workdir
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(workdir), "--mode", "eval")
    one_line_error(r, "--config.eval.inception_path=", "pt_inception-2015-12-05")


def test_every_mode_through_main(digits_dir, tmp_path):
    """train -> rerun (finished) -> sample (exact count, grid) -> eval (stand-in features) -> benchmark -> convert
    (our params -> official .pth -> our params, bit-exact), all through main.py."""
    workdir = str(tmp_path / "run")
    common = ["--config", "configs/test_tiny.py", "--workdir", workdir, f"--config.dataset.data_dir={digits_dir}"]
    r = run_main(*common, "--config.train.n_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "grids", "step_00000002.png"))
    assert "step 2/2  loss" in r.stderr and "ETA" in r.stderr
    assert "Training done at step 2" in r.stderr and "tensorboard --logdir" in r.stderr
    assert "orbax" not in r.stderr.lower() and "Downloading" not in r.stderr
    assert len(r.stderr.splitlines()) < 25, r.stderr

    r = run_main(*common, "--config.train.n_steps=2")
    assert r.returncode == 0 and "already finished" in r.stderr and "--config.train.n_steps=" in r.stderr

    r = run_main(*common, "--mode", "sample", "--config.sample.n_samples=20")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sample.sample_files(os.path.join(workdir, "samples"))
    assert sum(np.load(f)["images"].shape[0] for f in files) == 20
    assert "Wrote 20 samples this run" in r.stderr and "grid.png" in r.stderr
    assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))

    r = run_main(*common, "--mode", "eval", "--config.eval.feature_fn=standin_features:make")
    assert r.returncode == 0, r.stderr[-3000:]
    written = glob.glob(os.path.join(workdir, "eval", "metrics_*.json"))
    metrics = json.load(open(written[0]))
    assert metrics["n_samples"] == 20 and np.isfinite(metrics["fid"]) and "ref_stats_uvit_digits_32" in metrics["reference"]

    r = run_main(*common, "--mode", "benchmark", "--benchmark_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    bench = json.load(open(os.path.join(workdir, "benchmark.json")))
    assert bench["step_s"] > 0 and bench["global_batch"] == 16

    # convert: the EMA params as a converted dir -> official .pth -> converted again, identical
    config = tiny_config(digits_dir)
    params, _ = sample.load_ema_params(config, workdir, parallel.make_mesh())
    params = jax.device_get(params)
    convert.save_converted(str(tmp_path / "ours"), params, dict(config.nnet))
    pth = str(tmp_path / "nnet_ema.pth")
    r = run_main(*common, "--mode", "convert", "--convert_to_official", f"--convert_input={tmp_path / 'ours'}",
                 f"--convert_output={pth}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_main(*common, "--mode", "convert", f"--convert_input={pth}")
    assert r.returncode == 0, r.stderr[-3000:]
    _, back = convert.load_converted(os.path.join(workdir, "converted"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(back))):
        np.testing.assert_array_equal(a, b)


def test_sample_resume_regenerates_only_the_lost_batch(digits_dir, tmp_path):
    """Sample mode writes exactly N images; a re-run after losing a batch regenerates just that batch, identically;
    a converted-params dir of the same EMA params samples the same images."""
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
    assert labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) > 5

    lost = files[1]
    before = {f: os.path.getmtime(f) for f in files if f != lost}
    os.remove(lost)
    sample.sample_to_dir(config, workdir)
    np.testing.assert_array_equal(np.load(lost)["images"], images[1])
    assert all(os.path.getmtime(f) == t for f, t in before.items())

    params, _ = sample.load_ema_params(config, workdir, parallel.make_mesh())
    convert.save_converted(str(tmp_path / "converted"), jax.device_get(params), dict(config.nnet))
    config.sample.params_dir = str(tmp_path / "converted")
    config.sample.path = str(tmp_path / "from_converted")
    config.sample.n_samples = 16
    sample.sample_to_dir(config, workdir)
    np.testing.assert_array_equal(np.load(tmp_path / "from_converted" / "batch_000000.npz")["images"], images[0])


def test_quickstart_config_runs_end_to_end(digits_dir, tmp_path):
    """A few steps of the real quickstart config through main.py, with its grid (the full run is a README command)."""
    r = run_main("--config", "configs/quickstart.py", "--workdir", str(tmp_path), f"--config.dataset.data_dir={digits_dir}",
                 "--config.train.n_steps=3", "--config.train.eval_interval=3", "--config.train.log_interval=1",
                 "--config.train.save_interval=3", "--config.sample.grid_size=20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(tmp_path / "grids" / "step_00000003.png")
    assert "step 3/3  loss" in r.stderr


def test_label_distributions(digits_dir, tmp_path):
    """"dataset" draws sample labels from the training set's class frequencies (read once, cached); the draw follows
    the given probabilities."""
    config = tiny_config(digits_dir)
    config.sample.label_distribution = "dataset"
    probs = generate.label_probabilities(config, str(tmp_path), 10)
    np.testing.assert_allclose(probs, np.full(10, 0.1))  # the bundled digits: 500 of each
    assert os.path.exists(tmp_path / "eval" / "class_frequencies_uvit_digits.npy")
    skewed = np.array([0.7, 0.3] + [0.0] * 8)
    labels = np.asarray(generate.sample_labels(jax.random.key(0), 4000, skewed))
    assert set(np.unique(labels)) == {0, 1} and abs((labels == 0).mean() - 0.7) < 0.03


_RAISING_MAIN = """
import runpy, sys
from uvit_jax import console, sample
which = sys.argv.pop()
def raise_it(config, workdir):
    if which == "bug":
        open("/nonexistent-internal-cache/table.bin")  # a FileNotFoundError from inside the program
    raise console.MissingFileError("config.sample.prompts=p.txt not found (a text file, one prompt a line)")
sample.sample_to_dir = raise_it
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def test_only_errors_raised_for_user_input_are_one_line(tmp_path):
    """A missing file the user named is one `error:` line (exit code 2); a FileNotFoundError from inside the program
    is a bug and keeps its traceback. (Before: every FileNotFoundError was printed as a one-line user mistake.)"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    args = ["--config", "configs/test_tiny.py", "--workdir", str(tmp_path), "--mode", "sample"]
    user, bug = (subprocess.run([sys.executable, "-c", _RAISING_MAIN, *args, which], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300) for which in ("user", "bug"))
    one_line_error(user, "config.sample.prompts=p.txt not found")
    assert user.returncode == 2
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "/nonexistent-internal-cache/table.bin" in bug.stderr
    assert not any(line.startswith("error:") for line in bug.stderr.splitlines())
