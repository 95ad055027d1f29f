"""Readers for the official pre-extracted latent datasets (UVIT_SPEC.md §6.2, §6.4), converted to NHWC.

ImageNet 256/512 (`scripts/extract_imagenet_feature.py`): a directory of `{idx}.npy`, idx = 0..N-1, each a pickled
pair (moments float32 (8, h, w), label); N = 2 x 1,281,167 (every image and its mirror, so no flip at train time).

MS-COCO (`scripts/extract_mscoco_feature.py`, `extract_empty_feature.py`, `extract_test_prompt_feature.py`): a root
holding `train/` and `val/` with `{idx}.npy` = moments (8, 32, 32) and `{idx}_{k}.npy` = CLIP ViT-L/14
last_hidden_state (77, 768) of caption k; `empty_context.npy` (77, 768), the null context for classifier-free
guidance; `run_vis/{i}.npy` = pickled (prompt, context) for sample grids.

Sources yield "moments" (NHWC, 8 channels = [mean | logvar]); the posterior sample
z = scale * (mean + exp(0.5 * clip(logvar, -30, 20)) * n) is drawn on device by the train step.
"""
from __future__ import annotations

import os
import re

import numpy as np

from uvit_jax.data.datasets import DatasetNotPreparedError

_CAPTION = re.compile(r"^(\d+)_(\d+)\.npy$")


def _missing(kind: str, path: str, script: str) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"{kind} features not found at {path!r}. Extract them with the official U-ViT script {script}, "
        f"then set dataset.path to that directory.")


def count_indexed_files(directory: str) -> int:
    """N such that `{0..N-1}.npy` exist, by doubling + bisection on file existence (~2 log2 N stats, no listing)."""
    def exists(i: int) -> bool:
        return os.path.exists(os.path.join(directory, f"{i}.npy"))

    if not exists(0):
        return 0
    lo, hi = 0, 1
    while exists(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if exists(mid) else (lo, mid)
    return lo + 1


def _nchw_to_nhwc(moments: np.ndarray, where: str) -> np.ndarray:
    if moments.ndim != 3 or moments.shape[0] != 8:
        raise ValueError(f"{where}: expected moments of shape (8, h, w) (NCHW, [mean | logvar]), got {moments.shape}")
    return np.transpose(moments, (1, 2, 0)).astype(np.float32)


class ImageNetLatents:
    """`{idx}.npy` = (moments (8,h,w), label) files -> {"moments" (n,h,w,8) float32, "label" (n,) int32}."""

    num_classes = 1000
    keys = ("moments", "label")

    def __init__(self, path: str, num_examples: int | None = None):
        if not path or not os.path.isdir(path):
            raise _missing("ImageNet latent", path, "scripts/extract_imagenet_feature.py")
        self.path = path
        self.num_examples = int(num_examples) if num_examples else count_indexed_files(path)
        if self.num_examples == 0:
            raise _missing("ImageNet latent (no 0.npy)", path, "scripts/extract_imagenet_feature.py")
        moments, _ = self._load(0)
        self.moments_shape = moments.shape
        self.image_shape = moments.shape[:2] + (4,)

    def _load(self, idx: int) -> tuple[np.ndarray, int]:
        file = os.path.join(self.path, f"{idx}.npy")
        moments, label = np.load(file, allow_pickle=True)  # the official files are pickled (array, label) pairs
        return _nchw_to_nhwc(np.asarray(moments), file), int(label)

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Examples `indices`; `bits`/`train` are unused (the flip is a precomputed example)."""
        del bits, train
        pairs = [self._load(int(i)) for i in indices]
        return {"moments": np.stack([m for m, _ in pairs]), "label": np.asarray([lb for _, lb in pairs], np.int32)}


class CocoLatents:
    """COCO feature dir split -> {"moments" (n,32,32,8) float32, "context" (n,77,768) float32}.

    One caption per access, chosen uniformly from the image's captions by the example's random bits (so the same
    (seed, position) always picks the same caption).
    """

    num_classes = 0
    keys = ("moments", "context")

    def __init__(self, path: str, split: str = "train", num_examples: int | None = None):
        sub = {"train": "train", "val": "val", "test": "val"}.get(split)
        if sub is None:
            raise ValueError(f"mscoco_latents: split must be 'train' or 'val', got {split!r}")
        self.path = path
        self.directory = os.path.join(path or "", sub)
        script = f"scripts/extract_mscoco_feature.py --split={sub}"
        if not path or not os.path.isdir(self.directory):
            raise _missing("MS-COCO latent", self.directory, script)
        self.num_examples = int(num_examples) if num_examples else count_indexed_files(self.directory)
        if self.num_examples == 0:
            raise _missing("MS-COCO latent (no 0.npy)", self.directory, script)
        self.n_captions = self._count_captions()
        self.moments_shape = _nchw_to_nhwc(np.load(os.path.join(self.directory, "0.npy")), self.directory).shape
        self.image_shape = self.moments_shape[:2] + (4,)
        self.context_shape = np.load(os.path.join(self.directory, "0_0.npy"), mmap_mode="r").shape

    def _count_captions(self) -> np.ndarray:
        counts = np.zeros(self.num_examples, np.int64)
        with os.scandir(self.directory) as entries:
            for entry in entries:
                m = _CAPTION.match(entry.name)
                if m and int(m.group(1)) < self.num_examples:
                    counts[int(m.group(1))] += 1
        if (counts == 0).any():
            raise ValueError(f"{self.directory}: images without any caption file, e.g. "
                             f"{int(np.flatnonzero(counts == 0)[0])}_0.npy is missing")
        return counts

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Examples `indices`, each with the caption `bits % n_captions` (also at eval: one random caption)."""
        del train
        indices = np.asarray(indices, np.int64)
        ks = (np.asarray(bits, np.uint64) % self.n_captions[indices].astype(np.uint64)).astype(np.int64)
        moments = [_nchw_to_nhwc(np.load(os.path.join(self.directory, f"{i}.npy")), f"{self.directory}/{i}.npy")
                   for i in indices]
        contexts = [np.load(os.path.join(self.directory, f"{i}_{k}.npy")) for i, k in zip(indices, ks)]
        return {"moments": np.stack(moments), "context": np.stack(contexts).astype(np.float32)}


def load_empty_context(path: str) -> np.ndarray:
    """The null text context `<path>/empty_context.npy` (77, 768) float32 (CLIP encoding of "")."""
    file = os.path.join(path or "", "empty_context.npy")
    if not os.path.exists(file):
        raise _missing("MS-COCO empty context", file, "scripts/extract_empty_feature.py")
    return np.load(file).astype(np.float32)


def load_vis_prompts(path: str) -> tuple[list[str], np.ndarray]:
    """The fixed visualisation prompts `<path>/run_vis/{i}.npy` -> (prompts, contexts (n, 77, 768) float32)."""
    directory = os.path.join(path or "", "run_vis")
    if not os.path.isdir(directory):
        raise _missing("MS-COCO visualisation prompt", directory, "scripts/extract_test_prompt_feature.py")
    names = sorted((f for f in os.listdir(directory) if f.endswith(".npy")), key=lambda f: int(f.split(".")[0]))
    pairs = [np.load(os.path.join(directory, f), allow_pickle=True) for f in names]
    return [str(p) for p, _ in pairs], np.stack([np.asarray(c, np.float32) for _, c in pairs])
