"""Reader for the latent datasets `--mode extract` writes (`uvit_jax/extract.py`): fixed-size .npy shards.

A folder is ours when it holds `manifest.json` (else `data/latents.py` reads it as an official feature folder):

  manifest.json                   {"format", "dataset", "source", "resolution", ..., "splits": {split: {...}}}
  empty_context.npy               MS-COCO: CLIP encoding of "" (77, D) float32, the null context (official name)
  <split>/moments-KKKKK.npy       (rows, h, w, 8) float32 NHWC [mean | logvar]
  <split>/labels-KKKKK.npy        ImageNet: (rows,) int32
  <split>/contexts-KKKKK.npy      MS-COCO: (captions, 77, D) float32, CLIP last_hidden_state of every caption
  <split>/caption_offsets-KKKKK.npy  MS-COCO: (images + 1,) int64, image i's captions are rows offsets[i]:offsets[i+1]
  <split>/captions-KKKKK.json     MS-COCO: {"image_ids": [...], "captions": [[str, ...], ...]}

Shard K holds source images K*S .. K*S+S-1 (S = the split's `shard_size`); ImageNet stores each image and its mirror
as rows 2i and 2i+1 (the official precomputed flip), so example e lives in shard e // (2S), row e % (2S). Rows are
read with `os.pread` at offsets from the .npy header: no file stays open (a million-image split has thousands of
shards, more than the open-file limit if each were memory-mapped), every read is a pure function of the indices,
and the shards remain ordinary .npy files (`np.load` reads them).
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np

from uvit_jax.data.datasets import DatasetNotPreparedError

MANIFEST = "manifest.json"
FORMAT = "uvit_jax.features/1"
EMPTY_CONTEXT = "empty_context.npy"
DATASETS = {"imagenet_latents": 1000, "mscoco_latents": 0}  # name -> real classes


def is_extracted(path: str | None) -> bool:
    """Whether `path` is a folder written by `--mode extract` (it holds manifest.json)."""
    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_file(root: str, split: str, kind: str, shard: int) -> str:
    """Path of one shard file, e.g. ROOT/train/moments-00003.npy (captions: .json)."""
    ext = "json" if kind == "captions" else "npy"
    return os.path.join(root, split, f"{kind}-{shard:05d}.{ext}")


class _NpyRows:
    """Rows of .npy files by pread: the header is parsed once per file, nothing is kept open."""

    def __init__(self):
        self._layouts: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        self._lock = threading.Lock()

    def layout(self, path: str) -> tuple[int, tuple[int, ...], np.dtype]:
        with self._lock:
            if path not in self._layouts:
                m = np.load(path, mmap_mode="r")  # reads the header only; `offset` is where the data starts
                if not m.flags.c_contiguous:
                    raise ValueError(f"{path}: expected a C-ordered array")
                self._layouts[path] = (int(m.offset), tuple(m.shape), m.dtype)
                del m
            return self._layouts[path]

    def read(self, path: str, rows: np.ndarray) -> np.ndarray:
        offset, shape, dtype = self.layout(path)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(rows), *shape[1:]), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(path, os.O_RDONLY)
        try:
            for j, r in enumerate(rows):
                if not 0 <= r < shape[0]:
                    raise IndexError(f"{path}: row {r} out of range ({shape[0]} rows)")
                dest = view[j * row_bytes:(j + 1) * row_bytes]
                if os.preadv(fd, [dest], offset + int(r) * row_bytes) != row_bytes:
                    raise OSError(f"{path}: short read at row {r} (truncated file?)")
        finally:
            os.close(fd)
        return out


class ExtractedLatents:
    """One split of an extracted folder as a pipeline source: `read(indices, bits, train)` ->
    {"moments" (n,h,w,8) float32, "label" (n,) int32} (ImageNet) or {"moments", "context" (n,77,D)} (MS-COCO).

    MS-COCO picks one caption per access, `bits % n_captions[index]`, as `latents.CocoLatents` does.
    """

    def __init__(self, path: str, dataset_name: str, split: str = "train"):
        manifest = read_manifest(path)
        if manifest["dataset"] != dataset_name:
            raise ValueError(f"{path} holds {manifest['dataset']} features, but dataset.name is {dataset_name!r}")
        split = {"test": "val"}.get(split, split)
        info = manifest["splits"].get(split)
        if info is None or not info.get("complete"):
            state = "is incomplete" if info else "was not extracted"
            raise DatasetNotPreparedError(
                f"split {split!r} of {path} {state}: run --mode extract with --config.extract.output={path} "
                f"--config.extract.split={split} (a rerun completes what is missing)")
        self.path, self.split, self.info = path, split, info
        self.num_classes = DATASETS[dataset_name]
        self.keys = ("moments", "label") if self.num_classes else ("moments", "context")
        self.num_examples = int(info["num_examples"])
        self.moments_shape = tuple(info["moments_shape"])
        self.image_shape = self.moments_shape[:2] + (self.moments_shape[2] // 2,)
        self.rows_per_shard = int(info["shard_size"]) * int(info["examples_per_image"])
        self._rows = _NpyRows()
        if not self.num_classes:
            self.context_shape = tuple(info["context_shape"])
            offsets = [np.load(shard_file(path, split, "caption_offsets", k)) for k in range(info["num_shards"])]
            self.n_captions = np.concatenate([np.diff(o) for o in offsets])
            self._offsets = offsets

    def _file(self, kind: str, shard: int) -> str:
        return shard_file(self.path, self.split, kind, shard)

    def _gather(self, kind: str, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` of shards `shards` (parallel arrays), in the given order."""
        parts, where = [], []
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            parts.append(self._rows.read(self._file(kind, int(k)), rows[sel]))
            where.append(sel)
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(where)] = out
        return result

    def caption_choice(self, indices: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """The caption each access picks: bits % the image's caption count (MS-COCO)."""
        counts = self.n_captions[np.asarray(indices, np.int64)].astype(np.uint64)
        return (np.asarray(bits, np.uint64) % counts).astype(np.int64)

    def read(self, indices: np.ndarray, bits: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Examples `indices`; `bits` pick MS-COCO captions (ImageNet flips are precomputed examples)."""
        del train
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(f"{self.path}/{self.split}: indices outside 0..{self.num_examples - 1}")
        shards, rows = np.divmod(indices, self.rows_per_shard)
        batch = {"moments": self._gather("moments", shards, rows)}
        if self.num_classes:
            batch["label"] = self._gather("labels", shards, rows).astype(np.int32)
        else:
            first = np.array([self._offsets[s][r] for s, r in zip(shards, rows)], np.int64)
            batch["context"] = self._gather("contexts", shards, first + self.caption_choice(indices, bits))
        return batch

    def captions(self, indices: np.ndarray) -> list[list[str]]:
        """Every caption text of images `indices` (MS-COCO)."""
        shards, rows = np.divmod(np.asarray(indices, np.int64), self.rows_per_shard)
        cache: dict[int, list[list[str]]] = {}
        for k in np.unique(shards):
            with open(self._file("captions", int(k))) as f:
                cache[int(k)] = json.load(f)["captions"]
        return [cache[int(s)][int(r)] for s, r in zip(shards, rows)]
