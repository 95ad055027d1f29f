"""Raw images (+ captions) that `--mode extract` encodes into the latent datasets, read as the official scripts do.

ImageNet (`scripts/extract_imagenet_feature.py`): the train folder `DIR/<synset>/*.JPEG` (label = index of the
sorted synset names) or TFDS `imagenet2012` train, ADM `center_crop_arr` at the extraction resolution.
MS-COCO (`scripts/extract_mscoco_feature.py`): the 2014 root (`{train,val}2014/`, `annotations/captions_*.json`;
images sorted by id, captions in file order) or TFDS `coco_captions` (val2014 = Karpathy's val + test + restval),
the central square Lanczos-resized. TFDS datasets are read by random access and never downloaded.

Each reader has `num_images`, `description` and `read(indices)` -> {"image" float32 [-1, 1] (n, S, S, 3)
(+ "label" int32)}; the COCO ones also `captions(indices)` -> (texts per image, image ids).
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from uvit_jax.data import datasets, preprocess
from uvit_jax.data.datasets import DatasetNotPreparedError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
COCO_HELP = ("download train2014.zip, val2014.zip and annotations_trainval2014.zip from https://cocodataset.org and "
             "unzip them there, or use extract.source=tfds with a prepared coco_captions")


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class ImageNetFolder:
    """`DIR/<synset>/*.JPEG` in sorted order; label = index of the sorted synset names (official ImageNet)."""

    def __init__(self, root: str, size: int):
        if not os.path.isdir(root):
            raise DatasetNotPreparedError(f"extract.source={root} is not a folder: give ImageNet's train dir "
                                          "(DIR/<synset>/*.JPEG) or 'tfds'")
        synsets = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.files, labels = [], []
        for label, synset in enumerate(synsets):
            names = sorted(n for n in os.listdir(os.path.join(root, synset)) if n.lower().endswith(IMAGE_EXTENSIONS))
            self.files += [os.path.join(root, synset, n) for n in names]
            labels += [label] * len(names)
        if not self.files:
            raise DatasetNotPreparedError(f"no images in {root}/<synset>/ (expected ImageNet's train layout)")
        self.labels = np.asarray(labels, np.int32)
        self.size, self.num_images = size, len(self.files)
        self.description = f"folder {os.path.abspath(root)} ({len(synsets)} classes)"

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        images = np.stack([preprocess.center_crop_arr(_rgb(self.files[i]), self.size) for i in indices])
        return {"image": preprocess.to_float(images), "label": self.labels[indices]}


class ImageNetTFDS:
    """TFDS imagenet2012 train (array_record), with the ADM centre crop (`data.PixelSource`, no flip)."""

    def __init__(self, data_dir: str | None, size: int):
        self._source = datasets.PixelSource("imagenet2012", data_dir, size, random_flip=False)
        self.num_images = self._source.num_examples
        self.description = f"tfds imagenet2012 train (data_dir {data_dir or 'default'})"

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._source.read(indices, np.zeros(len(indices), np.uint64), False)


class CocoFolder:
    """COCO 2014 `ROOT/{split}2014/*.jpg` + `ROOT/annotations/captions_{split}2014.json`; images sorted by id,
    captions in file order (official MSCOCODatabase)."""

    def __init__(self, root: str, split: str, size: int):
        image_dir = os.path.join(root, f"{split}2014")
        ann_file = os.path.join(root, "annotations", f"captions_{split}2014.json")
        for path in (image_dir, ann_file):
            if not os.path.exists(path):
                raise DatasetNotPreparedError(f"MS-COCO {split}: {path} not found: {COCO_HELP}")
        with open(ann_file) as f:
            ann = json.load(f)
        captions = collections.defaultdict(list)
        for a in ann["annotations"]:
            captions[a["image_id"]].append(a["caption"])
        images = sorted(ann["images"], key=lambda im: im["id"])
        self.ids = np.asarray([im["id"] for im in images], np.int64)
        self.files = [os.path.join(image_dir, im["file_name"]) for im in images]
        self._captions = [captions[im["id"]] for im in images]
        _check_captions(self._captions, self.ids, ann_file)
        self.size, self.num_images = size, len(self.files)
        self.description = f"folder {os.path.abspath(root)} ({split}2014)"

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        images = np.stack([preprocess.center_square_lanczos(_rgb(self.files[i]), self.size) for i in indices])
        return {"image": preprocess.to_float(images)}

    def captions(self, indices: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
        return [self._captions[i] for i in indices], self.ids[indices]


class CocoTFDS:
    """TFDS coco_captions: train = train2014; val = val + test + restval (Karpathy's splits of val2014)."""

    PARTS = {"train": ("train",), "val": ("val", "test", "restval")}

    def __init__(self, split: str, data_dir: str | None, size: int):
        builder = tfds.builder("coco_captions", data_dir=data_dir)
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f"TFDS dataset 'coco_captions' is not prepared in data_dir={data_dir!r} (looked for "
                f"{builder.data_dir}); nothing is downloaded here. Prepare it with tfds build coco_captions "
                f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record, or set "
                "extract.source to the COCO root folder")
        try:
            self._parts = [builder.as_data_source(split=p) for p in self.PARTS[split]]
            # Captions without decoding the images (every process reads all captions of a shard).
            self._meta = [builder.as_data_source(split=p, decoders={"image": tfds.decode.SkipDecoding()})
                          for p in self.PARTS[split]]
        except NotImplementedError as e:
            raise DatasetNotPreparedError(f"coco_captions in {builder.data_dir} is not array_record: convert it with "
                                          f"tfds convert_format --dataset_version_dir={builder.data_dir} "
                                          "--out_file_format=array_record") from e
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.size, self.num_images = size, int(self._starts[-1])
        self.description = f"tfds coco_captions {'+'.join(self.PARTS[split])} (data_dir {data_dir or 'default'})"

    def _examples(self, sources, indices: np.ndarray) -> list[dict]:
        part = np.searchsorted(self._starts, indices, side="right") - 1
        return [sources[p][int(i - self._starts[p])] for p, i in zip(part, indices)]

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        examples = self._examples(self._parts, indices)
        images = [preprocess.center_square_lanczos(ex["image"], self.size) for ex in examples]
        return {"image": preprocess.to_float(np.stack(images))}

    def captions(self, indices: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
        examples = self._examples(self._meta, indices)
        texts = [[t.decode() if isinstance(t, bytes) else str(t) for t in ex["captions"]["text"]] for ex in examples]
        ids = np.asarray([ex["image/id"] for ex in examples], np.int64)
        _check_captions(texts, ids, "coco_captions")
        return texts, ids


def _check_captions(captions: list[list[str]], ids: np.ndarray, where: str) -> None:
    empty = [int(i) for i, c in zip(ids, captions) if not c]
    if empty:
        raise ValueError(f"{where}: {len(empty)} image(s) without any caption, e.g. image id {empty[0]}")


def open_raw_images(name: str, source: str, data_dir: str | None, split: str, size: int):
    """The raw images (+ captions) of latent dataset `name`'s `split` at `size`: `source` is "tfds" (prepared in
    `data_dir`) or a folder (ImageNet's train dir, or the COCO root)."""
    if name == "imagenet_latents":
        return ImageNetTFDS(data_dir, size) if source == "tfds" else ImageNetFolder(source, size)
    return CocoTFDS(split, data_dir, size) if source == "tfds" else CocoFolder(source, split, size)
