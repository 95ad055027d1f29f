"""Eval mode against each kind of reference file (official mu/sigma only, ADM batches with images, our own
statistics): what each allows is computed, what it does not is named; sample files come from the run's record only,
in the resolution the reference describes."""
import json
import os

import numpy as np
import pytest

import standin_features
from helpers import load_config
from test_main import one_line_error, run_main
from uvit_jax import eval_mode, evaluate, sample


def write_samples(directory, batches, n_samples=None):
    """Sample files and the record sample mode writes beside them (samples.json)."""
    os.makedirs(directory, exist_ok=True)
    record = {"settings": {"n_samples": n_samples or sum(len(b) for b in batches)}, "batch": len(batches[0]),
              "device_count": 8, "files": {}}
    for i, b in enumerate(batches):
        path = os.path.join(directory, f"batch_{i:06d}.npz")
        np.savez(path, images=b)
        record["files"][os.path.basename(path)] = {"images": len(b), "bytes": os.path.getsize(path)}
    with open(os.path.join(directory, sample.RECORD), "w") as f:
        json.dump(record, f)
    return record


def images(seed, n, size=32, channels=1):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The three layouts: official (mu, sigma), ADM (arr_0 images + mu, sigma, mu_s, sigma_s), ours (all)."""
    root = tmp_path_factory.mktemp("refs")
    real = np.repeat(images(1, 24), 3, axis=-1)
    stats = evaluate.compute_feature_stats([real], standin_features.make())
    np.savez(root / "fid_stats_official.npz", mu=stats["mu"], sigma=stats["sigma"])
    np.savez(root / "VIRTUAL_adm.npz", arr_0=real, mu=stats["mu"], sigma=stats["sigma"], mu_s=stats["mu_s"],
             sigma_s=stats["sigma_s"])
    evaluate.save_reference_stats(stats, str(root / "ours.npz"))
    return root


def config_for(tmp_path, ref):
    config = load_config("test_tiny")
    config.eval.feature_fn, config.eval.ref_stats = "standin_features:make", str(ref)
    config.sample.path = str(tmp_path / "samples")
    return config


@pytest.mark.parametrize("ref, computed, skipped", [
    ("fid_stats_official.npz", {"fid", "is"}, {"sfid", "precision/recall", "is_std"}),
    ("VIRTUAL_adm.npz", {"fid", "is", "sfid", "precision", "recall"}, {"is_std"}),
    ("ours.npz", {"fid", "is", "sfid", "precision", "recall"}, {"is_std"}),
])
def test_eval_reports_what_the_reference_allows(tmp_path, references, ref, computed, skipped):
    """6 samples (fewer than the 10 IS splits) against each reference layout: no KeyError, no traceback; what is
    missing is named with its reason (before: KeyError 'sfid' for official files, a ValueError for IS)."""
    write_samples(tmp_path / "samples", [images(2, 4), images(3, 2)])
    metrics = eval_mode.evaluate_workdir(config_for(tmp_path, references / ref), str(tmp_path))
    assert computed <= set(metrics) and not (skipped & set(metrics))
    assert set(metrics["skipped"]) == skipped and metrics["n_samples"] == 6
    assert all(np.isfinite(metrics[k]) for k in computed)
    if "sfid" in skipped:
        assert "mu_s" in metrics["skipped"]["sfid"] and "pool features" in metrics["skipped"]["precision/recall"]
    written = [f for f in os.listdir(tmp_path / "eval") if f.startswith("metrics_")]
    assert json.load(open(tmp_path / "eval" / written[0]))["skipped"] == metrics["skipped"]


def test_eval_reads_only_the_recorded_files_and_names_a_damaged_one(tmp_path, references):
    """Temporaries and strays beside the samples are not samples (before: the glob scored them); a listed file
    that changed size since it was written is named in the error."""
    out = tmp_path / "samples"
    write_samples(out, [images(2, 8), images(3, 4)])
    np.savez(out / "batch_000001.tmp-99999999.npz", images=images(4, 8))  # an interrupted write's leftover
    np.savez(out / "batch_000007.npz", images=images(5, 8))  # not this run's
    config = config_for(tmp_path, references / "ours.npz")
    assert eval_mode.evaluate_workdir(config, str(tmp_path))["n_samples"] == 12
    data = open(out / "batch_000001.npz", "rb").read()
    open(out / "batch_000001.npz", "wb").write(data[:len(data) // 2])
    with pytest.raises(evaluate.SampleFileError, match="batch_000001.npz is .* bytes, written as"):
        eval_mode.evaluate_workdir(config, str(tmp_path))


def test_eval_refuses_samples_of_another_resolution(tmp_path, references):
    """8x8 samples against statistics of 32x32 images: one line, exit 2, nothing written (before: an FID)."""
    write_samples(tmp_path / "w" / "samples", [images(2, 8, size=8, channels=3)])
    r = run_main("--config", "configs/test_tiny.py", "--workdir", str(tmp_path / "w"), "--mode", "eval",
                 "--config.eval.feature_fn=standin_features:make", f"--config.eval.ref_stats={references / 'ours.npz'}")
    one_line_error(r, "samples are 8x8", "32x32")
    assert r.returncode == 2 and not os.path.exists(tmp_path / "w" / "eval")
