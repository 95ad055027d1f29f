"""Facts about each dataset the configs can name: sizes, channels, classes, flips, splits, caption rule.

A leaf without TensorFlow imports, so that `config.validate` can check a config in well under a second, before
JAX or TFDS start. The readers live in `uvit_jax.data` and take these facts from here.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PixelSpec:
    default_size: int  # image side when dataset.image_size is None
    channels: int
    num_classes: int  # 0: the dataset has no class labels
    flip: bool  # default of dataset.random_flip


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """A dataset of autoencoder moments (official `scripts/extract_*_feature.py`, or `--mode extract`).

    Rows hold moments (h, w, 8) = [mean | logvar] of the KL-f8 encoder (h = w = resolution / 8: 32 for 256, 64 for
    512). Text-conditioned datasets hold the CLIP last_hidden_state of every caption of an image, and each access
    uses one of them, `data.preprocess.caption_index` (uniform, from the access's random bits).
    """
    num_classes: int  # real class labels (0: none)
    splits: tuple[str, ...]  # what --mode extract writes ("test" reads "val")
    examples_per_image: int  # 2: the image and its mirror (the official precomputed flip: no flip at train time)
    captions: bool  # text-conditioned: moments + one caption's context per access
    moments_channels: int = 8


# dataset.cache_gb default: pixel splits whose decoded uint8 images fit are kept in memory after the first epoch
# (CIFAR-10 0.15 GB, CelebA 64 2.0 GB; ImageNet 64's 15.7 GB is decoded every time unless raised).
DEFAULT_CACHE_GB = 4.0

PIXEL_DATASETS = {
    "uvit_digits": PixelSpec(32, 1, 10, False),  # 28x28 centred on 32 (black border); mirrored digits aren't digits
    "cifar10": PixelSpec(32, 3, 10, True),
    "celeb_a": PixelSpec(64, 3, 0, True),  # the official pipeline always flips
    "imagenet2012": PixelSpec(64, 3, 1000, True),
}
LATENT_DATASETS = {
    "imagenet_latents": LatentSpec(1000, ("train",), 2, False),  # ImageNet 256 / 512 features
    "mscoco_latents": LatentSpec(0, ("train", "val"), 1, True),  # MS-COCO 256 (train2014, val2014) features
}
KNOWN_DATASETS = tuple(PIXEL_DATASETS) + tuple(LATENT_DATASETS)


def class_count(name: str) -> int:
    """Real class labels a dataset carries (0: none)."""
    if name in PIXEL_DATASETS:
        return PIXEL_DATASETS[name].num_classes
    if name in LATENT_DATASETS:
        return LATENT_DATASETS[name].num_classes
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(KNOWN_DATASETS)}")


def latent_split(name: str, split: str) -> str:
    """The stored split a latent dataset reads for `split` ("test" is "val": the sampling contexts of FID)."""
    stored = {"test": "val"}.get(split, split)
    if stored not in LATENT_DATASETS[name].splits:
        raise ValueError(f"{name}: split must be one of {LATENT_DATASETS[name].splits}, got {split!r}")
    return stored
