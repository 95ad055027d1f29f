"""TFDS pixel datasets read by random access (array_record), never downloaded.

| name           | TFDS split | geometry (UVIT_SPEC.md §6.1)                                | flip default | labels |
|----------------|------------|-------------------------------------------------------------|--------------|--------|
| uvit_digits    | train      | 28x28x1, centred on image_size (default 32, black border), or box-downsampled below 28 | off          | 10     |
| cifar10        | train      | 32x32x3 as is (image_size must be 32)                       | on           | 10     |
| celeb_a        | train      | crop box top 57 left 25 128x128 -> bilinear resize (64)     | on (always in the official code) | none |
| imagenet2012   | train      | ADM center_crop_arr to image_size (64)                      | on           | 1000   |

cifar10 labels are yielded although the official CIFAR-10 model is unconditional; the config decides whether to
use them. TFDS imagenet2012 labels are the sorted synset ids, the same order as the official sorted folder names.

Reading needs the array_record format (random access is what makes batches a pure function of the step). A
missing dataset, or one prepared as tfrecord (the `tfds build` default), is reported at once with the command
that fixes it; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from uvit_jax.data import digits, preprocess


@dataclasses.dataclass(frozen=True)
class _Spec:
    default_size: int
    channels: int
    num_classes: int  # 0: the dataset has no class labels
    flip: bool  # default of `random_flip`
    how_to_prepare: str


_BUILD = "tfds build {name} --data_dir={data_dir} --file_format=array_record"
PIXEL_DATASETS = {
    "uvit_digits": _Spec(32, 1, 10, False, "call uvit_jax.data.prepare_digits(data_dir) (automatic in the pipeline)"),
    "cifar10": _Spec(32, 3, 10, True, _BUILD),
    "celeb_a": _Spec(64, 3, 0, True, _BUILD + "   (needs the Google Drive files; if the download is refused, "
                                              "place them under {data_dir}/downloads/manual)"),
    "imagenet2012": _Spec(64, 3, 1000, True, _BUILD + " --manual_dir=DIR   (DIR holds ILSVRC2012_img_train.tar "
                                                      "and ILSVRC2012_img_val.tar; default {data_dir}/downloads/manual)"),
}


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is missing, or stored in a format that cannot be read by random access."""


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
        hint = PIXEL_DATASETS[name].how_to_prepare.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
        raise DatasetNotPreparedError(
            f"TFDS dataset '{name}' is not prepared in data_dir={data_dir!r} (looked for {builder.data_dir}). "
            f"Nothing is downloaded at training time. Prepare it once with:\n  {hint}\n"
            f"or copy a prepared '{name}' folder there, then pass that data_dir in the config (dataset.data_dir).")
    return builder


class PixelSource:
    """Random access to one split of a pixel dataset: `read(indices, bits)` -> {"image", ["label"]} numpy batch."""

    def __init__(self, name: str, data_dir: str | None = None, image_size: int | None = None,
                 random_flip: bool | None = None, split: str = "train"):
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

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Examples `indices`, preprocessed; `bits` (uint64 per example) decide the flips when `train`."""
        flips = preprocess.flip_bits(bits) if (train and self.random_flip) else np.zeros(len(indices), bool)
        examples = self._source.__getitems__([int(i) for i in indices])
        images = np.stack([preprocess.maybe_flip(self._geometry(ex["image"]), f) for ex, f in zip(examples, flips)])
        batch: dict[str, Any] = {"image": preprocess.to_float(images)}
        if self.num_classes:
            batch["label"] = np.asarray([ex["label"] for ex in examples], np.int32)
        return batch
