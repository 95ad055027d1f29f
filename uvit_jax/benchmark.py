"""Benchmark mode: train-step speed, memory and FLOPs of a config on synthetic data (no dataset is read).

    python main.py --config configs/imagenet256_uvit_h2.py --workdir W --mode benchmark \
        --config.train.batch_size=128 --benchmark_steps=20
    python main.py --config configs/imagenet256_uvit_l2.py --workdir W --mode benchmark --benchmark_compile_only

Writes W/benchmark.json (and prints it). Both forms report XLA's memory analysis of the compiled train step per
device (arguments, outputs, temporaries, aliased donations; `memory_estimate_gb` = arguments + temporaries +
non-aliased outputs, GiB) and the forward FLOPs per image twice: XLA's cost analysis of the compiled forward
(`xla_forward_flops`) and the analytic count (`analytic_forward_flops` = 2 x models.forward_macs), plus XLA's
FLOPs of the whole train step per image (which includes the recomputation of rematerialised blocks).

Compile-only compiles for the devices present, from shapes alone (nothing the size of the model is allocated):
for the per-device figures of an N-device run on one CPU, pass the per-device batch (or set
XLA_FLAGS=--xla_force_host_platform_device_count=N). On CPU it compiles with the memory-minimising scheduler (as
the CPU train step does) and without YNNPACK fusions (`CPU_ESTIMATE_OPTIONS`): XLA:CPU's default,
concurrency-optimised schedule holds many blocks' temporaries at once (U-ViT-L/2 at batch 128: 100 GiB instead of
6.4 GiB), which says nothing about an accelerator. XLA:CPU also computes bf16 matmuls in float32, so a CPU estimate
of a bf16 run is an upper bound.

The timed form adds: seconds per train step (`step_s`, after one warm-up step), images/s, TFLOP/s per device and
MFU (model FLOPs = 3 x forward against the chip's dense bf16 peak), the peak device memory where the backend
reports it, and the forward-only throughput of the network at the train batch (one sampler step's cost).
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

from uvit_jax import files, host_malloc, models, parallel
from uvit_jax.conditioning import Conditioning
from uvit_jax.rundir import RunDir
from uvit_jax.train_step import CPU_COMPILER_OPTIONS, Trainer, flops_per_image, make_apply, peak_flops_per_device

CPU_ESTIMATE_OPTIONS = {**CPU_COMPILER_OPTIONS, "xla_cpu_experimental_ynn_fusion_type": ""}


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
    cond = Conditioning.from_config(config).synthetic(rng, n)
    if cond is not None:
        batch[Conditioning.from_config(config).batch_key] = cond
    return batch


def make_trainer(config, mesh=None) -> Trainer:
    """The run's Trainer (over `mesh`, default all devices) with a null condition of the right shape."""
    cond = Conditioning.from_config(config)
    null_cond = None
    if config.dataset.p_uncond > 0:  # the empty-text context only matters for its shape here
        null_cond = cond.null_condition(np.zeros(cond.context_shape, np.float32) if cond.kind == "text" else None)
    return Trainer(config, mesh=mesh, null_cond=null_cond)


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device program
    return float(cost.get("flops", 0.0))


def memory(compiled) -> dict:
    """XLA's memory analysis of one device's program, in GiB."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = lambda b: b / 2 ** 30
    out = {"argument_gb": gib(m.argument_size_in_bytes), "output_gb": gib(m.output_size_in_bytes),
           "temp_gb": gib(m.temp_size_in_bytes), "alias_gb": gib(m.alias_size_in_bytes)}
    # Donated state: outputs written over aliased arguments take no new memory.
    out["memory_estimate_gb"] = out["argument_gb"] + out["temp_gb"] + out["output_gb"] - out["alias_gb"]
    return out


def forward_flops(config, batch: int) -> tuple[float, float]:
    """(XLA cost-analysis FLOPs, analytic FLOPs) of one network forward per image, compiled from shapes only."""
    nnet = dict(config.nnet)
    apply = make_apply(config)  # the sampling network (dtype, attention, precision of the config)
    params = models.abstract_params(nnet)
    size, chans = nnet["img_size"], nnet["in_chans"]
    x = jax.ShapeDtypeStruct((batch, size, size, chans), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = Conditioning.from_config(config)
    c = None
    if cond.kind == "text":
        c = jax.ShapeDtypeStruct((batch, *cond.context_shape), jnp.float32)
    elif cond.kind == "class":
        c = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jax.jit(apply).lower(params, x, t, c).compile()
    return flops(compiled) / batch, 2.0 * models.forward_macs(nnet)


def run(config, workdir: str, steps: int = 10, compile_only: bool = False) -> dict:
    """Compile the train step (and, unless `compile_only`, time `steps` of it and a forward); return the figures
    written to WORKDIR/benchmark.json."""
    trainer = make_trainer(config)
    global_batch = config.train.batch_size
    per_device = global_batch // jax.device_count()
    abstract_batch = {k: jax.ShapeDtypeStruct((global_batch, *v.shape[1:]), v.dtype, sharding=trainer.batch_sharding)
                      for k, v in synthetic_batch(config, jax.process_count()).items()}
    lowered = trainer.step_fn.lower(trainer.abstract_with_shardings(), abstract_batch)
    t0 = time.time()
    options = CPU_ESTIMATE_OPTIONS if compile_only and jax.default_backend() == "cpu" else None
    compiled = lowered.compile(compiler_options=options)
    compile_s = time.time() - t0
    xla_fwd, analytic_fwd = forward_flops(config, max(per_device, 1))
    nnet = dict(config.nnet)
    result = {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "dtype": config.dtype,
        "sample_dtype": config.sample.dtype,
        "attention": config.attention, "remat_policy": config.get("remat_policy", None),
        "use_checkpoint": bool(nnet.get("use_checkpoint", False)), "global_batch": global_batch,
        "per_device_batch": per_device, "params": int(models.count_params(nnet)), "compile_s": compile_s,
        "compile_only": compile_only, "cpu_compile_options": options, "host_malloc_tuned": host_malloc.applied,
        **memory(compiled),
        "xla_forward_flops": xla_fwd, "analytic_forward_flops": analytic_fwd,
        "xla_train_step_flops_per_image": flops(compiled) / max(per_device, 1),
        "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    }
    if not compile_only:
        result.update(_timings(config, trainer, compiled, steps))
    if parallel.is_main_process():
        write_result(workdir, result)
    return result


def write_result(workdir: str, result: dict) -> None:
    """`benchmark.json` of the run in `workdir` (atomic), echoed to the console and the log."""
    os.makedirs(workdir, exist_ok=True)
    files.write_json(RunDir(workdir).benchmark, result)
    print(json.dumps(result, indent=2))
    logging.info("benchmark: %s", result)


def _timings(config, trainer: Trainer, compiled, steps: int) -> dict:
    batch = trainer.to_global(synthetic_batch(config, config.train.batch_size))
    state = trainer.init()
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

    # A sampler step costs one network forward (two with guidance); timed at the train batch, so that the
    # benchmark of a CPU config stays short.
    nnet = dict(config.nnet)
    apply = jax.jit(make_apply(config))
    x = batch["moments"][..., :nnet["in_chans"]] if "moments" in batch else batch["image"]
    t = jnp.full((x.shape[0],), 500.0)
    key = Conditioning.from_config(config).batch_key
    cond = batch[key] if key else None
    jax.block_until_ready(apply(state["ema_params"], x, t, cond))
    n_fwd = max(steps // 2, 1)
    t0 = time.time()
    for _ in range(n_fwd):
        out = apply(state["ema_params"], x, t, cond)
    jax.block_until_ready(out)
    fwd_s = (time.time() - t0) / n_fwd
    stats = jax.local_devices()[0].memory_stats() or {}
    peak_bytes = stats.get("peak_bytes_in_use")
    return {"step_s": step_s, "train_images_per_s": images_per_s, "train_tflops_per_s_per_device": tflops,
            "mfu": tflops * 1e12 / peak if peak else None,
            "peak_device_memory_gb": None if peak_bytes is None else peak_bytes / 2 ** 30,
            "forward_s": fwd_s, "forward_images_per_s": x.shape[0] / fwd_s, "loss": float(metrics["loss"])}
