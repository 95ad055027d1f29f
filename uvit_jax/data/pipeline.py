"""Deterministic, resumable, per-process batches over any source (pixel or latent).

Determinism: the global batch at step s holds the examples at global positions s*B .. s*B+B-1 of an endless
stream. Position g lies in epoch e = g // N at offset g % N, and maps to example perm_e[g % N], where perm_e sorts
the N indices by `example_bits(seed, 1 + e, index)`. Flips and caption choices use `example_bits(seed, 0, g)`.
All of it is integer arithmetic on (seed, step), so a run resumed at step s reads exactly the batch an
uninterrupted run reads there, on any machine.

Per-process reading: process p of P reads rows p*B/P .. (p+1)*B/P - 1 of each global batch (random access), so
the global batch does not depend on how many processes share it, and each process reads only its rows.
"""
from __future__ import annotations

import collections
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np

from uvit_jax.data import datasets, features, latents
from uvit_jax.data.preprocess import example_bits
from uvit_jax.dataset_specs import DEFAULT_CACHE_GB, LATENT_DATASETS, latent_split

_AUGMENT_STREAM = 0  # example_bits stream of per-position randomness; shuffles use streams 1 + epoch


class Source(Protocol):
    num_examples: int
    num_classes: int

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]: ...


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def open_source(dataset_cfg: Any, *, data_dir: str | None = None, split: str = "train",
                cache_gb: float | None = None) -> Source:
    """The random-access source a dataset config names (see `uvit_jax.data` for the keys); `cache_gb` overrides
    dataset.cache_gb (0 for one pass over the data, where keeping decoded images would only cost memory)."""
    name = _get(dataset_cfg, "name")
    data_dir = data_dir or _get(dataset_cfg, "data_dir")
    if name in datasets.PIXEL_DATASETS:
        if cache_gb is None:
            cache_gb = _get(dataset_cfg, "cache_gb", DEFAULT_CACHE_GB)
        return datasets.PixelSource(name, data_dir, _get(dataset_cfg, "image_size"), _get(dataset_cfg, "random_flip"),
                                    split=split, cache_gb=cache_gb)
    path = _get(dataset_cfg, "path", data_dir)
    if name in LATENT_DATASETS and features.is_extracted(path):  # ours (--mode extract), else the official folders
        return features.ExtractedLatents(path, name, split)
    if name == "imagenet_latents":
        latent_split(name, split)
        return latents.ImageNetLatents(path)
    if name == "mscoco_latents":
        return latents.CocoLatents(path, split)
    raise ValueError(f"dataset.name={name!r} is not one of {sorted(datasets.PIXEL_DATASETS) + list(LATENT_DATASETS)}")


def dataset_info(dataset_cfg: Any, *, data_dir: str | None = None) -> dict[str, Any]:
    """Shapes and sizes without reading the data (see the module docstring of `uvit_jax.data` for the keys)."""
    source = open_source(dataset_cfg, data_dir=data_dir)
    info = {"image_shape": tuple(source.image_shape), "num_classes": int(source.num_classes),
            "num_examples": int(source.num_examples)}
    for extra in ("moments_shape", "context_shape"):
        if hasattr(source, extra):
            info[extra] = tuple(getattr(source, extra))
    return info


class EpochShuffle:
    """Global position -> example index: a fresh seeded permutation each epoch (the last two are cached)."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        self.num_examples, self.seed, self.shuffle = int(num_examples), int(seed), shuffle
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            bits = example_bits(self.seed, 1 + epoch, np.arange(self.num_examples))
            self._cache[epoch] = np.argsort(bits, kind="stable")
            if len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[epoch]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        if not self.shuffle:
            return positions % self.num_examples
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out


def _process_rows(global_batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(first row, number of rows) of this process in a global batch."""
    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if global_batch_size < 1 or global_batch_size % n or not 0 <= p < n:
        raise ValueError(f"global batch size {global_batch_size} must split evenly over {n} processes "
                         f"(process_index={p})")
    local = global_batch_size // n
    return p * local, local


class BatchIterator:
    """Iterates `make(step)` for step = start, start+1, ... (< stop if given), computed `prefetch` ahead in a
    background thread. `step` is the step of the next batch `next()` returns."""

    def __init__(self, make: Callable[[int, ThreadPoolExecutor], dict], start: int, stop: int | None = None,
                 prefetch: int = 2, num_threads: int = 4):
        self.step, self._stop_step = start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        q, stop_event = self._queue, self._stop

        def put(item) -> bool:
            while not stop_event.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():  # a closure, not a method: the thread must not keep the iterator alive
            try:
                with ThreadPoolExecutor(max(1, num_threads)) as pool:
                    s = start
                    while stop is None or s < stop:
                        if not put(("batch", make(s, pool))):
                            return
                        s += 1
                put(("end", None))
            except BaseException as e:  # handed to the consumer, raised there
                put(("error", e))

        self._thread = threading.Thread(target=produce, daemon=True, name="uvit-data")
        self._thread.start()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop_step is not None and self.step >= self._stop_step:
            raise StopIteration
        kind, item = self._queue.get()
        if kind == "error":
            self.close()
            raise item
        if kind == "end":
            raise StopIteration
        self.step += 1
        return item

    def __len__(self) -> int:
        if self._stop_step is None:
            raise TypeError("an endless training iterator has no length")
        return self._stop_step - self.step

    def close(self) -> None:
        """Stop the background thread (it exits within ~0.1 s)."""
        self._stop.set()

    def __del__(self):
        self.close()


def _read_rows(source: Source, indices: np.ndarray, bits: np.ndarray, train: bool, pool: ThreadPoolExecutor,
               num_threads: int) -> dict[str, np.ndarray]:
    """`source.read` over chunks of the rows in parallel (decoding and file reads release the GIL)."""
    chunks = [c for c in np.array_split(np.arange(len(indices)), max(1, min(num_threads, len(indices)))) if len(c)]
    parts = list(pool.map(lambda c: source.read(indices[c], bits[c], train), chunks))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_train_batches(dataset_cfg: Any, *, global_batch_size: int, seed: int, start_step: int = 0,
                       start_position: int | None = None, data_dir: str | None = None,
                       process_index: int | None = None, process_count: int | None = None, prefetch: int = 2,
                       num_threads: int = 4) -> BatchIterator:
    """Endless per-process training batches from step `start_step` on; a pure function of (seed, step).

    Batch `step` holds the examples at positions `start_position + (step - start_step) * global_batch_size + i` of
    the seed's endless epoch-shuffled stream; `start_position` defaults to `start_step * global_batch_size` (a run
    whose batch size changed continues from the saved data position, so no part of an epoch is skipped).

    Yields this process's rows of global batch `step`: {"image" float32 (b,H,W,C) in [-1, 1], "label" int32 (b,)}
    for pixel datasets (label when the dataset has classes), {"moments" float32 (b,h,w,8), "label" | "context"}
    for latent datasets, with b = global_batch_size / process_count. A missing dataset raises here, at once.
    """
    source = open_source(dataset_cfg, data_dir=data_dir)
    first, local = _process_rows(global_batch_size, process_index, process_count)
    order = EpochShuffle(source.num_examples, seed)
    base = np.int64(start_step) * global_batch_size if start_position is None else np.int64(start_position)

    def make(step: int, pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
        positions = base + np.int64(step - start_step) * global_batch_size + first + np.arange(local, dtype=np.int64)
        return _read_rows(source, order(positions), example_bits(seed, _AUGMENT_STREAM, positions), True, pool,
                          num_threads)

    return BatchIterator(make, int(start_step), None, prefetch, num_threads)


def make_eval_batches(dataset_cfg: Any, *, global_batch_size: int, split: str = "train",
                      num_examples: int | None = None, seed: int = 0, data_dir: str | None = None,
                      process_index: int | None = None, process_count: int | None = None, prefetch: int = 2,
                      num_threads: int = 4) -> BatchIterator:
    """One pass over the first `num_examples` (default: all) examples of `split`, in order, unaugmented.

    Every process gets the same number of batches, ceil(num_examples / global_batch_size), with its rows of each
    global batch plus "mask" bool (b,): False on the padding rows of the last batch (they repeat example 0).
    Use it for FID reference statistics. `seed` only picks COCO captions.
    """
    source = open_source(dataset_cfg, data_dir=data_dir, split=split, cache_gb=0)
    total = source.num_examples if num_examples is None else min(int(num_examples), source.num_examples)
    first, local = _process_rows(global_batch_size, process_index, process_count)
    num_batches = -(-total // global_batch_size)

    def make(step: int, pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
        positions = np.int64(step) * global_batch_size + first + np.arange(local, dtype=np.int64)
        mask = positions < total
        batch = _read_rows(source, np.where(mask, positions, 0), example_bits(seed, _AUGMENT_STREAM, positions),
                           False, pool, num_threads)
        batch["mask"] = mask
        return batch

    return BatchIterator(make, 0, num_batches, prefetch, num_threads)
