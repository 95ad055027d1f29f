"""--mode extract: raw images (+ captions) -> the latent datasets the ImageNet 256/512 and MS-COCO configs train on.

What is computed is what the official scripts compute (docs/official_behaviour.md §6.2-6.4):
  imagenet_latents (extract_imagenet_feature.py): ADM `center_crop_arr` at extract.resolution, each image AND its
    mirror -> KL-f8 moments [mean | logvar], with the label (index of the sorted synset names): 2 x N examples.
  mscoco_latents (extract_mscoco_feature.py, extract_empty_feature.py): centre square crop -> Lanczos resize ->
    moments; the CLIP last_hidden_state of every caption (the caption texts are kept too, for sample mode);
    the encoding of "" as empty_context.npy. Splits train (train2014) and val (val2014: sampling contexts of FID).
Moments and contexts are computed in float32 at "highest" matmul precision (`uvit_jax.latent`).

Sources (extract.source, read by `uvit_jax/data/raw_images.py`): "tfds" (the prepared TFDS `imagenet2012` /
`coco_captions`), or a folder: ImageNet's train dir (`DIR/<synset>/*.JPEG`) or the COCO 2014 root.

Output (`extract.output`, default WORKDIR/features; read by `uvit_jax/data/features.py`, whose docstring has the
layout): fixed-size .npy shards per split (with the CRC-32 of every row) and a JSON manifest (image count, shapes,
source, plan, each shard file's size and CRC-32). Chosen over array_record because the shard is also the unit of
resume: its files are written atomically, then its record goes into the manifest, and a recorded shard whose files
have the recorded sizes is skipped, so a rerun after preemption does exactly what is missing and duplicates
nothing; a row is one pread at an offset computed from the .npy header (no per-record deserialisation or index), so
training's random access costs what the official `{idx}.npy` files cost, with a thousandth of the files; and any
numpy opens a shard.
The manifest marks a split complete only when every shard is on disk; the training reader refuses incomplete ones.

Parallelism: every process reads and preprocesses its own rows of each global batch (extract.batch_size images,
padded to a multiple of the device count), the encoder runs once per global batch over all devices, and process 0
gathers the moments and writes the shard (in a background thread, overlapping the next batches). Process 0 decides
which shards are missing and tells the others, so every host runs the same batches and the same jitted calls.
A SIGTERM (or a jax.distributed preemption notice) stops at the next batch; the shard in progress is redone later.
"""
from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from uvit_jax import console, files, latent, parallel, preemption
from uvit_jax.config import ConfigError
from uvit_jax.data import features, raw_images
from uvit_jax.data.pipeline import BatchIterator
from uvit_jax.dataset_specs import LATENT_DATASETS
from uvit_jax.rundir import RunDir



class _Writer:
    """Process 0's shard files, written atomically in one background thread (at most one shard pending)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1) if parallel.is_main_process() else None
        self._pending: Future | None = None

    def submit(self, paths_and_arrays: list[tuple[str, object]], then: Callable[[], None]) -> None:
        """Write the files, then call `then` (the shard's manifest record)."""
        if self._pool is None:
            return
        self.wait()

        def job():
            for p, a in paths_and_arrays:
                _write(p, a)
            then()

        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a failed write here
            self._pending = None

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


# Host memory one encoded image takes on CPU at 256x256: XLA's memory analysis of the KL-f8 encoder says 0.10 GB of
# temporaries per image; the runtime's own buffers about double it (batch 64, i.e. 128 encodes with mirrors, grew
# past 24 GB and was killed by the kernel without a word). Scales with the pixel count.
CPU_BYTES_PER_ENCODE_256 = 0.2e9


def fit_batch(batch: int, per_image: float, size: int, available: float, devices: int) -> int:
    """The largest global batch <= `batch` (a multiple of `devices`) whose encoder pass, `per_image` bytes an
    image, fits in 80% of `available` host bytes; ConfigError when one image per device does not fit."""
    fit = int(0.8 * available // per_image) // devices * devices
    if fit < devices:
        raise ConfigError(f"config.extract.batch_size: encoding {devices} image(s) at {size}x{size} needs about "
                          f"{devices * per_image / 1e9:.1f} GB of host memory, {available / 1e9:.1f} GB are available")
    return min(batch, fit)


def _available_memory() -> float:
    """MemAvailable of /proc/meminfo in bytes (inf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("inf")


def _write(path: str, value) -> None:
    if path.endswith(".json"):
        files.write_json(path, value)
    else:
        files.write_atomic(path, lambda tmp: np.save(tmp, value))


def _broadcast(x: np.ndarray) -> np.ndarray:
    """Process 0's value on every process."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _begin_split(out: str, split: str, plan: dict) -> None:
    """Record the split's plan in the manifest (process 0); a rerun must have the same plan."""
    path = os.path.join(out, features.MANIFEST)
    manifest = (features.read_manifest(out) if os.path.exists(path)
                else {"format": features.FORMAT, "dataset": plan["dataset"], "splits": {}})
    entry = manifest["splits"].get(split)
    if manifest["dataset"] != plan["dataset"] or (entry and entry["plan"] != plan):
        before = {"dataset": manifest["dataset"], **(entry["plan"] if entry else {})}
        diffs = {k: (before.get(k), v) for k, v in plan.items() if before.get(k) != v}
        raise ConfigError(f"config.extract.output: {out} holds an extraction with another plan (before, now): {diffs}. "
                          "Use another extract.output, or delete the folder to start over.")
    if entry is None:
        manifest["splits"][split] = {"plan": plan, "complete": False, **plan}
        files.write_json(path, manifest)


def _record_shard(out: str, split: str, shard: int, kinds: tuple[str, ...]) -> None:
    """The shard's file sizes and CRC-32s into the manifest, after its files (the reader checks them; a shard
    without a record is redone)."""
    record = {k: features.file_record(features.shard_file(out, split, k, shard)) for k in kinds}
    manifest = features.read_manifest(out)
    manifest["splits"][split].setdefault("shards", {})[f"{shard:05d}"] = record
    files.write_json(os.path.join(out, features.MANIFEST), manifest)


def _shard_done(out: str, split: str, shard: int, kinds: tuple[str, ...], recorded: dict) -> bool:
    """Recorded in the manifest, every file there at its recorded size."""
    record = recorded.get(f"{shard:05d}", {})
    if set(kinds) - set(record):
        return False
    paths = {k: features.shard_file(out, split, k, shard) for k in kinds}
    return all(os.path.exists(p) and os.path.getsize(p) == record[k]["bytes"] for k, p in paths.items())


def _finish_split(out: str, split: str, extra: dict) -> None:
    manifest = features.read_manifest(out)
    manifest["splits"][split].update(extra, complete=True)
    files.write_json(os.path.join(out, features.MANIFEST), manifest)


def _pad_texts(texts: list[str], size: int) -> list[str]:
    return texts + [""] * (size - len(texts))


def run(config, workdir: str) -> str | None:
    """Extract the splits the config needs into extract.output; returns the folder (None if preempted)."""
    name = config.dataset.name
    if name not in LATENT_DATASETS:
        raise ConfigError(f"config.dataset.name: --mode extract writes imagenet_latents or mscoco_latents (got "
                          f"{name!r}; pixel datasets are read directly)")
    known = LATENT_DATASETS[name].splits
    splits = tuple(config.extract.split.split(",")) if config.extract.split else known
    if not set(splits) <= set(known):
        raise ConfigError(f"config.extract.split: {name} has the splits {known} (got {config.extract.split!r})")
    out = config.extract.output or RunDir(workdir).features
    f = latent.downsampling(config)
    size = config.extract.resolution or int(config.nnet.img_size) * f
    if size != int(config.nnet.img_size) * f:
        raise ConfigError(f"config.extract.resolution: {size} gives {size / f:g}x{size / f:g} latents, the network "
                          f"takes nnet.img_size={config.nnet.img_size} (resolution {config.nnet.img_size * f})")
    mesh = parallel.make_mesh()
    encode = latent.make_encoder(config, mesh)  # a missing weights file stops here, before any data is listed
    text = None
    if name == "mscoco_latents":
        text = latent.make_text_encoder(config, mesh)
    batch = parallel.padded_size(config.extract.batch_size)
    if jax.default_backend() == "cpu":  # host memory: the kernel kills an oversized batch without a message
        per_image = CPU_BYTES_PER_ENCODE_256 * LATENT_DATASETS[name].examples_per_image * (size / 256) ** 2
        available = _available_memory()
        fit = fit_batch(batch, per_image, size, available, jax.device_count())
        if fit < batch:
            logging.warning("config.extract.batch_size=%d needs about %.1f GB of host memory at %dx%d, %.1f GB are "
                            "available: encoding %d images at a time (set extract.batch_size to choose)",
                            config.extract.batch_size, batch * per_image / 1e9, size, size, available / 1e9, fit)
            batch = fit
    if parallel.is_main_process() and os.path.isdir(out):
        removed = files.remove_dead_leftovers(out)
        if removed:
            logging.info("Removed %d leftover(s) of interrupted writes in %s, e.g. %s", len(removed), out, removed[0])
    steps = itertools.count()  # preemption sync points increase across splits
    with preemption.stop_guard():
        if text is not None:
            _empty_context(out, text, config, batch)
        for split in splits:
            source = raw_images.open_raw_images(name, config.extract.source, config.extract.data_dir, split, size)
            if not _extract_split(config, out, split, source, size, encode, text, mesh, batch, steps):
                logging.info("Preemption requested: stopped; run the same command again to finish %s", out)
                return None
    logging.info("Features of %s in %s; train on them with --config.dataset.path=%s", ",".join(splits), out, out)
    return out


def _empty_context(out: str, text, config, batch: int) -> None:
    """empty_context.npy: the CLIP encoding of "" (the null context), checked against the network's context."""
    context = text(_pad_texts([""], batch))[0]  # padded to the caption batch: one compiled shape
    want = (int(config.nnet.num_clip_token), int(config.nnet.clip_dim))
    if context.shape != want:
        raise ConfigError(f"config.clip.pretrained_path: {config.clip.pretrained_path} gives contexts "
                          f"{context.shape}, the network takes {want} (nnet.num_clip_token, nnet.clip_dim)")
    path = os.path.join(out, features.EMPTY_CONTEXT)
    if parallel.is_main_process() and not os.path.exists(path):
        _write(path, context)


def _extract_split(config, out, split, source, size, encode, text, mesh, batch, steps) -> bool:
    """Encode the missing shards of one split; True when the split is complete."""
    coco = text is not None
    per_image = LATENT_DATASETS[config.dataset.name].examples_per_image  # ImageNet: the image and its mirror
    shard_size, n = int(config.extract.shard_size), source.num_images
    f = latent.downsampling(config)
    plan = {"dataset": config.dataset.name, "source": source.description, "resolution": size,
            "shard_size": shard_size, "num_images": n, "examples_per_image": per_image,
            "moments_shape": [size // f, size // f, 2 * int(config.autoencoder.embed_dim)],
            "autoencoder": os.path.basename(config.autoencoder.pretrained_path)}
    if coco:
        plan["clip"] = os.path.basename(os.path.normpath(config.clip.pretrained_path))
        plan["context_shape"] = [int(config.nnet.num_clip_token), int(config.nnet.clip_dim)]
    if parallel.is_main_process():
        os.makedirs(os.path.join(out, split), exist_ok=True)
        _begin_split(out, split, plan)
    num_shards = math.ceil(n / shard_size)
    kinds = features.shard_kinds(config.dataset.name)
    done = np.zeros(num_shards, bool)
    if parallel.is_main_process():  # the others take process 0's answer
        recorded = features.read_manifest(out)["splits"][split].get("shards", {})
        done = np.array([_shard_done(out, split, s, kinds, recorded) for s in range(num_shards)])
    done = _broadcast(done)
    todo = [s for s in range(num_shards) if not done[s]]
    local = batch // jax.process_count()
    first = jax.process_index() * local  # this process's rows of every global batch

    def bounds(s):
        return s * shard_size, min((s + 1) * shard_size, n)

    units = [(s, j) for s in todo for j in range(math.ceil((bounds(s)[1] - bounds(s)[0]) / batch))]
    logging.info("Extracting %s %s (%s) at %dx%d: %d images in %d shards of %d, %d already done; %d global batches "
                 "of %d into %s", config.dataset.name, split, source.description, size, size, n, num_shards,
                 shard_size, num_shards - len(todo), len(units), batch, out)
    threads = min(16, os.cpu_count() or 1)

    def make(u, pool):
        s, j = units[u]
        lo, hi = bounds(s)
        rows = lo + j * batch + np.arange(batch)
        mine = np.where(rows < hi, rows, lo)[first:first + local]  # padding rows repeat the shard's first image
        parts = list(pool.map(source.read, [c for c in np.array_split(mine, threads) if len(c)]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    batches = BatchIterator(make, 0, len(units), prefetch=2, num_threads=threads)
    writer = _Writer()
    acc: dict[str, list] = collections.defaultdict(list)
    written, timed_images, t_start, stopped = 0, 0, None, False
    try:
        for s, j in units:
            if preemption.should_stop(next(steps)):
                stopped = True
                break
            host = next(batches)
            lo, hi = bounds(s)
            take = min(batch, hi - lo - j * batch)
            x = host["image"]
            if not coco:  # rows 2i, 2i+1 = image i and its mirror
                x = np.stack([x, x[:, :, ::-1]], axis=1).reshape(-1, *x.shape[1:])
                host["label"] = np.repeat(host["label"], 2)
            moments = parallel.gather_to_host(encode(parallel.host_local_to_global(x, mesh)))
            acc["moments"].append(moments[:take * per_image])
            if not coco:
                labels = parallel.gather_to_host(parallel.host_local_to_global(host["label"], mesh))
                acc["labels"].append(labels[:take * per_image].astype(np.int32))
            if t_start is None:
                t_start = time.perf_counter()  # throughput from here: the first batch includes compilation
            else:
                timed_images += take
            if lo + j * batch + take < hi:
                continue
            arrays = {k: np.concatenate(v) for k, v in acc.items()}
            acc.clear()
            if coco:
                arrays.update(_encode_captions(source, lo, hi, text, batch))
            arrays.update({f"{k}_crc32": features.row_crcs(arrays[k]) for k in ("moments", "labels", "contexts")
                           if k in arrays})
            writer.submit([(features.shard_file(out, split, k, s), arrays[k]) for k in kinds],
                          functools.partial(_record_shard, out, split, s, kinds))
            written += 1
            if written % config.extract.log_interval == 0 or written == len(todo):
                speed = "(speed from the second batch on: the first one compiles)"
                if timed_images:
                    rate = timed_images / (time.perf_counter() - t_start)
                    left = sum(bounds(t)[1] - bounds(t)[0] for t in todo[written:])
                    speed = (f"{console.format_rate(rate, 'image')}{' (x2 with mirrors)' if not coco else ''}  "
                             f"ETA {console.format_duration(left / rate)}")
                logging.info("%s: shard %d/%d (%d written this run)  %s", split, num_shards - len(todo) + written,
                             num_shards, written, speed)
    finally:
        batches.close()
        writer.close()
    if stopped:
        return False
    if parallel.is_main_process():
        extra = {}
        if coco:
            extra["num_captions"] = int(sum(np.load(features.shard_file(out, split, "caption_offsets", s))[-1]
                                            for s in range(num_shards)))
        _finish_split(out, split, {"num_examples": n * per_image, "num_shards": num_shards, **extra})
    return True


def _encode_captions(source, lo: int, hi: int, text, batch: int) -> dict:
    """Every caption of images lo..hi-1 -> contexts (m, 77, D), offsets (hi-lo+1,), the texts and image ids."""
    captions, ids = source.captions(np.arange(lo, hi))
    flat = [c for caps in captions for c in caps]
    contexts = np.concatenate([text(_pad_texts(flat[i:i + batch], batch))[:len(flat[i:i + batch])]
                               for i in range(0, len(flat), batch)])
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in captions])]).astype(np.int64)
    return {"contexts": contexts, "caption_offsets": offsets,
            "captions": {"image_ids": [int(i) for i in ids], "captions": captions}}
