"""Data package: bundled digits builder, deterministic per-process batches, clear errors, preprocessing, latents."""
import os
import socket
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from uvit_jax import data
from uvit_jax.data import preprocess


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_digits(d)
    return d


def _digits(d, **kw):
    return dict(name="uvit_digits", data_dir=d, **kw)


# ---------------------------------------------------------------- bundled digits

def test_bundled_mnist_is_real_digits():
    images, labels = data.load_mnist_5k()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    assert images.min() == 0 and images.max() == 255
    # Real MNIST: black background (the border rows are empty), ~19% of pixels inked.
    assert images[:, 0].max() == 0 and 0.1 < (images > 127).mean() < 0.3


def test_digits_builder_stores_the_csv_exactly(digits_dir):
    csv_images, csv_labels = data.load_mnist_5k()
    builder = data.prepare_digits(digits_dir)  # second call: reuses the prepared copy
    assert builder.info.file_format.value == "array_record"
    assert builder.info.splits["train"].num_examples == 5000
    files = sorted(os.listdir(builder.data_dir))
    mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
    data.prepare_digits(digits_dir)
    assert mtimes == [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]

    seen_img, seen_lab = [], []
    for b in data.make_eval_batches(_digits(digits_dir, image_size=28), global_batch_size=1024,
                                    process_index=0, process_count=1):
        seen_img.append(b["image"][b["mask"]])
        seen_lab.append(b["label"][b["mask"]])
    images, labels = np.concatenate(seen_img), np.concatenate(seen_lab)
    assert images.shape == (5000, 28, 28, 1) and images.min() == -1.0 and images.max() == 1.0
    # Same multiset of (image, label) as the CSV (TFDS reorders examples when writing).
    as_u8 = np.round((images + 1) * 127.5).astype(np.uint8)

    def rows(imgs, labs):
        return sorted(imgs[i].tobytes() + bytes([int(labs[i])]) for i in range(len(imgs)))
    assert rows(as_u8, labels) == rows(csv_images, csv_labels)


def test_digits_padding_and_info(digits_dir):
    info = data.dataset_info(ml_collections.ConfigDict(_digits(digits_dir, image_size=None)))
    assert info == {"image_shape": (32, 32, 1), "num_classes": 10, "num_examples": 5000}
    kw = dict(global_batch_size=16, process_index=0, process_count=1)
    b32 = next(iter(data.make_eval_batches(_digits(digits_dir), **kw)))
    b28 = next(iter(data.make_eval_batches(_digits(digits_dir, image_size=28), **kw)))
    assert b32["image"].shape == (16, 32, 32, 1) and b32["label"].dtype == np.int32
    np.testing.assert_array_equal(b32["image"][:, 2:30, 2:30], b28["image"])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (b32["image"][:, border] == -1.0).all()


# ---------------------------------------------------------------- determinism and sharding

def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_resume_gives_the_same_batches_and_seeds_differ(digits_dir):
    cfg = _digits(digits_dir, random_flip=True)
    kw = dict(global_batch_size=384, process_index=0, process_count=1)  # 5000/384: batch 13 straddles epochs
    run = _take(data.make_train_batches(cfg, seed=3, start_step=0, **kw), 16)
    resumed = _take(data.make_train_batches(cfg, seed=3, start_step=12, **kw), 4)
    for a, b in zip(run[12:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = _take(data.make_train_batches(cfg, seed=4, start_step=12, **kw), 1)[0]
    assert not np.array_equal(other["label"], resumed[0]["label"])
    assert len({r["image"].tobytes() for r in run}) == 16  # consecutive steps differ


def test_process_shards_concatenate_to_the_global_batch(digits_dir):
    cfg = _digits(digits_dir, random_flip=True)
    whole = _take(data.make_train_batches(cfg, global_batch_size=64, seed=7, start_step=5, process_index=0,
                                          process_count=1, num_threads=1), 2)
    for count in (2, 4):
        shards = [_take(data.make_train_batches(cfg, global_batch_size=64, seed=7, start_step=5, process_index=p,
                                                process_count=count), 2) for p in range(count)]
        for step in range(2):
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), whole[step][key])
    with pytest.raises(ValueError, match="split evenly over 3 processes"):
        data.make_train_batches(cfg, global_batch_size=64, seed=0, process_index=0, process_count=3)


def test_epoch_shuffle_is_a_fresh_permutation_per_epoch():
    order = data.EpochShuffle(1000, seed=11)
    e0, e1 = order(np.arange(1000)), order(np.arange(1000, 2000))
    np.testing.assert_array_equal(np.sort(e0), np.arange(1000))
    np.testing.assert_array_equal(np.sort(e1), np.arange(1000))
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, np.arange(1000))
    np.testing.assert_array_equal(order(np.array([1999, 3, 1000])), [e1[999], e0[3], e1[0]])
    np.testing.assert_array_equal(data.EpochShuffle(1000, seed=11)(np.arange(1000)), e0)  # no hidden state


def test_eval_batches_cover_every_example_once_on_all_processes(digits_dir):
    kw = dict(global_batch_size=96, num_examples=250)
    per_proc = [list(data.make_eval_batches(_digits(digits_dir), process_index=p, process_count=2, **kw))
                for p in range(2)]
    assert len(per_proc[0]) == len(per_proc[1]) == 3  # ceil(250 / 96) on every process
    single = list(data.make_eval_batches(_digits(digits_dir), process_index=0, process_count=1, **kw))
    for step in range(3):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in per_proc]), single[step][key])
    assert sum(int(b["mask"].sum()) for b in single) == 250 and not single[-1]["mask"][-1]


def test_random_flip_about_half_and_exact_mirror(digits_dir):
    src = data.PixelSource("uvit_digits", digits_dir, image_size=28, random_flip=True)
    idx = np.arange(2000)
    bits = preprocess.example_bits(5, 0, idx)
    plain, aug = src.read(idx, bits, train=False), src.read(idx, bits, train=True)
    flips = preprocess.flip_bits(bits)
    assert 0.45 < flips.mean() < 0.55
    np.testing.assert_array_equal(aug["image"][flips], plain["image"][flips][:, :, ::-1])
    np.testing.assert_array_equal(aug["image"][~flips], plain["image"][~flips])


# ---------------------------------------------------------------- clear errors, no download


def test_decoded_cache_gives_the_same_batches_and_decodes_each_example_once(digits_dir, monkeypatch):
    cfg = _digits(digits_dir, random_flip=True)
    kw = dict(global_batch_size=384, seed=2, process_index=0, process_count=1)  # 5000/384: 2 epochs in 27 steps
    uncached = _take(data.make_train_batches(dict(cfg, cache_gb=0), **kw), 27)
    decoded = []
    real_decode = data.PixelSource._decode
    def counting_decode(self, indices):  # counts the cached source's decodes (the closed iterator may still read)
        if self._cache is not None:
            decoded.append(len(indices))
        return real_decode(self, indices)
    monkeypatch.setattr(data.PixelSource, "_decode", counting_decode)
    # One reader thread: with several, two chunks of the batch that straddles the epochs may both decode an example.
    cached = _take(data.make_train_batches(dict(cfg, cache_gb=1), num_threads=1, **kw), 27)
    for a, b in zip(uncached, cached):  # flips applied to copies: the cache holds unflipped pixels
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert sum(decoded) == 5000  # the second epoch came from memory
    src = data.PixelSource("uvit_digits", digits_dir, cache_gb=0.001)  # 5000 x 32 x 32 bytes > 1 MB: no cache
    assert src._cache is None

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data pipeline tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["cifar10", "celeb_a", "imagenet2012"])
def test_missing_tfds_dataset_fails_fast_naming_name_and_dir(name, tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as err:
        data.make_train_batches(dict(name=name, data_dir=str(tmp_path)), global_batch_size=8, seed=0)
    assert time.monotonic() - start < 10  # generous: no network retry loop
    msg = str(err.value)
    assert name in msg and str(tmp_path) in msg and "tfds build" in msg and "array_record" in msg
    assert not os.listdir(tmp_path)  # nothing was created or downloaded


def test_tfrecord_dataset_gets_a_conversion_hint(tmp_path):
    data.UvitDigits(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    with pytest.raises(data.DatasetNotPreparedError, match="convert_format.*array_record"):
        data.dataset_info(_digits(str(tmp_path)))


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="'mnist' is not one of"):
        data.dataset_info({"name": "mnist"})


def test_missing_latent_dirs_name_path_and_script(tmp_path):
    missing = str(tmp_path / "imagenet256_features")
    with pytest.raises(data.DatasetNotPreparedError, match="imagenet256_features.*extract_imagenet_feature.py"):
        data.dataset_info({"name": "imagenet_latents", "path": missing})
    # The project's own extraction first (named with the key to set), the official script second.
    with pytest.raises(data.DatasetNotPreparedError, match="--mode extract .*--config.dataset.path=W/features.*"
                                                           "extract_mscoco_feature.py --split=train"):
        data.dataset_info({"name": "mscoco_latents", "path": str(tmp_path)})
    with pytest.raises(data.DatasetNotPreparedError, match="extract_empty_feature.py"):
        data.load_empty_context(str(tmp_path))


# ---------------------------------------------------------------- preprocessing

def test_celeba_crop_box_and_antialiased_resize():
    img = np.zeros((218, 178, 3), np.uint8)
    img[57:185, 25:153] = 200  # exactly the official box; any offset would blend zeros into the border
    out = preprocess.celeba_crop_resize(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and (out == 200).all()

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    out = preprocess.celeba_crop_resize(img, 64).astype(np.float32)
    crop = img[57:185, 25:153].astype(np.float32)
    ref = np.asarray(jax.image.resize(jnp.asarray(crop), (64, 64, 3), "linear", antialias=True))
    assert np.abs(out - ref).max() <= 1.0  # PIL's bilinear = triangle filter widened 2x (antialias), uint8-rounded
    assert np.abs(out - crop[::2, ::2]).mean() > 5  # not plain subsampling


def test_center_crop_arr_odd_sizes():
    for h, w in [(375, 500), (101, 67), (63, 200), (257, 301), (64, 64)]:
        img = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert preprocess.center_crop_arr(img, 64).shape == (64, 64, 3)
    # Short side already 64: no resampling, a centred crop with floored offset (101 - 64) // 2 = 18.
    img = np.random.default_rng(1).integers(0, 256, (64, 101, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess.center_crop_arr(img, 64), img[:, 18:82])
    # 256x300 -> BOX halving twice (exact on 4x4 constant blocks) -> 64x75, crop offset 5.
    blocks = np.random.default_rng(2).integers(0, 256, (64, 75, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(preprocess.center_crop_arr(img, 64), blocks[:, 5:69])
    # A constant image stays constant through every branch (up-scaling a small one included).
    assert (preprocess.center_crop_arr(np.full((40, 90, 3), 77, np.uint8), 64) == 77).all()


def test_to_float_and_pad():
    x = np.array([0, 127, 255], np.uint8)
    np.testing.assert_allclose(preprocess.to_float(x), [-1.0, 127 / 127.5 - 1, 1.0], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="29x29"):
        preprocess.pad_to(np.zeros((29, 29, 1), np.uint8), 32)


# ---------------------------------------------------------------- latent datasets (official file formats)

def _save_pair(file, moments, label):
    pair = np.empty(2, dtype=object)  # what np.save((moments, label)) wrote in the official (older numpy) run
    pair[0], pair[1] = moments, label
    np.save(file, pair)


def test_imagenet_latents_official_format(tmp_path):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((37, 8, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 1000, 37)
    for i in range(37):
        _save_pair(tmp_path / f"{i}.npy", moments[i], np.int64(labels[i]))
    cfg = {"name": "imagenet_latents", "path": str(tmp_path)}
    assert data.dataset_info(cfg) == {"image_shape": (4, 4, 4), "num_classes": 1000, "num_examples": 37,
                                      "moments_shape": (4, 4, 8)}
    kw = dict(global_batch_size=8, seed=1, start_step=6)
    whole = _take(data.make_train_batches(cfg, process_index=0, process_count=1, **kw), 2)
    shards = [_take(data.make_train_batches(cfg, process_index=p, process_count=2, **kw), 2) for p in range(2)]
    idx = data.EpochShuffle(37, seed=1)(6 * 8 + np.arange(16))
    for step in range(2):
        b = whole[step]
        assert b["moments"].shape == (8, 4, 4, 8) and b["moments"].dtype == np.float32
        np.testing.assert_array_equal(b["moments"], moments[idx[step * 8:(step + 1) * 8]].transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(b["label"], labels[idx[step * 8:(step + 1) * 8]])
        for key in ("moments", "label"):
            np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), b[key])


def test_coco_latents_official_format(tmp_path):
    rng = np.random.default_rng(0)
    train = tmp_path / "train"
    train.mkdir()
    n_caps = [1, 3, 5, 2, 4, 5]
    moments = rng.standard_normal((6, 8, 4, 4)).astype(np.float32)
    contexts = {}
    for i, n in enumerate(n_caps):
        np.save(train / f"{i}.npy", moments[i])
        for k in range(n):
            contexts[i, k] = rng.standard_normal((77, 768)).astype(np.float32)
            np.save(train / f"{i}_{k}.npy", contexts[i, k])
    empty = rng.standard_normal((77, 768)).astype(np.float32)
    np.save(tmp_path / "empty_context.npy", empty)

    cfg = {"name": "mscoco_latents", "path": str(tmp_path)}
    assert data.dataset_info(cfg) == {"image_shape": (4, 4, 4), "num_classes": 0, "num_examples": 6,
                                      "moments_shape": (4, 4, 8), "context_shape": (77, 768)}
    np.testing.assert_array_equal(data.load_empty_context(str(tmp_path)), empty)

    batches = _take(data.make_train_batches(cfg, global_batch_size=6, seed=2, process_index=0, process_count=1), 20)
    again = _take(data.make_train_batches(cfg, global_batch_size=6, seed=2, start_step=19, process_index=0,
                                          process_count=1), 1)[0]
    np.testing.assert_array_equal(again["context"], batches[19]["context"])
    chosen = set()
    for step, b in enumerate(batches):
        assert b["context"].shape == (6, 77, 768) and b["moments"].shape == (6, 4, 4, 8)
        for row in range(6):
            i = int(np.flatnonzero((moments.transpose(0, 2, 3, 1) == b["moments"][row]).all(axis=(1, 2, 3)))[0])
            k = [k for k in range(n_caps[i]) if np.array_equal(contexts[i, k], b["context"][row])]
            assert len(k) == 1
            chosen.add((i, k[0]))
    assert chosen == set(contexts)  # 20 epochs: every caption of every image gets drawn


def test_digits_box_downsample_averages_areas():
    """Digits below 28 pixels (the quickstart's 16x16) are area averages: a white quadrant stays a quadrant."""
    img = np.zeros((28, 28, 1), np.uint8)
    img[:14, :14] = 255
    out = preprocess.box_downsample(img, 16)
    assert out.shape == (16, 16, 1) and out.dtype == np.uint8
    assert (out[:8, :8] == 255).all() and (out[8:] == 0).all() and (out[:, 8:] == 0).all()
    ramp = np.tile(np.arange(28, dtype=np.uint8)[None, :, None] * 9, (28, 1, 1))
    np.testing.assert_allclose(preprocess.box_downsample(ramp, 14)[0, :, 0], ramp[0, 0::2, 0] + 4.5, atol=1)


def test_caption_rule_and_latent_facts_have_one_home_each():
    """The caption choice (`bits % captions`) is written once (data/preprocess.py), the latent datasets' class
    counts and splits once (dataset_specs.py), and the readers of raw images and text conditions live in data/."""
    import re
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uvit_jax")
    found = {"caption rule": set(), "latent facts": set(), "readers": set()}
    patterns = {"caption rule": r"bits\b[^\n]*%|%[^\n]*n_captions",
                "latent facts": r"[\"'](imagenet|mscoco)_latents[\"'][ \t]*:[ \t]*\S",  # a dict entry
                "readers": r"^class (ImageNetFolder|ImageNetTFDS|CocoFolder|CocoTFDS|TextConditions)\b"}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                source = open(path).read()
                for what, pattern in patterns.items():
                    if re.search(pattern, source, re.M):
                        found[what].add(os.path.relpath(path, root))
    assert found == {"caption rule": {os.path.join("data", "preprocess.py")}, "latent facts": {"dataset_specs.py"},
                     "readers": {os.path.join("data", "raw_images.py"), os.path.join("data", "text_conditions.py")}}


@pytest.mark.parametrize("damage", ["label", "nan"])
def test_official_imagenet_feature_file_with_bad_values_is_named(tmp_path, damage):
    moments = np.ones((8, 4, 4), np.float32)
    for i in range(3):
        _save_pair(tmp_path / f"{i}.npy", moments, np.int64(i))
    if damage == "label":
        _save_pair(tmp_path / "2.npy", moments, np.int64(1000))
    else:
        moments[3, 1, 2] = np.nan
        _save_pair(tmp_path / "2.npy", moments, np.int64(2))
    source = data.open_source({"name": "imagenet_latents", "path": str(tmp_path)})
    source.read(np.arange(2), np.zeros(2, np.uint64), True)
    what = "label 1000 is outside 0..999" if damage == "label" else "non-finite moments"
    with pytest.raises(data.CorruptFeaturesError, match=f"{tmp_path / '2.npy'}: .*{what}"):
        source.read(np.arange(3), np.zeros(3, np.uint64), True)
