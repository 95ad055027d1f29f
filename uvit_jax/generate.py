"""The configured sampler around a network, and the one sampling driver of the project.

`make_generate_fn`: noise -> model-space images in one jitted call, with classifier-free guidance. The network
enters as `apply(params, x, net_time, cond)`; the sampler sees `eps_fn(x, t)` in its own continuous time t and the
schedule maps t to the network's time input (999 t for vp, 1000 t for discrete), as the official samplers do.

`Sampler`: condition -> generate -> decode -> gather -> uint8, batch by batch. Sample mode, FID during training,
the training grids and prompt sampling all draw through it, so the conditions (labels on the batch sharding,
validation captions, the empty-text null context read once per process) and the batch size are decided here.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.tree_util import Partial

from uvit_jax import data, diffusion, files, images, latent, parallel
from uvit_jax.conditioning import Conditioning
from uvit_jax.rundir import RunDir
from uvit_jax.train_step import make_apply


def make_generate_fn(apply: Callable, schedule, *, algorithm: str, steps: int, image_shape: tuple[int, ...],
                     method: str = "fast", order: int = 3, skip_type: str = "logSNR", scale: float = 0.0,
                     null_cond: Any = None, thresholding: bool = False) -> Callable:
    """Returns `generate(params, key, cond, batch_size) -> x_0` (NHWC, model space, not clipped); jit it.

    `cond` is the per-sample labels / contexts (None for unconditional models). With scale > 0, eps is
    (1+s) eps_c - s eps_u in one batched forward pass (diffusion.cfg).
    """
    def net(params, x, net_time, cond):
        return apply(params, x, net_time, cond).astype(jnp.float32)  # the solver runs in float32

    def generate(params, key, cond, batch_size: int, rows: int | None = None):
        """`rows` (default batch_size) noise rows, zero-padded to batch_size: the first rows' noise does not
        depend on the padding, so a batch padded for another device count starts from the same noise."""
        noise_key, sde_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (rows or batch_size, *image_shape), jnp.float32)
        x_T = jnp.pad(x_T, ((0, batch_size - x_T.shape[0]),) + ((0, 0),) * len(image_shape))
        net_fn = Partial(net, params)  # params travel as traced inputs of the sampler's jit
        if scale > 0:
            net_fn = diffusion.cfg(net_fn, scale, null_cond)
        eps_fn = diffusion.make_eps_fn(net_fn, schedule, cond)
        if algorithm in ("dpm_solver", "dpm_solver_pp"):
            return diffusion.dpm_solver_sample(eps_fn, x_T, schedule, steps=steps, order=order, method=method,
                                               skip_type=skip_type, predict_x0=algorithm == "dpm_solver_pp",
                                               thresholding=thresholding)
        if algorithm in ("euler_maruyama_sde", "euler_maruyama_ode"):
            return diffusion.euler_maruyama_sample(eps_fn, x_T, sde_key, schedule, steps=steps,
                                                   sde=algorithm.endswith("sde"))
        raise ValueError(f"unknown sampler {algorithm!r}")

    return generate


def sampler_settings(config, *, steps: int | None = None) -> dict:
    """The config's sampler as `make_generate_fn` keywords: algorithm, steps, DPM-Solver details and the guidance
    scale (0 unless sample.cfg)."""
    s = config.sample
    return dict(algorithm=s.algorithm, steps=int(steps or s.sample_steps), method=s.method, order=int(s.order),
                skip_type=s.skip_type, thresholding=bool(s.thresholding),
                scale=float(s.scale) if s.cfg and s.scale > 0 else 0.0)


def make_generate_from_config(config, apply: Callable, *, image_shape: tuple[int, ...], settings: dict | None = None,
                              null_context: np.ndarray | None = None) -> Callable:
    """`make_generate_fn` with `settings` (default: the config's `sampler_settings`) and the null condition."""
    settings = settings or sampler_settings(config)
    null_cond = (Conditioning.from_config(config).null_condition(null_context) if settings["scale"] > 0 else None)
    return make_generate_fn(apply, diffusion.make_schedule(config.schedule), image_shape=image_shape,
                            null_cond=null_cond, **settings)


def jit_generate(generate: Callable, batch_size: int, mesh, rows: int | None = None) -> Callable:
    """`generate` (from make_generate_fn) jitted as `gen(params, key, cond)` for `batch_size` images split over
    `mesh` by batch (the first `rows` from their own noise, see make_generate_fn). With sharded parameters
    (FSDP), build its network with the same mesh (`train_step.make_apply(config, mesh=mesh)`), which pins the
    activations to that split."""
    return jax.jit(lambda p, k, c: generate(p, k, c, batch_size=batch_size, rows=rows),
                   out_shardings=parallel.batch_sharding(mesh))


@functools.lru_cache(maxsize=None)
def _read_empty_context(path: str) -> np.ndarray:
    return data.load_empty_context(path)


def empty_context(config) -> np.ndarray | None:
    """The null condition of text models (the CLIP encoding of "", `empty_context.npy` of the feature folder),
    read once per process and shared by training's condition drop, the grids, FID and sample mode; None for
    networks that are not text-conditional."""
    if Conditioning.from_config(config).kind != "text":
        return None
    return _read_empty_context(config.dataset.path)


def image_shape(config) -> tuple[int, int, int]:
    """The shape the network generates (latents for latent configs): no dataset needed to sample."""
    return (int(config.nnet.img_size), int(config.nnet.img_size), int(config.nnet.in_chans))


def batch_size(config, n: int) -> int:
    """Images per sampling call when n are wanted: `sample.mini_batch_size` per device (the official
    `sample2dir` draws its mini batch on every process, one per GPU), never more than n padded to the device
    count: asking for 4 images draws 8 on 8 devices, not a whole mini batch."""
    return min(int(config.sample.mini_batch_size) * jax.device_count(), parallel.padded_size(n))


def sample_labels(key, n: int, probs: np.ndarray) -> np.ndarray:
    """n class labels drawn with probabilities `probs` (one per real class), on the host."""
    return np.asarray(jax.random.choice(key, len(probs), (n,), p=jnp.asarray(probs)), np.int32)


def label_probabilities(config, workdir: str, num_classes: int) -> np.ndarray:
    """How sample labels are drawn (`sample.label_distribution`): "uniform" over the real classes (the official
    latent ImageNet evaluation), or "dataset": the training set's class frequencies, as the official ImageNet-64
    evaluation draws them; read once from the labels (images are not decoded) and cached in WORKDIR/eval/."""
    if config.sample.label_distribution == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    cache = RunDir(workdir).class_frequencies_cache(config.dataset.name)
    if os.path.exists(cache):
        return np.load(cache)
    logging.info("Reading the class frequencies of %s (once; cached in %s)", config.dataset.name, cache)
    probs = data.open_source(config.dataset).class_frequencies()
    if parallel.is_main_process():
        files.write_atomic(cache, lambda tmp: np.save(tmp, probs))
    return probs


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """x with its last row repeated up to n rows (padding rows are generated and dropped)."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


class Sampler:
    """condition -> generate -> decode -> gather -> uint8 for batches of `rows` images: the one sampling driver.

    Each call generates `rows` images padded to the device count (`parallel.padded_size`): the files of a sample
    run keep their size when it is resumed on another device count. Conditions of batch i:
      * class models: labels drawn from `label_key(i)` with `label_probs` (sample mode, FID), or, without a
        label_key, `Conditioning.grid_labels` (column j shows class j: the training grids);
      * text models: the contexts of validation captions `texts.batch(i, rows)` (as the official evaluation
        draws them; training grids fall back to the training captions when no validation split was extracted),
        or the `contexts` given (prompts);
      * unconditional models: none.
    Latent configs decode through the autoencoder (`latent.make_decoder`; `decode=False` keeps latents).
    """

    def __init__(self, config, mesh, rows: int, *, settings: dict | None = None, decode: bool = True,
                 null_context: np.ndarray | None = None, label_probs: np.ndarray | None = None,
                 contexts: np.ndarray | None = None, train_captions_if_no_val: bool = False):
        self.cond = Conditioning.from_config(config)
        self.mesh, self.rows, self.batch = mesh, int(rows), parallel.padded_size(rows)
        settings = settings or sampler_settings(config)
        if null_context is None and settings["scale"] > 0:
            null_context = empty_context(config)
        self.decode = latent.make_decoder(config, mesh) if decode and latent.is_latent(config) else None
        self.label_probs = label_probs
        self.texts, self.contexts = None, contexts
        if self.cond.kind == "text" and contexts is None:
            try:
                self.texts = data.TextConditions(config, "val")
            except data.DatasetNotPreparedError:
                if not train_captions_if_no_val:
                    raise
                self.texts = data.TextConditions(config, "train")
        fn = make_generate_from_config(config, make_apply(config, mesh=mesh), image_shape=image_shape(config),
                                       settings=settings, null_context=null_context)
        self._gen = jit_generate(fn, self.batch, mesh, rows=self.rows)

    def conditions(self, index: int, label_key=None) -> tuple[np.ndarray | None, dict]:
        """(the network's condition for batch `index` (rows on the host), records to keep beside the images)."""
        if self.cond.kind == "class":
            if label_key is None:
                labels = self.cond.grid_labels((index + 1) * self.rows)[index * self.rows:]
            else:
                labels = sample_labels(label_key, self.rows, self.label_probs)
            return labels, {"labels": labels}
        if self.contexts is not None:
            return self.contexts[index * self.rows:(index + 1) * self.rows], {}
        if self.texts is not None:
            records = self.texts.batch(index, self.rows)
            return records.pop("context"), records
        return None, {}

    def __call__(self, params, key, cond: np.ndarray | None = None) -> np.ndarray:
        """uint8 NHWC images (rows, ...) on every host, from noise `key` and the host condition `cond`."""
        c = None if cond is None else latent.host_to_global(_pad_rows(np.asarray(cond), self.batch), self.mesh)
        x = self._gen(params, key, c)
        x = parallel.gather_to_host(self.decode(x) if self.decode else x)
        return images.to_uint8(x[:self.rows])

    def batches(self, params, n: int, noise_key: Callable[[int], Any], *, label_key: Callable[[int], Any] | None = None,
                indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(i, images, records) for the batches `indices` (default all) of n images: batch i holds images
        i*rows .. min((i+1)*rows, n) - 1, its noise from noise_key(i) and its labels from label_key(i)."""
        for i in range(-(-n // self.rows)) if indices is None else indices:
            count = min(self.rows, n - i * self.rows)
            cond, records = self.conditions(i, None if label_key is None else label_key(i))
            x = self(params, noise_key(i), cond)
            yield i, x[:count], {k: v[:count] for k, v in records.items()}
