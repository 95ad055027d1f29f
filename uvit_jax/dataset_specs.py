"""Facts about each dataset the configs can name: the one place for dataset-dependent defaults.

A leaf without TensorFlow imports, so that `config.validate` can check a config in well under a second, before
JAX or TFDS start. The readers live in `uvit_jax.data`.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PixelSpec:
    default_size: int  # image side when dataset.image_size is None
    channels: int
    num_classes: int  # 0: the dataset has no class labels
    flip: bool  # default of dataset.random_flip


# dataset.cache_gb default: pixel splits whose decoded uint8 images fit are kept in memory after the first epoch
# (CIFAR-10 0.15 GB, CelebA 64 2.0 GB; ImageNet 64's 15.7 GB is decoded every time unless raised).
DEFAULT_CACHE_GB = 4.0

PIXEL_DATASETS = {
    "uvit_digits": PixelSpec(32, 1, 10, False),  # 28x28 centred on 32 (black border); mirrored digits aren't digits
    "cifar10": PixelSpec(32, 3, 10, True),
    "celeb_a": PixelSpec(64, 3, 0, True),  # the official pipeline always flips
    "imagenet2012": PixelSpec(64, 3, 1000, True),
}
# Latent datasets (data/latents.py): real class labels of each; COCO is text-conditioned. Flips are precomputed.
LATENT_CLASS_COUNTS = {"imagenet_latents": 1000, "mscoco_latents": 0}
KNOWN_DATASETS = tuple(PIXEL_DATASETS) + tuple(LATENT_CLASS_COUNTS)


def class_count(name: str) -> int:
    """Real class labels a dataset carries (0: none)."""
    if name in PIXEL_DATASETS:
        return PIXEL_DATASETS[name].num_classes
    if name in LATENT_CLASS_COUNTS:
        return LATENT_CLASS_COUNTS[name]
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(KNOWN_DATASETS)}")
