"""Benchmark mode: train-step and sampling throughput of a config on synthetic data, with TFLOP/s and MFU.

    python main.py --config configs/imagenet256_uvit_h2.py --workdir W --mode benchmark \
        --config.train.batch_size=128 --benchmark_steps=20

Prints (and writes to W/benchmark.json): compile time, images/s (train), TFLOP/s per device and MFU (model FLOPs
= 3 x forward, forward = 2 x analytic MACs, against the chip's dense bf16 peak), peak device memory, and the
forward-only throughput of one sampler step (network evaluations per second). No dataset is read.
"""
from __future__ import annotations

import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from uvit_jax import generate, models, parallel
from uvit_jax.train import Trainer, compute_dtype, flops_per_image, peak_flops_per_device


def synthetic_batch(config, global_batch: int) -> dict:
    """Per-process random inputs with the config's shapes (latent configs get 8-channel moments)."""
    nnet = dict(config.nnet)
    n = global_batch // jax.process_count()
    rng = np.random.default_rng(0)
    size, chans = nnet["img_size"], nnet["in_chans"]
    if config.dataset.name.endswith("_latents"):
        batch = {"moments": rng.standard_normal((n, size, size, 2 * chans), np.float32)}
    else:
        batch = {"image": rng.uniform(-1, 1, (n, size, size, chans)).astype(np.float32)}
    if nnet["name"] == "uvit_t2i":
        batch["context"] = rng.standard_normal((n, nnet["num_clip_token"], nnet["clip_dim"]), np.float32)
    elif nnet.get("num_classes", 0) > 0:
        batch["label"] = rng.integers(0, nnet["num_classes"], (n,)).astype(np.int32)
    return batch


def _peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run(config, workdir: str, steps: int = 10) -> dict:
    """Time `steps` train steps (after one compile step) and one network forward; print and return the figures."""
    null_cond = None
    if config.dataset.p_uncond > 0:
        null_cond = (jnp.zeros((config.nnet.num_clip_token, config.nnet.clip_dim), jnp.float32)
                     if config.nnet.name == "uvit_t2i" else config.nnet.num_classes - 1)
    trainer = Trainer(config, null_cond=null_cond)
    batch = trainer.to_global(synthetic_batch(config, config.train.batch_size))
    t0 = time.time()
    state = trainer.init()
    compiled = trainer.step_fn.lower(state, batch).compile()
    compile_s = time.time() - t0
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.time()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.time() - t0) / steps
    images_per_s = config.train.batch_size / step_s
    tflops = images_per_s * flops_per_image(config) / jax.device_count() / 1e12
    peak = peak_flops_per_device()

    # Sampling cost is dominated by network forwards: time one batched forward at the sampling batch size.
    nnet = dict(config.nnet)
    apply = jax.jit(models.make_apply(nnet, dtype=compute_dtype(config)))
    fwd_batch = generate.padded_size(config.sample.mini_batch_size)
    x = jax.device_put(jnp.zeros((fwd_batch, nnet["img_size"], nnet["img_size"], nnet["in_chans"])),
                       parallel.batch_sharding(trainer.mesh))
    t = jnp.full((fwd_batch,), 500.0)
    cond = None
    if nnet["name"] == "uvit_t2i":
        cond = jnp.zeros((fwd_batch, nnet["num_clip_token"], nnet["clip_dim"]))
    elif nnet.get("num_classes", 0) > 0:
        cond = jnp.zeros((fwd_batch,), jnp.int32)
    jax.block_until_ready(apply(state["ema_params"], x, t, cond))
    t0 = time.time()
    for _ in range(max(steps // 2, 1)):
        out = apply(state["ema_params"], x, t, cond)
    jax.block_until_ready(out)
    fwd_s = (time.time() - t0) / max(steps // 2, 1)

    result = {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "dtype": config.dtype,
        "global_batch": config.train.batch_size, "params": models.count_params(nnet),
        "fwd_gmacs_per_image": models.forward_macs(nnet) / 1e9, "compile_s": compile_s, "step_s": step_s,
        "train_images_per_s": images_per_s, "train_tflops_per_s_per_device": tflops,
        "mfu": tflops * 1e12 / peak if peak else None, "peak_device_memory_gb": None,
        "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "forward_images_per_s": fwd_batch / fwd_s, "loss": float(metrics["loss"]),
    }
    mem = _peak_memory_bytes()
    if mem is not None:
        result["peak_device_memory_gb"] = mem / 2 ** 30
    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "benchmark.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    logging.info("benchmark: %s", result)
    return result
