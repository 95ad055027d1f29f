"""FID / sFID / IS / precision-recall machinery against direct references and constructed known answers."""
import warnings

import numpy as np
import pytest
import scipy.linalg

import standin_features
from uvit_jax import evaluate


def pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, written out: scipy sqrtm of sigma1 @ sigma2, 1e-6 offset fallback."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular products
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n", [500, 20])  # 20 samples in 48 dims: rank-deficient covariances
def test_frechet_distance_matches_reference(n):
    rng = np.random.default_rng(0)
    d = 48
    x = np.abs(rng.standard_normal((n, d)) @ rng.standard_normal((d, d))) * 0.2 + 0.3
    y = rng.standard_normal((n, d)) * 0.5 + 0.35
    (m1, s1), (m2, s2) = _stats(x), _stats(y)
    assert np.linalg.matrix_rank(s1) == min(n - 1, d)
    got = evaluate.frechet_distance(m1, s1, m2, s2)
    np.testing.assert_allclose(got, pytorch_fid_reference(m1, s1, m2, s2), rtol=1e-6)
    assert abs(evaluate.frechet_distance(m1, s1, m1, s1)) < 1e-5 * np.trace(s1)
    assert evaluate.sfid(m1, s1, m2, s2) == got


def test_frechet_distance_near_singular_and_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    lam1 = np.concatenate([rng.uniform(0.5, 2, 12), [1e-13, 1e-14, 0, 0]])
    s1 = (q * lam1) @ q.T
    s1 = (s1 + s1.T) / 2
    lam2 = rng.uniform(0.5, 2, 16)
    s2 = (q * lam2) @ q.T  # commutes with s1: tr sqrt(s1 s2) = sum sqrt(lam1 * lam2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    got = evaluate.frechet_distance(mu1, s1, mu2, s2)
    exact = np.sum((mu1 - mu2) ** 2) + lam1.sum() + lam2.sum() - 2 * np.sqrt(np.clip(lam1, 0, None) * lam2).sum()
    np.testing.assert_allclose(got, exact, rtol=1e-7)
    np.testing.assert_allclose(got, pytorch_fid_reference(mu1, s1, mu2, s2), rtol=1e-5)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        evaluate.frechet_distance(mu1, s1, mu2[:8], s2)


def test_running_stats_equal_numpy_with_masks_and_merge():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((103, 9)) * 0.01 + 1e3  # large mean, small spread: a naive sum-of-squares cancels
    a, b = evaluate.RunningStats(9), evaluate.RunningStats(9)
    kept = []
    for i, start in enumerate(range(0, 103, 16)):
        batch = x[start:start + 16]
        mask = rng.random(len(batch)) < 0.7
        (a if i % 2 else b).update(batch, mask)
        kept.append(batch[mask])
    kept = np.concatenate(kept)
    a.merge(b)
    assert a.n == len(kept)
    np.testing.assert_allclose(a.mean, kept.mean(0), rtol=1e-14)
    np.testing.assert_allclose(a.cov, np.cov(kept, rowvar=False), rtol=1e-8, atol=1e-14)


def test_inception_score_known_answers():
    assert evaluate.inception_score(np.zeros((100, 1008)), splits=10) == pytest.approx((1.0, 0.0))
    classes = 20
    onehot = np.tile(np.eye(classes), (10, 1)) * 60.0  # each split of 20 holds every class once, confidently
    mean, std = evaluate.inception_score(onehot, splits=10)
    assert mean == pytest.approx(classes, rel=1e-6) and std < 1e-6
    probs = np.tile(np.eye(classes), (10, 1))
    assert evaluate.inception_score(probs, splits=10, from_logits=False)[0] == pytest.approx(classes)
    # Two confident classes, equally often: IS = 2, whatever the per-sample confidence ordering.
    assert evaluate.inception_score(np.repeat(np.eye(2), 50, 0)[np.random.default_rng(0).permutation(100)] * 60,
                                    splits=1)[0] == pytest.approx(2.0, rel=1e-6)


def brute_force_pr(real, fake, k):
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_rad = np.sort(d2(real, real), axis=1)[:, k]
    f_rad = np.sort(d2(fake, fake), axis=1)[:, k]
    precision = (d2(fake, real) <= r_rad[None, :]).any(1).mean()
    recall = (d2(real, fake) <= f_rad[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_known_answers_and_reference():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((60, 8)).astype(np.float32)
    assert evaluate.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert evaluate.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    fake = (rng.standard_normal((45, 8)) + 1.0).astype(np.float32)
    want = brute_force_pr(real.astype(np.float64), fake.astype(np.float64), k=3)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    for block in (4096, 7):  # one block, and many padded blocks
        got = evaluate.precision_recall(real, fake, k=3, block_size=block)
        np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError, match="more than k=3"):
        evaluate.precision_recall(real[:3], fake, k=3)


def test_to_uint8_rgb_matches_the_png_round_trip():
    x = np.linspace(-1.2, 1.2, 2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
    got = evaluate.to_uint8_rgb(x)
    v = np.clip((x + 1) / 2, 0, 1)  # unpreprocess, then torchvision save_image: mul(255).add(0.5).clamp, to uint8
    want = np.clip(v * 255 + 0.5, 0, 255).astype(np.uint8)
    assert got.shape == (2, 4, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.repeat(want, 3, -1))
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(evaluate.to_uint8_rgb(u8 / 127.5 - 1.0)[..., :1], u8)  # exact for dataset images
    with pytest.raises(ValueError, match="C in"):
        evaluate.to_uint8_rgb(np.zeros((2, 4, 4, 2), np.uint8))


@pytest.fixture(scope="module")
def feature_fn():
    return standin_features.make_standin_feature_fn(0)


def _images(seed, n, shift=0):
    return np.random.default_rng(seed).integers(0 + shift, 200 + shift, (n, 12, 12, 3)).astype(np.uint8)


def test_compute_feature_stats_streaming_with_padding(feature_fn):
    images = _images(4, 37)
    full = {k: np.asarray(v, np.float64) for k, v in feature_fn(images).items()}
    # Every batch carries 2 masked rows; the last is also shorter (5 + 2 rows), so it gets zero-padded as well.
    chunks = [images[i:i + 8] for i in range(0, 37, 8)]
    masked = [(np.concatenate([c, images[:2]]), np.arange(len(c) + 2) < len(c)) for c in chunks]
    for batches in ([images[i:i + 10] for i in range(0, 37, 10)], masked,
                    [{"image": images[i:i + 16] / 127.5 - 1.0} for i in range(0, 37, 16)]):
        stats = evaluate.compute_feature_stats(iter(batches), feature_fn, max_pool_features=30)
        assert stats["n"] == 37
        np.testing.assert_allclose(stats["mu"], full["pool"].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["sigma"], np.cov(full["pool"], rowvar=False), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats["mu_s"], full["spatial"].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["sigma_s"], np.cov(full["spatial"], rowvar=False), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats["logits"], full["logits"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats["pool_features"], full["pool"][:30], rtol=1e-5, atol=1e-6)


def test_feature_pass_reports_progress_with_eta(feature_fn, caplog):
    """A long feature pass logs images done of the total with an ETA; the last line says it finished."""
    from uvit_jax import console
    images = _images(5, 30)
    with caplog.at_level("INFO"):
        evaluate.compute_feature_stats((images[i:i + 10] for i in range(0, 30, 10)), feature_fn,
                                       progress=console.Progress("features", 30, every_s=0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert [line.split()[1] for line in lines] == ["10/30", "20/30", "30/30"]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    assert console.format_duration(7385) == "2h03m" and console.format_duration(65) == "1m05s"


def test_iter_npz_batches(tmp_path):
    paths = []
    for i, n in enumerate((5, 9, 3)):
        paths.append(str(tmp_path / f"batch_{i}.npz"))
        np.savez(paths[-1], images=np.full((n, 2, 2, 3), i, np.uint8))
    batches = list(evaluate.iter_npz_batches(paths, 4))
    assert [len(b) for b, _ in batches] == [4] * 5 and [int(m.sum()) for _, m in batches] == [4, 4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([b[m] for b, m in batches])[:, 0, 0, 0], [0] * 5 + [1] * 9 + [2] * 3)
    limited = list(evaluate.iter_npz_batches(paths, 4, max_samples=6))
    assert sum(int(m.sum()) for _, m in limited) == 6


def test_evaluate_samples_end_to_end(tmp_path, feature_fn):
    real = _images(5, 64)
    paths = []
    for i in range(3):  # the samples are the reference images themselves, in 3 files
        paths.append(str(tmp_path / f"batch_{i}.npz"))
        np.savez(paths[-1], images=real[i * 22:(i + 1) * 22])
    ref = evaluate.compute_feature_stats([real[:40], real[40:]], feature_fn)
    evaluate.save_reference_stats(ref, str(tmp_path / "ref.npz"))
    same = evaluate.evaluate_samples(paths, str(tmp_path / "ref.npz"), feature_fn, batch_size=16)
    assert set(same) == {"fid", "sfid", "is", "is_std", "precision", "recall", "n_samples", "skipped"}
    assert same["skipped"] == {}
    assert same["n_samples"] == 64 and abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    direct = evaluate.inception_score(evaluate.compute_feature_stats([real], feature_fn)["logits"])[0]
    assert same["is"] == pytest.approx(direct, rel=1e-6)  # IS of the streamed files = IS of the images at once
    np.savez(paths[0], images=_images(6, 22, shift=55))  # a third of the samples from another distribution
    worse = evaluate.evaluate_samples(paths, ref, feature_fn, batch_size=16)
    assert worse["fid"] > 1.0 and worse["sfid"] > 1.0 and worse["precision"] < 1.0


def test_load_reference_stats_layouts(tmp_path, feature_fn):
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(2048).astype(np.float32), np.eye(2048)
    np.savez(tmp_path / "fid_stats_cifar10.npz", mu=mu, sigma=sigma)  # U-ViT / pytorch-fid layout
    ref = evaluate.load_reference_stats(str(tmp_path / "fid_stats_cifar10.npz"))
    assert set(ref) == {"mu", "sigma"} and ref["mu"].dtype == np.float64
    images = _images(8, 20)
    adm = evaluate.compute_feature_stats([images], feature_fn)
    np.savez(tmp_path / "VIRTUAL_x.npz", arr_0=images, mu=adm["mu"], sigma=adm["sigma"], mu_s=adm["mu_s"],
             sigma_s=adm["sigma_s"])  # ADM reference batch layout
    stored = evaluate.load_reference_stats(str(tmp_path / "VIRTUAL_x.npz"))
    assert "pool_features" not in stored and stored["mu_s"].shape == adm["mu_s"].shape
    full = evaluate.load_reference_stats(str(tmp_path / "VIRTUAL_x.npz"), feature_fn, batch_size=8)
    np.testing.assert_allclose(full["pool_features"], adm["pool_features"], rtol=1e-5, atol=1e-6)
    evaluate.save_reference_stats(adm, str(tmp_path / "ours.npz"), max_pool_features=12)
    ours = evaluate.load_reference_stats(str(tmp_path / "ours.npz"))
    assert set(ours) == {"mu", "sigma", "mu_s", "sigma_s", "pool_features", "image_size"}
    assert tuple(ours["image_size"]) == (12, 12) and tuple(full["image_size"]) == (12, 12)
    np.testing.assert_array_equal(ours["pool_features"], adm["pool_features"][:12])
    np.savez(tmp_path / "images_only.npz", arr_0=images)
    with pytest.raises(ValueError, match="pass feature_fn"):
        evaluate.load_reference_stats(str(tmp_path / "images_only.npz"))
    computed = evaluate.load_reference_stats(str(tmp_path / "images_only.npz"), feature_fn)
    np.testing.assert_allclose(computed["sigma_s"], adm["sigma_s"], rtol=1e-4, atol=1e-6)
    np.savez(tmp_path / "other.npz", activations=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"unknown reference layout, keys \['activations'\]"):
        evaluate.load_reference_stats(str(tmp_path / "other.npz"))
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(3))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        evaluate.load_reference_stats(str(tmp_path / "bad.npz"))
