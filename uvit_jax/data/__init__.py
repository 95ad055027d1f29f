"""Input pipelines: TFDS pixel datasets, the bundled digits, the official latent feature dirs; global batches.

Dataset config (an ml_collections ConfigDict or a dict), the keys read:
  name         "uvit_digits" | "cifar10" | "celeb_a" | "imagenet2012" | "imagenet_latents" | "mscoco_latents"
  data_dir     TFDS data dir for pixel datasets (None: TFDS default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
  image_size   pixel datasets: output side; None = the dataset's default (uvit_jax/dataset_specs.py: digits 32 = 28
               padded with black, so patch 2 and 4 both divide it, 28 keeps the raw digits; cifar10 32; celeb_a 64;
               imagenet2012 64)
  random_flip  horizontal flips at train time; None = the dataset's default (digits off, the others on)
  cache_gb     pixel datasets: keep the decoded split in memory when it fits this many GB (default 4: CIFAR-10,
               CelebA 64, the digits; 0: never); training batches only, one-pass eval batches never cache
  path         latent datasets: the feature dir: ours (written by --mode extract, with a manifest.json) or the
               official one (ImageNet: the dir of {idx}.npy; COCO: the root with train/, val/, empty_context.npy);
               falls back to data_dir

Batches (numpy, this process's rows of the global batch):
  pixel datasets   {"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,)}  (label when num_classes > 0)
  imagenet_latents {"moments": float32 (b, h, w, 8) = [mean | logvar], "label": int32 (b,)}
  mscoco_latents   {"moments": float32 (b, h, w, 8), "context": float32 (b, 77, 768)}
  eval batches add "mask": bool (b,), False on padding rows.

`dataset_info(cfg)` -> {"image_shape": (H, W, C) the model sees (latents: (h, w, 4)), "num_classes": int (0: none),
"num_examples": int, and for latents "moments_shape" (h, w, 8), for COCO "context_shape" (77, 768)}.
"""
from uvit_jax.data.datasets import (KNOWN_DATASETS, PIXEL_DATASETS, CorruptFeaturesError, DatasetNotPreparedError,
                                    PixelSource, class_count)
from uvit_jax.data.digits import UvitDigits, load_mnist_5k, prepare_digits
from uvit_jax.data.latents import CocoLatents, ImageNetLatents, load_empty_context
from uvit_jax.data.pipeline import (BatchIterator, EpochShuffle, dataset_info, make_eval_batches, make_train_batches,
                                    open_source)
from uvit_jax.data.text_conditions import TextConditions
from uvit_jax.dataset_specs import LATENT_DATASETS

__all__ = [
    "KNOWN_DATASETS", "PIXEL_DATASETS", "LATENT_DATASETS", "class_count", "CorruptFeaturesError",
    "DatasetNotPreparedError", "PixelSource",
    "UvitDigits", "load_mnist_5k",
    "prepare_digits", "CocoLatents", "ImageNetLatents", "load_empty_context", "BatchIterator",
    "EpochShuffle", "dataset_info", "make_eval_batches", "make_train_batches", "open_source", "TextConditions",
]
