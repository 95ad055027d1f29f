"""CPU side by side: our train step and sampling step against the official PyTorch U-ViT's, run alternately.

    python benchmarks/cpu_side_by_side.py                                   # ours only (the official side skipped)
    python benchmarks/cpu_side_by_side.py --official_dir ~/U-ViT            # + the official code (needs torch)
    python benchmarks/cpu_side_by_side.py --models s2 --what train --rounds 5 --steps 3

Cases (float32, synthetic data): U-ViT-S/2 (CIFAR-10 preset) at batch 8, and a tiny U-ViT (embed 128, depth 6,
4 heads, patch 4, 32x32) at batch 32. "train" is one optimizer step as the official train.py runs it: the VP
noise-prediction loss (LSimple), backward, AdamW with the warm-up schedule, EMA of every parameter. Ours is the
real `train_step.Trainer` step. "sample" is one network forward (one step of a sampler), no gradient.

Each round times `--steps` steps of one side, then of the other (official first), after one untimed warm-up
step (compilation) per side, so that load on a shared machine falls on both; each row reports the median and
minimum wall time over all timed steps, the median process CPU time (less sensitive to other processes, but
it counts threads that spin while they wait), and official / ours of the median wall time (> 1: ours is
faster). `--official_dir` is a checkout of https://github.com/baofff/U-ViT (it must contain libs/uvit.py); no
official code is part of this repository. Both sides share the process's malloc: by default tuned as main.py tunes
it (uvit_jax/host_malloc.py; the official step gains from it too), `--host_malloc default` for glibc's own.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BATCH = {"s2": 8, "tiny": 32}


def nnet(model: str) -> dict:
    from uvit_jax.models.presets import PRESETS
    base = dict(PRESETS["cifar10_uvit_small"])
    return base if model == "s2" else dict(base, embed_dim=128, depth=6, num_heads=4, patch_size=4)


def config(model: str):
    """configs/cifar10_uvit_s2.py in float32 with the case's network and batch."""
    c = importlib.import_module("configs.cifar10_uvit_s2").get_config()
    c.dtype = "float32"
    c.train.batch_size = BATCH[model]
    c.nnet = nnet(model)
    return c


class Ours:
    """Our jitted train step (Trainer, donated state) and network forward, on one synthetic batch."""

    def __init__(self, model: str, what: str):
        import jax
        import jax.numpy as jnp
        from uvit_jax import models
        from uvit_jax.benchmark import synthetic_batch
        from uvit_jax.train_step import Trainer, compute_dtype
        self.jax, c = jax, config(model)
        if what == "train":
            self.trainer = Trainer(c)
            self.batch = self.trainer.to_global(synthetic_batch(c, c.train.batch_size))
            self.state = self.trainer.init()
        else:
            net = dict(c.nnet)
            self.apply = jax.jit(models.make_apply(net, dtype=compute_dtype(c), attention_impl=c.attention))
            self.params = jax.jit(lambda k: models.init_params(net, k))(jax.random.key(0))
            self.x = jax.random.normal(jax.random.key(1), (BATCH[model], 32, 32, 3))
            self.t = jnp.full((BATCH[model],), 500.0)
        self.what = what

    def step(self) -> None:
        if self.what == "train":
            self.state, metrics = self.trainer.step_fn(self.state, self.batch)
            self.jax.block_until_ready(metrics)
        else:
            self.jax.block_until_ready(self.apply(self.params, self.x, self.t))


class Official:
    """The official network (libs/uvit.py from `official_dir`) under the official train step, written out here:
    t ~ U(0, 1), x_t = sqrt(alpha_t) x0 + sqrt(1 - alpha_t) eps of the VP SDE (beta 0.1 -> 20), loss = mean
    square of (eps - nnet(x_t, 999 t)) per sample, mean over the batch; AdamW(lr 2e-4, betas (0.99, 0.999),
    weight decay 0.03) with the linear warm-up LambdaLR; EMA 0.9999 of every parameter, one by one."""

    def __init__(self, model: str, what: str, official_dir: str):
        import torch
        sys.path.insert(0, official_dir)
        uvit = importlib.import_module("libs.uvit")
        net = {k: v for k, v in nnet(model).items() if k != "name"}
        self.torch, self.what = torch, what
        self.nnet = uvit.UViT(**net)
        self.b = BATCH[model]
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.rand(self.b, 3, 32, 32, generator=gen) * 2 - 1
        if what == "train":
            self.ema = uvit.UViT(**net)
            self.ema.load_state_dict(self.nnet.state_dict())
            self.opt = torch.optim.AdamW(self.nnet.parameters(), lr=2e-4, betas=(0.99, 0.999), weight_decay=0.03)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(s / 2500, 1))
            self.nnet.train()
        else:
            self.nnet.eval()
            self.t = torch.full((self.b,), 500.0)

    def step(self) -> None:
        torch = self.torch
        if self.what == "sample":
            with torch.no_grad():
                self.nnet(self.x0, self.t)
            return
        t = torch.rand(self.b)
        integral = 0.1 * t + (20.0 - 0.1) * t ** 2 * 0.5
        alpha = torch.exp(-integral)
        eps = torch.randn_like(self.x0)
        xt = alpha.sqrt().view(-1, 1, 1, 1) * self.x0 + (1 - alpha).sqrt().view(-1, 1, 1, 1) * eps
        loss = (eps - self.nnet(xt, t * 999)).pow(2).flatten(1).mean(-1)
        self.opt.zero_grad()
        loss.mean().backward()
        self.opt.step()
        self.sched.step()
        src = dict(self.nnet.named_parameters())
        with torch.no_grad():
            for name, p in self.ema.named_parameters():
                p.mul_(0.9999).add_((1 - 0.9999) * src[name])


def timed(runner, steps: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each of `steps` steps."""
    out = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        runner.step()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def official_available(official_dir: str | None) -> str | None:
    """None if the official side can run, else why not."""
    if not official_dir:
        return "no --official_dir given"
    if not os.path.isfile(os.path.join(official_dir, "libs", "uvit.py")):
        return f"{official_dir}/libs/uvit.py not found"
    try:
        importlib.import_module("torch")
    except ImportError:
        return "torch is not importable"
    return None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official_dir", help="checkout of the official U-ViT code (libs/uvit.py; torch importable)")
    p.add_argument("--models", nargs="+", default=["s2", "tiny"], choices=["s2", "tiny"])
    p.add_argument("--what", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    p.add_argument("--rounds", type=int, default=3, help="alternations official / ours")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--host_malloc", choices=["tuned", "default"], default="tuned",
                   help="glibc malloc for the whole process, both sides: as main.py sets it (uvit_jax/host_malloc.py) "
                        "or glibc's defaults")
    args = p.parse_args(argv)
    from uvit_jax import host_malloc
    tuned = args.host_malloc == "tuned" and host_malloc.tune_for_xla_cpu()  # before JAX or torch start threads
    print(f"host malloc: {'tuned as main.py sets it' if tuned else 'glibc defaults'} (both sides)")
    why_not = official_available(args.official_dir)
    if why_not:
        print(f"official side skipped: {why_not}")
    else:
        import torch
        torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        for what in args.what:
            sides = {"ours": Ours(model, what)}
            if not why_not:
                sides = {"official": Official(model, what, args.official_dir), **sides}
            times = {name: [] for name in sides}
            for runner in sides.values():
                runner.step()  # compilation / allocation warm-up
            for _ in range(args.rounds):
                for name, runner in sides.items():
                    times[name] += timed(runner, args.steps)
            row = {"model": model, "what": what, "batch": BATCH[model]}
            for name, ts in times.items():
                wall, cpu = [w for w, _ in ts], [c for _, c in ts]
                row[name] = (statistics.median(wall), min(wall), statistics.median(cpu))
            rows.append(row)
            print_row(row)
            del sides
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores")
    return rows


def print_row(row: dict) -> None:
    name = {"s2": "U-ViT-S/2", "tiny": "tiny U-ViT"}[row["model"]]
    cells = [f"{name} {row['what']}, batch {row['batch']}"]
    for side in ("official", "ours"):
        if side in row:
            med, low, cpu = row[side]
            cells.append(f"{side} {med:.3f} s (min {low:.3f}, CPU {cpu:.3f})")
    if "official" in row:
        cells.append(f"official/ours {row['official'][0] / row['ours'][0]:.2f}x")
    print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
