"""--mode extract: raw images (+ captions) -> the latent datasets the ImageNet 256/512 and MS-COCO configs train on.

What is computed is what the official scripts compute (docs/official_behaviour.md §6.2-6.4):
  imagenet_latents (extract_imagenet_feature.py): ADM `center_crop_arr` at extract.resolution, each image AND its
    mirror -> KL-f8 moments [mean | logvar], with the label (index of the sorted synset names): 2 x N examples.
  mscoco_latents (extract_mscoco_feature.py, extract_empty_feature.py): centre square crop -> Lanczos resize ->
    moments; the CLIP last_hidden_state of every caption (the caption texts are kept too, for sample mode);
    the encoding of "" as empty_context.npy. Splits train (train2014) and val (val2014: sampling contexts of FID).
Moments and contexts are computed in float32 at "highest" matmul precision (`uvit_jax.latent`).

Sources (extract.source): "tfds" reads the prepared TFDS `imagenet2012` / `coco_captions` (array_record; never
downloaded; val2014 = the Karpathy val + test + restval splits), or a folder: ImageNet's train dir
(`DIR/<synset>/*.JPEG`) or the COCO root (`train2014/`, `val2014/`, `annotations/captions_{train,val}2014.json`).

Output (`extract.output`, default WORKDIR/features; read by `uvit_jax/data/features.py`, whose docstring has the
layout): fixed-size .npy shards per split and a JSON manifest (image count, shapes, source, plan). Chosen over
array_record because the shard is also the unit of resume: each file is written atomically and a shard whose files
all exist is skipped, so a rerun after preemption does exactly what is missing and duplicates nothing; a row is one
pread at an offset computed from the .npy header (no per-record deserialisation or index), so training's random
access costs what the official `{idx}.npy` files cost, with a thousandth of the files; and any numpy opens a shard.
The manifest marks a split complete only when every shard is on disk; the training reader refuses incomplete ones.

Parallelism: every process reads and preprocesses its own rows of each global batch (extract.batch_size images,
padded to a multiple of the device count), the encoder runs once per global batch over all devices, and process 0
gathers the moments and writes the shard (in a background thread, overlapping the next batches). Process 0 decides
which shards are missing and tells the others, so every host runs the same batches and the same jitted calls.
A SIGTERM (or a jax.distributed preemption notice) stops at the next batch; the shard in progress is redone later.
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from uvit_jax import console, files, latent, parallel, preemption
from uvit_jax.config import ConfigError
from uvit_jax.data import datasets, features, preprocess
from uvit_jax.data.datasets import DatasetNotPreparedError
from uvit_jax.data.pipeline import BatchIterator
from uvit_jax.rundir import RunDir

SPLITS = {"imagenet_latents": ("train",), "mscoco_latents": ("train", "val")}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
COCO_HELP = ("download train2014.zip, val2014.zip and annotations_trainval2014.zip from https://cocodataset.org and "
             "unzip them there, or use extract.source=tfds with a prepared coco_captions")


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def center_square_lanczos(image: np.ndarray, size: int) -> np.ndarray:
    """Official MS-COCO geometry (datasets.py `center_crop`): the central min(h, w) square, Lanczos-resized to
    `size` x `size`."""
    h, w = image.shape[:2]
    side = min(h, w)
    crop = image[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))


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
        images = np.stack([center_square_lanczos(_rgb(self.files[i]), self.size) for i in indices])
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
        images = [center_square_lanczos(ex["image"], self.size) for ex in self._examples(self._parts, indices)]
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


def open_images(config, split: str, size: int):
    """The raw-image source extract.source names, for `config.dataset.name`'s dataset and `split`."""
    source, data_dir = config.extract.source, config.extract.data_dir
    if config.dataset.name == "imagenet_latents":
        return ImageNetTFDS(data_dir, size) if source == "tfds" else ImageNetFolder(source, size)
    return CocoTFDS(split, data_dir, size) if source == "tfds" else CocoFolder(source, split, size)


class _Writer:
    """Process 0's shard files, written atomically in one background thread (at most one shard pending)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1) if parallel.is_main_process() else None
        self._pending: Future | None = None

    def submit(self, paths_and_arrays: list[tuple[str, object]]) -> None:
        if self._pool is None:
            return
        self.wait()
        self._pending = self._pool.submit(lambda: [_write(p, a) for p, a in paths_and_arrays])

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a failed write here
            self._pending = None

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


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


def _finish_split(out: str, split: str, extra: dict) -> None:
    manifest = features.read_manifest(out)
    manifest["splits"][split].update(extra, complete=True)
    files.write_json(os.path.join(out, features.MANIFEST), manifest)


def _pad_texts(texts: list[str], size: int) -> list[str]:
    return texts + [""] * (size - len(texts))


def run(config, workdir: str) -> str | None:
    """Extract the splits the config needs into extract.output; returns the folder (None if preempted)."""
    name = config.dataset.name
    if name not in SPLITS:
        raise ConfigError(f"config.dataset.name: --mode extract writes imagenet_latents or mscoco_latents (got "
                          f"{name!r}; pixel datasets are read directly)")
    splits = tuple(config.extract.split.split(",")) if config.extract.split else SPLITS[name]
    if not set(splits) <= set(SPLITS[name]):
        raise ConfigError(f"config.extract.split: {name} has the splits {SPLITS[name]} (got {config.extract.split!r})")
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
    if parallel.is_main_process() and os.path.isdir(out):
        removed = files.remove_dead_leftovers(out)
        if removed:
            logging.info("Removed %d leftover(s) of interrupted writes in %s, e.g. %s", len(removed), out, removed[0])
    steps = itertools.count()  # preemption sync points increase across splits
    with preemption.stop_guard():
        if text is not None:
            _empty_context(out, text, config, batch)
        for split in splits:
            source = open_images(config, split, size)
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
    per_image = 1 if coco else 2  # ImageNet: the image and its mirror
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
    kinds = ("moments", "contexts", "caption_offsets", "captions") if coco else ("moments", "labels")
    done = _broadcast(np.array([all(os.path.exists(features.shard_file(out, split, k, s)) for k in kinds)
                                for s in range(num_shards)]))
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
            writer.submit([(features.shard_file(out, split, k, s), arrays[k]) for k in kinds])
            written += 1
            if written % config.extract.log_interval == 0 or written == len(todo):
                speed = "(speed from the second batch on: the first one compiles)"
                if timed_images:
                    rate = timed_images / (time.perf_counter() - t_start)
                    left = sum(bounds(t)[1] - bounds(t)[0] for t in todo[written:])
                    speed = (f"{rate:.1f} images/s{' (x2 with mirrors)' if not coco else ''}  "
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
