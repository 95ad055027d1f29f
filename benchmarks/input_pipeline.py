"""Per-host input pipeline speed against what 8 H100s consume at 45% MFU.

    python benchmarks/input_pipeline.py                      # both cases, fake data in a temporary directory
    python benchmarks/input_pipeline.py --cases cifar10 --batch 256 --batches 40 --threads 8

Measures `uvit_jax.data.make_train_batches` alone (no model), on one process, for
  cifar10:   CIFAR-10-shaped pixel data (32x32x3 PNG in TFDS array_record, random flips on), a fake dataset built
             here under the real TFDS name "cifar10", so the real reader (PixelSource) decodes it; measured twice:
             decoding every batch (the first epoch, or dataset.cache_gb=0) and from the decoded cache (later epochs);
  latents:   ImageNet-256 latent moments as the official extract script writes them ({idx}.npy = pickled
             (moments (8, 32, 32) float32, label)), a few thousand fake files, read by ImageNetLatents.
The required rate is what 8 H100s train on at 45% MFU: images/s = 8 x 0.45 x 989e12 / (3 x 2 x forward MACs)
(U-ViT-S/2 for CIFAR-10, U-ViT-H/2 for the latents), for one host feeding all 8.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

H100_BF16 = 989e12
MODEL = {"cifar10": "cifar10_uvit_small", "latents": "imagenet256_uvit_huge"}


def required_images_per_s(case: str, chips: int = 8, mfu: float = 0.45) -> float:
    from uvit_jax.models import PRESETS, forward_macs
    return chips * mfu * H100_BF16 / (3 * 2 * forward_macs(PRESETS[MODEL[case]]))


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """uint8 (n, 32, 32, 3) with natural-image-like smoothness (PNG sizes near CIFAR's, unlike white noise)."""
    coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
    up = coarse.repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(up + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


def make_fake_cifar10(data_dir: str, n: int) -> None:
    """A TFDS "cifar10" 3.0.2 train split of n fake examples in array_record (the real builder's features)."""
    import tensorflow_datasets as tfds

    images = smooth_images(np.random.default_rng(0), n)

    with tfds.core.registered.skip_registration():
        class FakeCifar10(tfds.core.GeneratorBasedBuilder):
            name = "cifar10"
            VERSION = tfds.core.Version("3.0.2")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10)}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, img in enumerate(images):
                    yield i, {"id": f"train_{i:05d}", "image": img, "label": i % 10}

    FakeCifar10(data_dir=data_dir, file_format="array_record").download_and_prepare()


def make_fake_latents(path: str, n: int) -> None:
    """n official-style ImageNet-256 feature files {idx}.npy = pickled (moments (8, 32, 32) float32, label)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = rng.standard_normal((8, 32, 32)).astype(np.float32), int(i % 1000)
        np.save(os.path.join(path, f"{i}.npy"), pair, allow_pickle=True)


def measure(dataset_cfg: dict, batch: int, batches: int, threads: int, prefetch: int, skip: int = 1) -> float:
    """Images/s of make_train_batches after its first `skip` batches (start-up, or a first epoch that fills the
    decoded cache, excluded), consuming as fast as it yields."""
    from uvit_jax.data import make_train_batches
    it = make_train_batches(dataset_cfg, global_batch_size=batch, seed=0, num_threads=threads, prefetch=prefetch)
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    elapsed = time.perf_counter() - t0
    it.close()
    assert b[next(iter(b))].shape[0] == batch
    return batches * batch / elapsed


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["cifar10", "latents"], choices=sorted(MODEL))
    p.add_argument("--examples", type=int, default=4000, help="fake examples to write")
    p.add_argument("--batch", type=int, default=256, help="per-host batch")
    p.add_argument("--batches", type=int, default=30, help="timed batches")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="reader threads (make_train_batches)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--dir", help="where to write the fake data (default: a temporary directory)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        for case in args.cases:
            t0 = time.time()
            if case == "cifar10":
                data_dir = os.path.join(root, "tfds")
                make_fake_cifar10(data_dir, args.examples)
                cfg = {"name": "cifar10", "data_dir": data_dir, "image_size": 32, "random_flip": True}
            else:
                path = os.path.join(root, "imagenet256_features")
                make_fake_latents(path, args.examples)
                cfg = {"name": "imagenet_latents", "path": path}
            built = time.time() - t0
            need = required_images_per_s(case)
            runs = {case: (cfg, 1)}
            if case == "cifar10":  # every batch decoded (the first epoch), then from the decoded cache
                runs = {"cifar10, decoding": (dict(cfg, cache_gb=0), 1),
                        "cifar10, cached": (dict(cfg, cache_gb=1), -(-args.examples // args.batch) + 1)}
            for name, (run_cfg, skip) in runs.items():
                rate = measure(run_cfg, args.batch, args.batches, args.threads, args.prefetch, skip)
                rows.append({"case": name, "measured": rate, "required": need})
                print(f"{name:18s} {rate:10,.0f} images/s per host ({args.threads} threads, {os.cpu_count()} "
                      f"cores)   required {need:10,.0f} (8 x H100 at 45% MFU, {MODEL[case]})   ratio "
                      f"{rate / need:5.2f}   [fake data built in {built:.0f} s]", flush=True)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    return rows


if __name__ == "__main__":
    main()
