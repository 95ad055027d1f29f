"""TFDS pixel datasets read by random access (array_record), never downloaded.

| name           | TFDS split | geometry (official `datasets.py`)                           | flip default | labels |
|----------------|------------|-------------------------------------------------------------|--------------|--------|
| uvit_digits    | train      | 28x28x1, centred on image_size (default 32, black border), or box-downsampled below 28 | off          | 10     |
| cifar10        | train      | 32x32x3 as is (image_size must be 32)                       | on           | 10     |
| celeb_a        | train      | crop box top 57 left 25 128x128 -> bilinear resize (64)     | on (always in the official code) | none |
| imagenet2012   | train      | ADM center_crop_arr to image_size (64)                      | on           | 1000   |

Geometry and flips as the official pipelines (docs/official_behaviour.md §6.1). cifar10 labels are yielded
although the official CIFAR-10 model is unconditional; the config decides whether to use them. TFDS imagenet2012
labels are the sorted synset ids, the same order as the official sorted folder names.

Reading needs the array_record format (random access is what makes batches a pure function of the step). A
missing dataset, or one prepared as tfrecord (the `tfds build` default), is reported at once with the command
that fixes it; nothing is downloaded.

Decoded examples are kept in memory when the whole split fits `cache_gb` (dataset.cache_gb; CIFAR-10 0.15 GB,
CelebA 64 2.0 GB, ImageNet 64 15.7 GB): the first epoch decodes, later ones gather rows from memory, as the
official CIFAR-10 loader (torchvision, the whole split in memory) does. The pixels are the same either way.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from uvit_jax.data import digits, preprocess
from uvit_jax.dataset_specs import KNOWN_DATASETS, PIXEL_DATASETS, class_count  # noqa: F401 (re-exported)


_BUILD = "tfds build {name} --data_dir={data_dir} --file_format=array_record"
HOW_TO_PREPARE = {
    "uvit_digits": "call uvit_jax.data.prepare_digits(data_dir) (automatic in the pipeline)",
    "cifar10": _BUILD,
    "celeb_a": _BUILD + "   (needs the Google Drive files; if the download is refused, place them under "
                        "{data_dir}/downloads/manual)",
    "imagenet2012": _BUILD + " --manual_dir=DIR   (DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; "
                             "default {data_dir}/downloads/manual)",
}


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is missing, or stored in a format that cannot be read by random access."""


class CorruptFeaturesError(DatasetNotPreparedError, ValueError):
    """A feature file that does not hold what its manifest, its header or its dataset promise; the message names
    the file and what is wrong (a user error: the file has to be extracted again)."""


def _geometry(name: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
    if name == "uvit_digits":
        if size == 28:
            return lambda img: img
        if size < 28:
            return lambda img: preprocess.box_downsample(img, size)
        return lambda img: preprocess.pad_to(img, size, 0)
    if name == "cifar10":
        if size != 32:
            raise ValueError(f"cifar10: image_size must be 32 (the images are 32x32), got {size}")
        return lambda img: img
    if name == "celeb_a":
        return lambda img: preprocess.celeba_crop_resize(img, size)
    return lambda img: preprocess.center_crop_arr(img, size)


def open_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of `name` in `data_dir` (None: TFDS default), or DatasetNotPreparedError at once."""
    if name == "uvit_digits":
        return digits.prepare_digits(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        hint = HOW_TO_PREPARE[name].format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
        raise DatasetNotPreparedError(
            f"TFDS dataset '{name}' is not prepared in data_dir={data_dir!r} (looked for {builder.data_dir}). "
            f"Nothing is downloaded at training time. Prepare it once with:\n  {hint}\n"
            f"or copy a prepared '{name}' folder there, then pass that data_dir in the config (dataset.data_dir).")
    return builder


def _png_batch_decoder(channels: int, labels: bool) -> Callable[[list[bytes]], tuple[np.ndarray, Any]]:
    """serialized TFDS examples -> (uint8 images (n, H, W, C), int labels or None), parsed and decoded by
    TensorFlow's C++ ops for the whole batch (~10x faster than TFDS's per-example Python decode: CIFAR-10 at
    48k images/s per host is what 8 H100s train U-ViT-S/2 on). PNG is lossless, so the pixels are the same as
    PIL's. JPEG datasets keep TFDS's PIL decode, the official pipelines' decoder."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string)}
    if labels:
        spec["label"] = tf.io.FixedLenFeature([], tf.int64)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode(serialized):
        ex = tf.io.parse_example(serialized, spec)
        images = tf.map_fn(lambda png: tf.io.decode_png(png, channels=channels), ex["image"],
                           fn_output_signature=tf.uint8, parallel_iterations=16)
        return images, ex.get("label", tf.zeros([0], tf.int64))

    def run(serialized: list[bytes]):
        images, label = decode(tf.constant(serialized))
        return images.numpy(), label.numpy() if labels else None

    return run


class _DecodedCache:
    """uint8 images (after the dataset's geometry, before flips) and labels of a split, filled as rows are first read.

    The arrays are allocated empty (pages are committed as rows are written). Threads reading disjoint chunks of
    a batch may decode the same example twice around an epoch boundary; both write identical bytes."""

    def __init__(self, num_examples: int, image_shape: tuple[int, ...]):
        self.images = np.empty((num_examples, *image_shape), np.uint8)
        self.labels = np.zeros(num_examples, np.int64)
        self.filled = np.zeros(num_examples, bool)

    def read(self, indices: np.ndarray, decode: Callable[[np.ndarray], tuple[np.ndarray, Any]]
             ) -> tuple[np.ndarray, np.ndarray]:
        missing = np.unique(indices[~self.filled[indices]])
        if len(missing):
            images, labels = decode(missing)
            self.images[missing] = images
            if labels is not None:
                self.labels[missing] = labels
            self.filled[missing] = True
        return self.images[indices], self.labels[indices]


class PixelSource:
    """Random access to one split of a pixel dataset: `read(indices, bits)` -> {"image", ["label"]} numpy batch."""

    def __init__(self, name: str, data_dir: str | None = None, image_size: int | None = None,
                 random_flip: bool | None = None, split: str = "train", cache_gb: float = 0.0):
        if name not in PIXEL_DATASETS:
            raise ValueError(f"unknown pixel dataset {name!r}; known: {sorted(PIXEL_DATASETS)}")
        spec = PIXEL_DATASETS[name]
        self.name = name
        self.image_size = spec.default_size if image_size is None else int(image_size)
        self.random_flip = spec.flip if random_flip is None else bool(random_flip)
        self._geometry = _geometry(name, self.image_size)
        self.num_classes = spec.num_classes
        self.image_shape = (self.image_size, self.image_size, spec.channels)
        builder = open_builder(name, data_dir)
        if split not in builder.info.splits:
            raise ValueError(f"{name}: no split {split!r} in {builder.data_dir}; splits: {list(builder.info.splits)}")
        try:
            self._source = builder.as_data_source(split=split)
        except NotImplementedError as e:
            raise DatasetNotPreparedError(
                f"TFDS dataset '{name}' in {builder.data_dir} is stored as {builder.info.file_format.value}, which has "
                f"no random access. Convert it in place with\n  tfds convert_format "
                f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record\nor re-prepare it with "
                f"--file_format=array_record.") from e
        self.num_examples = len(self._source)
        self._builder, self._split = builder, split
        image = builder.info.features["image"]
        self._png_decoder = (_png_batch_decoder(image.shape[-1], bool(self.num_classes))
                             if (image.encoding_format or "png") == "png" else None)
        fits = self.num_examples * int(np.prod(self.image_shape)) <= cache_gb * 1e9
        self._cache = _DecodedCache(self.num_examples, self.image_shape) if fits else None

    def class_frequencies(self, chunk: int = 4096) -> np.ndarray:
        """Fraction of the split's examples in each class (float64, sums to 1), reading labels only (images are
        not decoded). One pass over the split: cache the result (the official ImageNet-64 evaluation draws sample
        labels from these frequencies)."""
        if not self.num_classes:
            raise ValueError(f"{self.name} has no class labels")
        source = self._builder.as_data_source(split=self._split, decoders={"image": tfds.decode.SkipDecoding()})
        counts = np.zeros(self.num_classes, np.int64)
        for start in range(0, self.num_examples, chunk):
            rows = source.__getitems__(list(range(start, min(start + chunk, self.num_examples))))
            counts += np.bincount([int(ex["label"]) for ex in rows], minlength=self.num_classes)
        return counts / counts.sum()

    def _decode(self, indices: np.ndarray) -> tuple[np.ndarray, Any]:
        """uint8 images (n, H, W, C) after the geometry, and labels (None without classes), of `indices`."""
        if self._png_decoder is not None:
            images, labels = self._png_decoder(self._source.data_source.__getitems__([int(i) for i in indices]))
            return np.stack([self._geometry(img) for img in images]), labels
        examples = self._source.__getitems__([int(i) for i in indices])
        images = np.stack([self._geometry(ex["image"]) for ex in examples])
        return images, ([ex["label"] for ex in examples] if self.num_classes else None)

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Examples `indices`, preprocessed; `bits` (uint64 per example) decide the flips when `train`."""
        indices = np.asarray(indices, np.int64)
        if self._cache is not None:
            images, labels = self._cache.read(indices, self._decode)  # a copy: flipping below leaves the cache alone
        else:
            images, labels = self._decode(indices)
        if train and self.random_flip:
            flips = preprocess.flip_bits(bits)
            images[flips] = images[flips, :, ::-1]
        batch: dict[str, Any] = {"image": preprocess.to_float(images)}
        if self.num_classes:
            batch["label"] = np.asarray(labels, np.int32)
        return batch
