"""Per-device memory and FLOPs of the paper configs on N devices, from compile-only benchmarks (no accelerator).

    python benchmarks/memory_table.py                          # S/2, M/4, L/2, H/2 on 8 devices, the default rows
    python benchmarks/memory_table.py --configs imagenet256_uvit_l2 --remat block --fsdp 1 8

Each row runs `main.py --mode benchmark --benchmark_compile_only` in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N (N CPU devices stand in for the accelerators, so the compiled
train step is the SPMD program of one device of an N-device run) at the config's own global batch (the paper's),
bf16, and prints one markdown table: XLA's per-device memory estimate (arguments = params, EMA and AdamW state;
temporaries = activations kept for the backward pass, gradients and the recomputation) and the train step's FLOPs
per image over 3x the analytic forward (the remat overhead). CPU estimates are upper bounds for a GPU: XLA:CPU
computes bf16 matmuls in float32 and materialises the attention scores that cuDNN's fused kernel never stores
(see uvit_jax/benchmark.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ["cifar10_uvit_s2", "imagenet64_uvit_m4", "imagenet256_uvit_l2", "imagenet256_uvit_h2"]


def compile_only(config: str, devices: int, remat: str, fsdp: int, workdir: str, batch: int | None) -> dict:
    """benchmark.json of one compile-only run in a fresh process (XLA_FLAGS must be set before JAX starts)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode", "benchmark", "--benchmark_compile_only",
           "--config", os.path.join(REPO, "configs", f"{config}.py"), "--workdir", workdir,
           "--config.dtype=bfloat16", f"--config.remat_policy={remat}", f"--config.mesh.fsdp={fsdp}"]
    if batch:
        cmd.append(f"--config.train.batch_size={batch}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "benchmark.json")) as f:
        return json.load(f)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="names under configs/")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--remat", nargs="+", default=["block"], choices=["none", "dots", "block"])
    p.add_argument("--fsdp", nargs="+", type=int, default=[1, 8], help="parameter-sharding degrees to compare")
    p.add_argument("--batch", type=int, help="global batch (default: the config's, the paper's)")
    args = p.parse_args(argv)
    rows = []
    print("| config | global batch | per device | remat | fsdp | arguments GiB | temporaries GiB | "
          "estimate GiB | train FLOPs / 3x forward | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        for remat in args.remat:
            for fsdp in args.fsdp:
                with tempfile.TemporaryDirectory() as workdir:
                    t0 = time.time()
                    r = compile_only(config, args.devices, remat, fsdp, workdir, args.batch)
                overhead = r["xla_train_step_flops_per_image"] / (3 * r["analytic_forward_flops"])
                rows.append(dict(r, config=config, fsdp=fsdp, wall_s=time.time() - t0))
                print(f"| {config} | {r['global_batch']} | {r['per_device_batch']} | {remat} | {fsdp} | "
                      f"{r['argument_gb']:.2f} | {r['temp_gb']:.2f} | {r['memory_estimate_gb']:.2f} | "
                      f"{overhead:.2f} | {r['compile_s']:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
