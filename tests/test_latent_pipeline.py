"""The latent configs from raw images to FID on tiny stand-ins: extract (interrupted and resumed), train, sample
with decoding, text-to-image from validation captions and from a prompts file, eval; missing weights."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx, traverse_util
from PIL import Image

import standin_features
from test_files import dead_pid
from test_main import one_line_error, run_main
from uvit_jax import data, eval_mode, evaluate, extract, latent, parallel, preemption, sample, train
from uvit_jax.config import ConfigError, base_config
from uvit_jax.convert import autoencoder_to_official, save_torch_file
from uvit_jax.convert.clip_text import hf_key
from uvit_jax.data import features, preprocess
from uvit_jax.models.autoencoder import KL_F8_DDCONFIG, KL_F8_EMBED_DIM, FrozenAutoencoderKL
from uvit_jax.models.clip_text import CLIPTextModel

# Resolution 32 -> 16x16x4 latents (downsampling 2); GroupNorm needs multiples of 32 channels.
TINY_AE = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
               num_res_blocks=1, attn_resolutions=(), dropout=0.0)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

CONFIG = '''
from helpers import load_config


def get_config():
    c = load_config("test_tiny")
    text = {text}
    c.nnet = dict(name="uvit_t2i" if text else "uvit", img_size=16, patch_size=4, in_chans=4, embed_dim=32, depth=2,
                  num_heads=2, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, conv=True, skip=True,
                  use_checkpoint=False, **(dict(clip_dim=32, num_clip_token=77) if text else dict(num_classes=1001)))
    c.dataset.name = "mscoco_latents" if text else "imagenet_latents"
    c.dataset.path = {features!r}
    c.autoencoder.pretrained_path = {ae!r}
    c.autoencoder.ddconfig.update(dict(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1))
    c.clip.pretrained_path = {clip!r}
    c.extract.source = {source!r}
    c.extract.shard_size = 2
    c.extract.batch_size = 8
    c.extract.log_interval = 1
    c.train.n_steps = 2
    c.train.eval_interval = 2
    c.sample.grid_size = 8
    c.sample.grid_steps = 2
    c.sample.sample_steps = 2
    c.sample.n_samples = 10
    c.sample.mini_batch_size = 1  # per device: 8 on the 8 test devices
    c.eval.batch_size = 8
    c.eval.ref_stats = {ref_stats!r}
    if text:
        c.schedule = "discrete"
        c.sample.algorithm, c.sample.method, c.sample.skip_type = "dpm_solver_pp", "fast_grid", "time_uniform"
    return c
'''


def _jpeg(path, h, w, seed):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    img = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


def random_module(build, seed: int):
    """The module `build` makes, with numpy random weights (kernels and embeddings ~ N(0, 1/fan_in), norms at
    identity): an order of magnitude faster than initialising it eagerly on 8 devices."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = str(path[-1].key)
        if name in ("scale", "bias"):
            return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else leaf.shape[-1]
        return rng.normal(0, fan_in ** -0.5, leaf.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny random-weight autoencoder (.pth, official names) and CLIP (HF safetensors + config.json), an
    ImageNet-style folder (2 synsets), a COCO-style root (train2014/val2014 + captions json), reference stats."""
    root = tmp_path_factory.mktemp("latent_assets")
    ae = random_module(lambda: FrozenAutoencoderKL(TINY_AE, 4, rngs=nnx.Rngs(0)), 0)
    save_torch_file(autoencoder_to_official(ae), root / "autoencoder_kl.pth")
    clip = random_module(lambda: CLIPTextModel(**TINY_CLIP, rngs=nnx.Rngs(0)), 1)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(clip, nnx.Param)))
    os.makedirs(root / "clip")
    safetensors.numpy.save_file({"text_model." + hf_key(p): np.asarray(v.T if p[-1] == "kernel" else v)
                                 for p, v in flat.items()}, str(root / "clip" / "model.safetensors"))
    (root / "clip" / "config.json").write_text(json.dumps({"text_config": dict(TINY_CLIP, projection_dim=32)}))

    sizes = [(40, 48), (52, 36), (64, 64)]
    for s, synset in enumerate(["n02", "n01"]):  # listed out of order: labels follow the sorted names
        for i, (h, w) in enumerate(sizes):
            _jpeg(str(root / "imagenet" / synset / f"{synset}_{i}.JPEG"), h, w, 10 * s + i)
    for split, n in [("train", 5), ("val", 3)]:
        images, anns = [], []
        for i in range(n):
            image_id = 100 - i  # ids in reverse file order: images are sorted by id
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            _jpeg(str(root / "coco" / f"{split}2014" / name), 40 + 4 * i, 56 - 4 * i, 50 + i)
            images.append({"id": image_id, "file_name": name})
            anns += [{"image_id": image_id, "id": len(anns) + k, "caption": f"{split} picture {i} caption {k}"}
                     for k in range(2 + i % 2)]
        os.makedirs(root / "coco" / "annotations", exist_ok=True)
        (root / "coco" / "annotations" / f"captions_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns}))
    rng = np.random.default_rng(0)
    stats = evaluate.compute_feature_stats([rng.integers(0, 256, (16, 32, 32, 3), np.uint8)],
                                           standin_features.make())
    evaluate.save_reference_stats(stats, str(root / "ref_stats.npz"))
    return root


def write_config(assets, tmp_path, *, text: bool, features_dir: str) -> str:
    path = tmp_path / ("coco_tiny.py" if text else "imagenet_tiny.py")
    path.write_text(CONFIG.format(text=text, features=features_dir, ae=str(assets / "autoencoder_kl.pth"),
                                  clip=str(assets / "clip"), source=str(assets / ("coco" if text else "imagenet")),
                                  ref_stats=str(assets / "ref_stats.npz")))
    return str(path)


def load(config_file: str):
    spec = importlib.util.spec_from_file_location("latent_tiny", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def folder_bytes(directory) -> dict:
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(directory) for f in names}


def test_default_autoencoder_is_kl_f8():
    config = base_config()
    ddconfig = {k: tuple(v) if isinstance(v, tuple) else v for k, v in config.autoencoder.ddconfig.items()}
    assert ddconfig == KL_F8_DDCONFIG and config.autoencoder.embed_dim == KL_F8_EMBED_DIM


def test_missing_weights_are_one_line_errors(assets, tmp_path):
    config_file = write_config(assets, tmp_path, text=False, features_dir=str(tmp_path / "f"))
    missing = str(tmp_path / "nowhere" / "autoencoder_kl_ema.pth")
    r = run_main("--config", config_file, "--workdir", str(tmp_path / "w"), "--mode", "extract",
                 f"--config.autoencoder.pretrained_path={missing}")
    one_line_error(r, missing, "autoencoder.pretrained_path", "Google Drive")
    assert not os.path.exists(tmp_path / "w" / "features")
    config = load(config_file)
    config.clip.pretrained_path = str(tmp_path / "no_clip")
    with pytest.raises(FileNotFoundError, match="clip.pretrained_path=.*no_clip.*openai/clip-vit-large-patch14"):
        latent.load_clip(config)
    config.clip.pretrained_path = None
    with pytest.raises(FileNotFoundError, match="clip.pretrained_path is not set"):
        latent.load_clip(config)


def test_imagenet_from_raw_images_to_fid(assets, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    feats = os.path.join(workdir, "features")
    config_file = write_config(assets, tmp_path, text=False, features_dir=feats)
    common = ["--config", config_file, "--workdir", workdir]

    # Extract, interrupted after the first of 3 shards (the preemption check says stop at batch 1), then resumed.
    config = load(config_file)
    monkeypatch.setattr(preemption, "should_stop", lambda step: step >= 1)
    assert extract.run(config, workdir) is None
    manifest = features.read_manifest(feats)
    assert not manifest["splits"]["train"]["complete"]
    assert sorted(os.listdir(os.path.join(feats, "train"))) == ["labels-00000.npy", "labels_crc32-00000.npy",
                                                                "moments-00000.npy", "moments_crc32-00000.npy"]
    with pytest.raises(data.DatasetNotPreparedError, match="incomplete"):
        data.dataset_info(config.dataset)
    first_shard = os.path.getmtime(features.shard_file(feats, "train", "moments", 0))
    # A writer killed mid-shard left its temporary file (up to a shard's size): the rerun removes it.
    leftover = os.path.join(feats, "train", f"moments-00001.tmp-{dead_pid()}.npy")
    open(leftover, "wb").write(b"partial shard")
    monkeypatch.undo()
    assert extract.run(config, workdir) == feats
    assert not os.path.exists(leftover)
    assert os.path.getmtime(features.shard_file(feats, "train", "moments", 0)) == first_shard  # not redone

    # An uninterrupted extraction through main.py writes the same files, byte for byte.
    other = str(tmp_path / "uninterrupted")
    r = run_main(*common, "--mode", "extract", f"--config.extract.output={other}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images/s (x2 with mirrors)" in r.stderr and "ETA" in r.stderr
    assert folder_bytes(other) == folder_bytes(feats)

    # The reader: 6 images x (image, mirror), sorted-synset labels, the right moments in the right rows.
    info = data.dataset_info(config.dataset)
    assert info == {"image_shape": (16, 16, 4), "num_classes": 1000, "num_examples": 12, "moments_shape": (16, 16, 8)}
    source = data.open_source(config.dataset)
    batch = source.read(np.arange(12), np.zeros(12, np.uint64), True)
    np.testing.assert_array_equal(batch["label"], [0] * 6 + [1] * 6)  # n01 sorts first
    ae = latent.load_autoencoder(config)
    x = preprocess.to_float(preprocess.center_crop_arr(np.asarray(Image.open(
        assets / "imagenet" / "n01" / "n01_1.JPEG").convert("RGB")), 32))[None]
    want = np.asarray(ae.encode_moments(np.concatenate([x, x[:, :, ::-1]])))
    np.testing.assert_allclose(batch["moments"][2:4], want, rtol=1e-4, atol=1e-4)
    assert manifest["splits"]["train"]["source"].startswith("folder ")

    # Train 2 steps (the training grid decoded), sample (decoded), eval.
    r = run_main(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "grids", "step_00000002.png"))
    r = run_main(*common, "--mode", "sample")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sample.sample_files(os.path.join(workdir, "samples"))
    images = np.concatenate([np.load(f)["images"] for f in files])
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    assert Image.open(os.path.join(workdir, "samples", "grid.png")).size[0] > 32
    r = run_main(*common, "--mode", "eval", "--config.eval.feature_fn=standin_features:make")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(next(f for f in (os.path.join(workdir, "eval", n) for n in
                                              os.listdir(os.path.join(workdir, "eval"))) if "metrics_" in f)))
    assert metrics["n_samples"] == 10 and np.isfinite(metrics["fid"])


def test_coco_text_to_image(assets, tmp_path):
    workdir = str(tmp_path / "run")
    feats = os.path.join(workdir, "features")
    config_file = write_config(assets, tmp_path, text=True, features_dir=feats)
    config = load(config_file)
    assert extract.run(config, workdir) == feats
    manifest = features.read_manifest(feats)
    assert {s: manifest["splits"][s]["num_examples"] for s in ("train", "val")} == {"train": 5, "val": 3}
    assert manifest["splits"]["train"]["num_captions"] == 2 + 3 + 2 + 3 + 2
    empty = np.load(os.path.join(feats, "empty_context.npy"))
    text = latent.make_text_encoder(config, parallel.make_mesh())
    np.testing.assert_allclose(empty, text([""])[0], rtol=1e-5, atol=1e-5)

    # Captions of the val images (sorted by id: file index 2 has the smallest id) and their contexts.
    val = data.open_source(config.dataset, split="val")
    assert val.captions(np.array([0])) == [["val picture 2 caption 0", "val picture 2 caption 1"]]
    picked = val.read(np.array([0, 0]), np.array([0, 1], np.uint64), False)["context"]
    np.testing.assert_allclose(picked, text(["val picture 2 caption 0", "val picture 2 caption 1"]),
                               rtol=1e-4, atol=1e-4)

    # Train 2 steps in-process (grid from validation captions, FID decoded, with text contexts), then sample.
    config.train.fid_interval, config.train.fid_n_samples, config.eval.feature_fn = 2, 8, "standin_features:make"
    train.train_and_evaluate(config, workdir, eval_callback=eval_mode.make_training_fid_callback(config, workdir))
    assert os.path.exists(os.path.join(workdir, "grids", "step_00000002.png"))
    assert json.load(open(os.path.join(workdir, "eval", "best.json")))["step"] == 2
    out = sample.sample_to_dir(config, workdir)
    batches = [np.load(f) for f in sample.sample_files(out)]
    captions = np.concatenate([b["captions"] for b in batches])
    index = np.concatenate([b["caption_index"] for b in batches])
    assert len(captions) == 10 and sum(len(b["images"]) for b in batches) == 10
    for caption, (image, k) in zip(captions, index):  # each sample's caption is the one its context encodes
        assert caption == val.captions(np.array([image]))[0][k]
    assert len(set(index[:3, 0])) == 3  # one pass over the shuffled validation images

    # A prompts file through main.py: one image per prompt and a captioned grid.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus on a street\n\nthree dogs playing in the snow\na bowl of fruit\n")
    r = run_main("--config", config_file, "--workdir", workdir, "--mode", "sample",
                 f"--config.sample.prompts={prompts}")
    assert r.returncode == 0, r.stderr[-3000:]
    listing = json.load(open(os.path.join(workdir, "prompts", "prompts.json")))
    assert [p["prompt"] for p in listing] == ["a red bus on a street", "three dogs playing in the snow",
                                              "a bowl of fruit"]
    for p in listing:
        assert Image.open(os.path.join(workdir, "prompts", p["file"])).size == (32, 32)
    assert os.path.exists(os.path.join(workdir, "prompts", "grid.png"))


@pytest.fixture(scope="module")
def extracted(assets, tmp_path_factory):
    """An extracted ImageNet folder (6 images x 2 in 3 shards of 4 rows) and the config that reads it."""
    root = tmp_path_factory.mktemp("extracted")
    feats = str(root / "features")
    config = load(write_config(assets, root, text=False, features_dir=feats))
    assert extract.run(config, str(root)) == feats
    return config


def _damage(feats: str, how: str) -> str:
    """Damage shard 1 of a copy of an extracted folder as `how` says; returns the damaged file."""
    moments, labels = (features.shard_file(feats, "train", k, 1) for k in ("moments", "labels"))
    if how == "truncated":
        os.truncate(moments, os.path.getsize(moments) - 100)
        return moments
    target = labels if how.startswith("label") else moments
    array = np.load(target)
    if how.startswith("garbage"):
        array[1] = np.random.default_rng(0).standard_normal(array.shape[1:])  # finite, plausible, wrong
    elif how.startswith("nan"):
        array[2, 3, 1, 5] = np.nan
    else:
        array[3] = 1000
    np.save(target, array)
    if how.endswith("as extracted"):  # as if the extraction itself had written it: the records match
        kind = os.path.basename(target).split("-")[0]
        crcs = features.shard_file(feats, "train", f"{kind}_crc32", 1)
        np.save(crcs, features.row_crcs(array))
        manifest = features.read_manifest(feats)
        for k, path in ((kind, target), (f"{kind}_crc32", crcs)):
            manifest["splits"]["train"]["shards"]["00001"][k] = features.file_record(path)
        with open(os.path.join(feats, features.MANIFEST), "w") as f:
            json.dump(manifest, f)
    return target


@pytest.mark.parametrize("how, what", [
    ("truncated", "bytes, the manifest records"),
    ("garbage", "row 1 differs from its CRC-32 recorded at extraction"),
    ("nan", "row 2 differs from its CRC-32"),
    ("label", "row 3 differs from its CRC-32"),
    ("nan as extracted", "row 2 holds non-finite moments"),
    ("label as extracted", "row 3 holds label 1000, outside 0..999"),
])
def test_a_damaged_feature_shard_is_named(extracted, tmp_path, how, what):
    """Test fails on main before the manifest records: a truncated shard was `mmap length is greater than file
    size` without the file, the others trained into NaN."""
    feats = str(tmp_path / "features")
    shutil.copytree(extracted.dataset.path, feats)
    config = ml_collections.ConfigDict(extracted.dataset.to_dict())
    config.path = feats
    damaged = _damage(feats, how)
    with pytest.raises(data.CorruptFeaturesError) as e:
        source = data.open_source(config)
        source.read(np.arange(12), np.zeros(12, np.uint64), True)
    assert str(e.value).startswith(f"{damaged}: ") and what in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_shard_stops_training_in_one_line(extracted, tmp_path):
    feats = str(tmp_path / "features")
    shutil.copytree(extracted.dataset.path, feats)
    damaged = _damage(feats, "truncated")
    config_file = write_config(Path(os.path.dirname(extracted.autoencoder.pretrained_path)), tmp_path, text=False,
                               features_dir=feats)
    r = run_main("--config", config_file, "--workdir", str(tmp_path / "w"))
    one_line_error(r, damaged, "bytes, the manifest records")


def test_missing_weights_are_named_before_the_checkpoint_is_looked_for(assets, tmp_path):
    """Sample mode named a missing autoencoder or CLIP file only after the checkpoint restore (41 s at L/2); an empty
    workdir shows the order: on main before this fix the error was about the missing checkpoint."""
    config_file = write_config(assets, tmp_path, text=True, features_dir=str(tmp_path / "f"))
    common = ["--config", config_file, "--workdir", str(tmp_path / "w"), "--mode", "sample"]
    r = run_main(*common, f"--config.autoencoder.pretrained_path={tmp_path / 'no_ae.pth'}")
    one_line_error(r, "autoencoder.pretrained_path", "no_ae.pth")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus\n")
    r = run_main(*common, f"--config.sample.prompts={prompts}",
                 f"--config.clip.pretrained_path={tmp_path / 'no_clip'}")
    one_line_error(r, "clip.pretrained_path", "no_clip")


def test_latent_training_without_reference_statistics_trains_without_fid(extracted, tmp_path):
    """A missing eval.ref_stats stopped training at start, suggesting `--config.eval.ref_stats=`, which latent
    datasets refuse (test fails on main before this fix): now one warning names the file and training runs."""
    missing = str(tmp_path / "fid_stats_imagenet256_guided_diffusion.npz")
    config_file = write_config(Path(os.path.dirname(extracted.autoencoder.pretrained_path)), tmp_path, text=False,
                               features_dir=extracted.dataset.path)
    r = run_main("--config", config_file, "--workdir", str(tmp_path / "w"), "--config.train.fid_interval=2",
                 "--config.eval.feature_fn=standin_features:make", f"--config.eval.ref_stats={missing}")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "FID during training is off" in line]
    assert len(warnings) == 1 and missing in warnings[0] and "fid_stats_imagenet{256,512}" in warnings[0]
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["2"]


def test_extract_batch_is_cut_to_the_host_memory():
    """At the default batch (64 images, 128 encodes with mirrors) extraction at 256 grew past 24 GB and was killed
    without a word (test fails on main before this fix: there was no limit)."""
    per_image = extract.CPU_BYTES_PER_ENCODE_256 * 2
    assert extract.fit_batch(64, per_image, 256, 24e9, 8) == 48  # 48 x 0.4 GB = 19.2 GB <= 80% of 24 GB
    assert extract.fit_batch(64, per_image, 256, 200e9, 8) == 64
    assert extract.fit_batch(64, per_image * 4, 512, 24e9, 8) == 8
    with pytest.raises(ConfigError, match="extract.batch_size: encoding 8 image.*512x512 needs about 12.8 GB"):
        extract.fit_batch(64, per_image * 4, 512, 8e9, 8)
