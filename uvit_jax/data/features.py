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

  <split>/<kind>_crc32-KKKKK.npy  (rows,) uint32: the CRC-32 of every row of moments / labels / contexts

Integrity (a damaged shard is named, never trained into NaN): extraction records every shard file's size and
CRC-32 in the manifest (`splits.<split>.shards`) and the CRC-32 of every row beside the shard. Opening a split
compares every file's size with its record (one stat per file: a truncated or replaced file stops the run at
start); every row read is checked against its CRC (about 45 us for a 32 KB row here: it reads nothing beyond the
batch, where hashing whole shards before use would read the 84-336 GB split, or a 300 MB contexts shard for one
caption); the small files (row CRCs, caption offsets, captions) are checked whole against the manifest when read.
Every read also checks the header against the split's shapes, moments and contexts for finiteness, labels against
the class count. Each failure is a `CorruptFeaturesError` naming the file and what is wrong.
"""
from __future__ import annotations

import io
import json
import os
import threading
import zlib

import numpy as np

from uvit_jax.data.datasets import CorruptFeaturesError, DatasetNotPreparedError
from uvit_jax.data.preprocess import caption_index
from uvit_jax.dataset_specs import LATENT_DATASETS, latent_split

MANIFEST = "manifest.json"
FORMAT = "uvit_jax.features/1"
EMPTY_CONTEXT = "empty_context.npy"


def shard_kinds(dataset_name: str) -> tuple[str, ...]:
    """The files of one shard."""
    if LATENT_DATASETS[dataset_name].captions:
        return ("moments", "contexts", "caption_offsets", "captions", "moments_crc32", "contexts_crc32")
    return ("moments", "labels", "moments_crc32", "labels_crc32")


def row_crcs(array: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (C order), as a shard file stores them."""
    rows = np.ascontiguousarray(array).reshape(len(array), -1)
    return np.array([zlib.crc32(row) for row in rows.view(np.uint8)], np.uint32)


def file_record(path: str) -> dict:
    """{"bytes": size, "crc32": CRC-32} of a file, read in 16 MB pieces. CRC-32 finds accidental damage (what it
    is for here) at about the speed of the read; it is no defence against deliberate tampering."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            crc, size = zlib.crc32(piece, crc), size + len(piece)
    return {"bytes": size, "crc32": crc}


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


def _npy_layout(path: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) from a .npy header, checked against the file's size."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0)(f)
        except ValueError as e:
            raise CorruptFeaturesError(f"{path}: not a .npy file ({e})") from None
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
    if fortran or dtype.hasobject:
        raise CorruptFeaturesError(f"{path}: expected a C-ordered numeric array, the header says {dtype} "
                                   f"{'Fortran' if fortran else 'C'}-ordered")
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != want:
        raise CorruptFeaturesError(f"{path}: {size} bytes, its header promises {want} (truncated or overwritten)")
    return offset, tuple(shape), dtype


class _NpyRows:
    """Rows of .npy files by pread: the header is parsed (and checked against the file's size) once per file,
    nothing is kept open."""

    def __init__(self):
        self._layouts: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        self._lock = threading.Lock()

    def layout(self, path: str) -> tuple[int, tuple[int, ...], np.dtype]:
        with self._lock:
            if path not in self._layouts:
                self._layouts[path] = _npy_layout(path)
            return self._layouts[path]

    def read(self, path: str, rows: np.ndarray) -> np.ndarray:
        offset, shape, dtype = self.layout(path)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        bad = [int(r) for r in rows if not 0 <= r < shape[0]]
        if bad:
            raise CorruptFeaturesError(f"{path}: row {bad[0]} is needed but the file holds {shape[0]} rows")
        out = np.empty((len(rows), *shape[1:]), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(path, os.O_RDONLY)
        try:
            for j, r in enumerate(rows):
                dest = view[j * row_bytes:(j + 1) * row_bytes]
                if os.preadv(fd, [dest], offset + int(r) * row_bytes) != row_bytes:
                    raise CorruptFeaturesError(f"{path}: short read at row {r} (truncated since it was opened?)")
        finally:
            os.close(fd)
        return out


class ExtractedLatents:
    """One split of an extracted folder as a pipeline source: `read(indices, bits, train)` ->
    {"moments" (n,h,w,8) float32, "label" (n,) int32} (ImageNet) or {"moments", "context" (n,77,D)} (MS-COCO).

    MS-COCO picks one caption per access, `preprocess.caption_index`, as `latents.CocoLatents` does.
    """

    def __init__(self, path: str, dataset_name: str, split: str = "train"):
        manifest = read_manifest(path)
        if manifest["dataset"] != dataset_name:
            raise ValueError(f"{path} holds {manifest['dataset']} features, but dataset.name is {dataset_name!r}")
        split = latent_split(dataset_name, split)
        info = manifest["splits"].get(split)
        if info is None or not info.get("complete"):
            state = "is incomplete" if info else "was not extracted"
            raise DatasetNotPreparedError(
                f"split {split!r} of {path} {state}: run --mode extract with --config.extract.output={path} "
                f"--config.extract.split={split} (a rerun completes what is missing)")
        self.path, self.split, self.info = path, split, info
        self.num_classes = LATENT_DATASETS[dataset_name].num_classes
        self.keys = ("moments", "label") if self.num_classes else ("moments", "context")
        self.num_examples = int(info["num_examples"])
        self.moments_shape = tuple(info["moments_shape"])
        self.image_shape = self.moments_shape[:2] + (self.moments_shape[2] // 2,)
        self.rows_per_shard = int(info["shard_size"]) * int(info["examples_per_image"])
        self._rows = _NpyRows()
        self._records = self._check_sizes(shard_kinds(dataset_name))
        self._crcs: dict[str, np.ndarray] = {}
        if not self.num_classes:
            self.context_shape = tuple(info["context_shape"])
            self._offsets = [self._caption_offsets(k) for k in range(info["num_shards"])]
            self.n_captions = np.concatenate([np.diff(o) for o in self._offsets])

    def _check_sizes(self, kinds: tuple[str, ...]) -> dict[str, dict]:
        """Every shard file against its size in the manifest; returns the records by path (none: a folder
        extracted before records and row CRCs were kept, checked by header and values only)."""
        records = {}
        for shard, kept in self.info.get("shards", {}).items():
            for kind in (k for k in kinds if k in kept):
                path, record = self._file(kind, int(shard)), kept[kind]
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    raise CorruptFeaturesError(f"{path}: missing (the manifest records it)") from None
                if size != record["bytes"]:
                    raise CorruptFeaturesError(f"{path}: {size} bytes, the manifest records {record['bytes']} "
                                               "(truncated or replaced since extraction)")
                records[path] = record
        return records

    def _whole(self, path: str) -> bytes:
        """A small file's bytes, checked against its manifest record."""
        with open(path, "rb") as f:
            content = f.read()
        record = self._records.get(path)
        if record is not None and (len(content) != record["bytes"] or zlib.crc32(content) != record["crc32"]):
            raise CorruptFeaturesError(f"{path}: its CRC-32 differs from the one recorded at extraction (the bytes "
                                       "changed since they were written)")
        return content

    def _whole_npy(self, path: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self._whole(path)), allow_pickle=False)
        except ValueError as e:
            raise CorruptFeaturesError(f"{path}: not a .npy file ({e})") from None

    def _caption_offsets(self, shard: int) -> np.ndarray:
        path = self._file("caption_offsets", shard)
        offsets = self._whole_npy(path)
        if len(offsets) != self._shard_rows(shard) + 1 or offsets[0] != 0 or (np.diff(offsets) < 1).any():
            raise CorruptFeaturesError(f"{path}: not the caption offsets of {self._shard_rows(shard)} images "
                                       "(0, increasing, at least one caption each)")
        return offsets

    def _shard_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, self.num_examples - shard * self.rows_per_shard)

    def _read(self, kind: str, shard: int, rows: np.ndarray) -> np.ndarray:
        """Rows of one shard file, its shape checked against the split's."""
        path = self._file(kind, shard)
        _, shape, dtype = self._rows.layout(path)
        want = {"moments": (self._shard_rows(shard), *self.moments_shape), "labels": (self._shard_rows(shard),),
                "contexts": shape[:1] + tuple(getattr(self, "context_shape", ()))}[kind]
        if shape != want:
            raise CorruptFeaturesError(f"{path}: holds {dtype} {shape}, the manifest's split needs {want}")
        out = self._rows.read(path, rows)
        crc_path = self._file(f"{kind}_crc32", shard)
        if crc_path in self._records:
            if crc_path not in self._crcs:
                self._crcs[crc_path] = self._whole_npy(crc_path)
            bad = np.flatnonzero(row_crcs(out) != self._crcs[crc_path][rows])
            if bad.size:
                raise CorruptFeaturesError(f"{path}: row {rows[bad[0]]} differs from its CRC-32 recorded at "
                                           "extraction (the bytes changed since they were written)")
        if kind == "labels":
            bad = np.flatnonzero((out < 0) | (out >= self.num_classes))
            if bad.size:
                raise CorruptFeaturesError(f"{path}: row {rows[bad[0]]} holds label {out[bad[0]]}, outside "
                                           f"0..{self.num_classes - 1}")
        elif not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))
            raise CorruptFeaturesError(f"{path}: row {rows[bad[0]]} holds non-finite {kind}")
        return out

    def _file(self, kind: str, shard: int) -> str:
        return shard_file(self.path, self.split, kind, shard)

    def _gather(self, kind: str, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` of shards `shards` (parallel arrays), in the given order."""
        parts, where = [], []
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            parts.append(self._read(kind, int(k), rows[sel]))
            where.append(sel)
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(where)] = out
        return result

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
            batch["context"] = self._gather("contexts", shards, first + caption_index(bits, self.n_captions[indices]))
        return batch

    def captions(self, indices: np.ndarray) -> list[list[str]]:
        """Every caption text of images `indices` (MS-COCO)."""
        shards, rows = np.divmod(np.asarray(indices, np.int64), self.rows_per_shard)
        cache: dict[int, list[list[str]]] = {}
        for k in np.unique(shards):
            cache[int(k)] = json.loads(self._whole(self._file("captions", int(k))))["captions"]
        return [cache[int(s)][int(r)] for s, r in zip(shards, rows)]
