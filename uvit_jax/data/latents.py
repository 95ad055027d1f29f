"""Readers for the official pre-extracted latent datasets (docs/official_behaviour.md §6.2, §6.4), converted to NHWC.

ImageNet 256/512 (`scripts/extract_imagenet_feature.py`): a directory of `{idx}.npy`, idx = 0..N-1, each a pickled
pair (moments float32 (8, h, w), label); N = 2 x 1,281,167 (every image and its mirror, so no flip at train time).

MS-COCO (`scripts/extract_mscoco_feature.py`, `extract_empty_feature.py`, `extract_test_prompt_feature.py`): a root
holding `train/` and `val/` with `{idx}.npy` = moments (8, 32, 32) and `{idx}_{k}.npy` = CLIP ViT-L/14
last_hidden_state (77, 768) of caption k; `empty_context.npy` (77, 768), the null context for classifier-free
guidance (the official `run_vis/` prompts are not read: training grids draw validation captions).

Sources yield "moments" (NHWC, 8 channels = [mean | logvar]); the posterior sample
z = scale * (mean + exp(0.5 * clip(logvar, -30, 20)) * n) is drawn on device by the train step.

The pickled files are read by a restricted unpickler (`load_npy`) that builds only NumPy arrays, dtypes and scalars,
tuples, lists, numbers and strings: a feature directory is data, and loading it runs no code from it.
"""
from __future__ import annotations

import os
import pickle
import re

import numpy as np

from uvit_jax.data.datasets import CorruptFeaturesError, DatasetNotPreparedError
from uvit_jax.data.preprocess import caption_index
from uvit_jax.dataset_specs import LATENT_DATASETS, latent_split

_CAPTION = re.compile(r"^(\d+)_(\d+)\.npy$")


def _numpy_global(module: str, name: str):
    """`module.name`, where pickles from NumPy 1 say numpy.core and NumPy 2 says numpy._core (same objects)."""
    core = getattr(np, "_core", None) or np.core
    return getattr(core.multiarray, name) if module.endswith("multiarray") else getattr(np, name)


# What a pickled ndarray, dtype or NumPy scalar refers to; nothing else may be imported by a feature file.
_ALLOWED_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                    for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _numpy_global(module, name)
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to unpickle {module}.{name}: feature files may hold only NumPy arrays, numbers, "
            "strings and tuples (this file was not written by the official extract scripts, or was tampered with)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self._path}: refusing a pickle with persistent ids")


def load_npy(file: str, mmap_mode: str | None = None):
    """Read a `.npy` file without running code from it.

    A plain array is read with `allow_pickle=False` (optionally memory-mapped). An object array (what the official
    scripts wrote for `(moments, label)` and `(prompt, context)` pairs) is unpickled with only NumPy arrays, dtypes
    and scalars allowed as globals; anything else raises ValueError naming the file.
    """
    with open(file, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
        except ValueError as e:
            raise ValueError(f"{file} is not a .npy file: {e}") from None
        if not header[2].hasobject:
            return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
        try:
            return _ArrayUnpickler(f, file).load()
        except pickle.UnpicklingError as e:
            raise ValueError(str(e) if str(e).startswith(file) else f"{file}: unreadable pickle: {e}") from None
        except Exception as e:  # noqa: BLE001 - malformed data: say which file
            raise ValueError(f"{file}: unreadable pickle: {type(e).__name__}: {e}") from None


def _pair(file: str, first: type | tuple[type, ...], what: str) -> tuple:
    """A pickled 2-element object array or tuple whose first element is a `first` and second an array-like."""
    obj = load_npy(file)
    items = tuple(obj) if isinstance(obj, (tuple, list)) or (isinstance(obj, np.ndarray) and obj.shape == (2,)) \
        else None
    if items is None or len(items) != 2 or not isinstance(items[0], first):
        raise ValueError(f"{file}: expected a pickled pair {what}, got {type(obj).__name__} "
                         f"{getattr(obj, 'shape', '')}")
    return items


def _missing(kind: str, path: str, script: str) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"{kind} features not found at {path!r}: extract them with --mode extract (the same config and workdir W "
        f"write W/features), then set --config.dataset.path=W/features; or set dataset.path to the output of the "
        f"official U-ViT script {script}")


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
        raise CorruptFeaturesError(f"{where}: expected moments of shape (8, h, w) (NCHW, [mean | logvar]), got "
                                   f"{moments.shape}")
    return _finite(np.transpose(moments, (1, 2, 0)).astype(np.float32), where, "moments")


def _finite(x: np.ndarray, where: str, what: str) -> np.ndarray:
    if not np.isfinite(x).all():
        raise CorruptFeaturesError(f"{where}: holds non-finite {what}")
    return x


class ImageNetLatents:
    """`{idx}.npy` = (moments (8,h,w), label) files -> {"moments" (n,h,w,8) float32, "label" (n,) int32}."""

    num_classes = LATENT_DATASETS["imagenet_latents"].num_classes
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
        moments, label = _pair(file, np.ndarray, "(moments, label)")  # the official files are pickled pairs
        if not isinstance(label, (int, np.integer)):
            raise CorruptFeaturesError(f"{file}: the label is a {type(label).__name__}, not an integer")
        if not 0 <= label < self.num_classes:
            raise CorruptFeaturesError(f"{file}: label {label} is outside 0..{self.num_classes - 1}")
        return _nchw_to_nhwc(moments, file), int(label)

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Examples `indices`; `bits`/`train` are unused (the flip is a precomputed example)."""
        del bits, train
        pairs = [self._load(int(i)) for i in indices]
        return {"moments": np.stack([m for m, _ in pairs]), "label": np.asarray([lb for _, lb in pairs], np.int32)}


class CocoLatents:
    """COCO feature dir split -> {"moments" (n,32,32,8) float32, "context" (n,77,768) float32}.

    One caption per access, `preprocess.caption_index` of the example's random bits (so the same (seed, position)
    always picks the same caption).
    """

    num_classes = 0
    keys = ("moments", "context")

    def __init__(self, path: str, split: str = "train", num_examples: int | None = None):
        sub = latent_split("mscoco_latents", split)
        self.path = path
        self.directory = os.path.join(path or "", sub)
        script = f"scripts/extract_mscoco_feature.py --split={sub}"
        if not path or not os.path.isdir(self.directory):
            raise _missing("MS-COCO latent", self.directory, script)
        self.num_examples = int(num_examples) if num_examples else count_indexed_files(self.directory)
        if self.num_examples == 0:
            raise _missing("MS-COCO latent (no 0.npy)", self.directory, script)
        self.n_captions = self._count_captions()
        self.moments_shape = _nchw_to_nhwc(load_npy(os.path.join(self.directory, "0.npy")), self.directory).shape
        self.image_shape = self.moments_shape[:2] + (4,)
        self.context_shape = load_npy(os.path.join(self.directory, "0_0.npy"), mmap_mode="r").shape

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
        """Examples `indices`, each with the caption `caption_index` picks (also at eval: one random caption)."""
        del train
        indices = np.asarray(indices, np.int64)
        ks = caption_index(bits, self.n_captions[indices])
        moments = [_nchw_to_nhwc(load_npy(os.path.join(self.directory, f"{i}.npy")), f"{self.directory}/{i}.npy")
                   for i in indices]
        contexts = [_finite(load_npy(path), path, "context")
                    for path in (os.path.join(self.directory, f"{i}_{k}.npy") for i, k in zip(indices, ks))]
        return {"moments": np.stack(moments), "context": np.stack(contexts).astype(np.float32)}


def load_empty_context(path: str) -> np.ndarray:
    """The null text context `<path>/empty_context.npy` (77, 768) float32 (CLIP encoding of "")."""
    file = os.path.join(path or "", "empty_context.npy")
    if not os.path.exists(file):
        raise _missing("MS-COCO empty context", file, "scripts/extract_empty_feature.py")
    return load_npy(file).astype(np.float32)
