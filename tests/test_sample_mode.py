"""Sample mode's files: a record of the settings that made them, resumes that cannot mix or miscount (changed step,
n_samples, batch size: refused; changed device count: exact), leftovers of dead writers removed, the grid of the
first grid_size samples; work sized to what was asked."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from test_main import ROOT, TESTS
from uvit_jax import generate, images, parallel, preemption, sample, train


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(digits_dir, n_steps=4, save_interval=2, eval_interval=4)
    train.train_and_evaluate(config, workdir)
    return workdir


def sample_config(digits_dir, workdir, out, **sample_overrides):
    config = tiny_config(digits_dir)
    config.sample.path = str(out)
    config.sample.update({**dict(n_samples=20, step="2", grid_size=20), **sample_overrides})
    return config


def on_disk(out):
    record = json.load(open(os.path.join(out, sample.RECORD)))
    listed = sorted(record["files"])
    return listed, sum(len(np.load(os.path.join(out, f))["images"]) for f in listed)


def test_reruns_with_other_settings_are_refused_or_set_aside(digits_dir, trained, tmp_path):
    """Before: a rerun with another step appended its images to the first run's, another n_samples or batch size
    miscounted (188 or 288 images for 200). Now each is refused in one line, nothing touched; restart sets the
    old directory aside and ends with exactly n_samples."""
    out = tmp_path / "samples"
    sample.sample_to_dir(sample_config(digits_dir, trained, out), trained)
    assert on_disk(out) == (["batch_000000.npz", "batch_000001.npz"], 20)  # 16 + 4
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    for change, key in [(dict(step="4"), "sample.step"), (dict(n_samples=30), "sample.n_samples"),
                        (dict(mini_batch_size=1), "sample.mini_batch_size"), (dict(sample_steps=3), "sampler")]:
        with pytest.raises(sample.SampleRecordError, match=key) as e:
            sample.sample_to_dir(sample_config(digits_dir, trained, out, **change), trained)
        assert "sample.restart" in str(e.value) and "\n" not in str(e.value)
        assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before
    sample.sample_to_dir(sample_config(digits_dir, trained, out, step="4", n_samples=30, restart=True), trained)
    assert on_disk(out) == (["batch_000000.npz", "batch_000001.npz"], 30)  # 16 + 14
    assert on_disk(tmp_path / "samples.old-1") == (["batch_000000.npz", "batch_000001.npz"], 20)
    assert json.load(open(out / sample.RECORD))["settings"]["params"] == "checkpoint step 4"


def test_resume_on_another_device_count_is_exact(digits_dir, trained, tmp_path, monkeypatch):
    """Stopped after 1 of 2 batches on 8 devices, finished on 3: the files keep the recorded batch (16, padded to
    18 there), exactly n_samples in all, the leftover of a dead writer is removed and a live writer's kept; the
    batch regenerated on 3 devices has the labels and (to rounding) the images of the 8-device one."""
    out = tmp_path / "samples"
    config = sample_config(digits_dir, trained, out)
    monkeypatch.setattr(preemption, "should_stop", lambda made: True)
    sample.sample_to_dir(config, trained)
    monkeypatch.undo()
    assert on_disk(out) == (["batch_000000.npz"], 16)
    first = np.load(out / "batch_000000.npz")
    first = {k: first[k] for k in first.files}
    record = json.load(open(out / sample.RECORD))
    del record["files"]["batch_000000.npz"]  # regenerated on 3 devices too, to compare
    json.dump(record, open(out / sample.RECORD, "w"))
    dead, live = out / "batch_000001.tmp-99999999.npz", out / f"batch_000002.tmp-{os.getpid()}.npz"
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", "configs/test_tiny.py",
                        "--workdir", trained, "--mode", "sample", f"--config.dataset.data_dir={digits_dir}",
                        f"--config.sample.path={out}", "--config.sample.n_samples=20", "--config.sample.step=2",
                        "--config.sample.grid_size=20",
                        "--config.train.batch_size=12"],  # validated in every mode: must split over 3 devices
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "started on 8 devices: its batches stay 16 images (6 per device here)" in r.stderr
    assert "holds 20 of 20 (complete)" in r.stderr
    assert on_disk(out) == (["batch_000000.npz", "batch_000001.npz"], 20)
    assert not dead.exists() and live.exists()
    again = np.load(out / "batch_000000.npz")
    np.testing.assert_array_equal(again["labels"], first["labels"])
    diff = np.abs(again["images"].astype(int) - first["images"].astype(int))
    assert diff.max() <= 2, diff.max()


def test_sample_grid_shows_the_first_grid_size_samples(digits_dir, trained, tmp_path):
    """grid.png holds samples 0..grid_size-1 across files (before: the first file's only)."""
    out = tmp_path / "samples"
    sample.sample_to_dir(sample_config(digits_dir, trained, out), trained)
    shown = np.concatenate([np.load(out / f)["images"] for f in ("batch_000000.npz", "batch_000001.npz")])
    grid = np.asarray(Image.open(out / "grid.png"))
    ncols = 5  # ceil(sqrt(20))
    assert grid.shape == (4 * 34 + 2, ncols * 34 + 2)
    for j in (0, 15, 16, 19):  # the last of the first file and both ends of the second
        r, c = divmod(j, ncols)
        np.testing.assert_array_equal(grid[2 + 34 * r:2 + 34 * r + 32, 2 + 34 * c:2 + 34 * c + 32], shown[j, ..., 0])


def test_work_is_sized_to_what_was_asked(digits_dir):
    """mini_batch_size is per device; fewer images than a mini batch are padded only to the device count
    (before: fid_n_samples=4 or a 4-line prompts file drew a whole global mini batch)."""
    config = tiny_config(digits_dir)
    config.sample.mini_batch_size = 50
    assert generate.batch_size(config, 4) == 8 and generate.batch_size(config, 9) == 16
    assert generate.batch_size(config, 50_000) == 400  # 50 per device on 8, as the official sample2dir
    config.sample.mini_batch_size = 2
    assert generate.batch_size(config, 20) == 16
    sampler = generate.Sampler(config, parallel.make_mesh(), 5)
    assert (sampler.rows, sampler.batch) == (5, 8)


def test_captions_render_beyond_latin1_and_cuts_are_reported(tmp_path):
    """Accents, dashes and a coffee cup render as glyphs, not the font's missing-glyph box (before: boxes)."""
    pictures = np.zeros((1, 16, 16, 3), np.uint8)

    def caption_pixels(text):
        images.captioned_grid(pictures, [text], str(tmp_path / "g.png"))
        return np.asarray(Image.open(tmp_path / "g.png").convert("L"))[16:]

    missing = caption_pixels("\U000f0000")  # a private-use character: no font has it
    for text in ("é", "—", "☕"):
        assert not np.array_equal(caption_pixels(text), missing), text
    assert images.captioned_grid(pictures, ["word " * 200], str(tmp_path / "g.png")) == [0]
    assert images.captioned_grid(pictures, ["short"], str(tmp_path / "g.png")) == []


def test_one_sampling_driver():
    """The sampler is jitted, latents decoded and the empty-text context read in generate.py alone (before: three
    loops in sample.py, eval_mode.py and train.py, each loading the empty context)."""
    package = os.path.join(ROOT, "uvit_jax")
    users = {name: set() for name in ("jit_generate(", "make_decoder(", "load_empty_context(")}
    for folder, _, names in os.walk(package):
        for n in names:
            if n.endswith(".py"):
                source = open(os.path.join(folder, n)).read()
                for name in users:
                    if any(not line.lstrip().startswith("def ") for line in source.splitlines() if name in line):
                        users[name].add(os.path.relpath(os.path.join(folder, n), package))
    # tpu_plan.py compiles the same jitted sampler for a TPU topology; it samples nothing
    assert users == {"jit_generate(": {"generate.py", "tpu_plan.py"}, "make_decoder(": {"generate.py"},
                     "load_empty_context(": {"generate.py"}}
