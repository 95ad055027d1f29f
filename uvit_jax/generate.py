"""The configured sampler around a network: noise -> images in one jitted call, with classifier-free guidance.

Used by the training loop (periodic grids) and by sample mode. The network enters as
`apply(params, x, net_time, cond)`; the sampler sees `eps_fn(x, t)` in its own continuous time t and the schedule
maps t to the network's time input (999 t for vp, 1000 t for discrete), as the official samplers do.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from PIL import Image

from uvit_jax import diffusion


def make_schedule(name: str):
    """The noise schedule a config names ("vp" or "discrete")."""
    if name == "vp":
        return diffusion.VPSchedule()
    if name == "discrete":
        return diffusion.DiscreteSchedule()
    raise ValueError(f"unknown schedule {name!r}: expected 'vp' or 'discrete'")


def null_condition(nnet: dict, null_context: np.ndarray | None = None):
    """The "unconditional" input: the last class index for CFG class models, the empty-text context for t2i."""
    if nnet["name"] == "uvit_t2i":
        if null_context is None:
            raise ValueError("a text-conditional model needs the empty-string context (empty_context.npy) for CFG")
        return jnp.asarray(null_context)
    return nnet["num_classes"] - 1


def num_real_classes(nnet: dict, cfg_trained: bool) -> int:
    """Classes to draw labels from: a CFG-trained class model reserves its last embedding for the null label."""
    k = int(nnet.get("num_classes", 0))
    if nnet["name"] != "uvit" or k <= 0:
        return 0
    return k - 1 if cfg_trained else k


def make_generate_fn(apply: Callable, schedule, *, algorithm: str, steps: int, image_shape: tuple[int, ...],
                     method: str = "fast", order: int = 3, skip_type: str = "logSNR", scale: float = 0.0,
                     null_cond: Any = None, thresholding: bool = False) -> Callable:
    """Returns `generate(params, key, cond, batch_size) -> x_0` (NHWC, model space, not clipped); jit it.

    `cond` is the per-sample labels / contexts (None for unconditional models). With scale > 0, eps is
    (1+s) eps_c - s eps_u in one batched forward pass (diffusion.cfg).
    """
    def net(params, x, net_time, cond):
        return apply(params, x, net_time, cond).astype(jnp.float32)  # the solver runs in float32

    def generate(params, key, cond, batch_size: int):
        noise_key, sde_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (batch_size, *image_shape), jnp.float32)
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


def make_generate_from_config(config, apply: Callable, *, image_shape: tuple[int, ...], steps: int | None = None,
                              null_context: np.ndarray | None = None) -> Callable:
    """`make_generate_fn` with the config's sampler, steps, guidance and null condition."""
    nnet = dict(config.nnet)
    use_cfg = bool(config.sample.cfg) and config.sample.scale > 0
    return make_generate_fn(
        apply, make_schedule(config.schedule), algorithm=config.sample.algorithm,
        steps=steps or config.sample.sample_steps, image_shape=image_shape, method=config.sample.method,
        order=config.sample.order, skip_type=config.sample.skip_type, thresholding=config.sample.thresholding,
        scale=config.sample.scale if use_cfg else 0.0,
        null_cond=null_condition(nnet, null_context) if use_cfg else None)


def padded_size(n: int) -> int:
    """The smallest batch >= n that splits evenly over all devices."""
    d = jax.device_count()
    return int(math.ceil(n / d) * d)


def to_uint8(x) -> np.ndarray:
    """Model-space images in [-1, 1] -> uint8, rounding like torchvision's save_image (x*255 + 0.5, clamped)."""
    x = (np.asarray(x, np.float32) + 1.0) / 2.0
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def save_grid(images_uint8: np.ndarray, path: str, ncols: int) -> None:
    """Tile NHWC uint8 images into one PNG, `ncols` per row (1-channel images are saved as grayscale)."""
    n, h, w, c = images_uint8.shape
    nrows = int(math.ceil(n / ncols))
    grid = np.zeros((nrows * (h + 2) + 2, ncols * (w + 2) + 2, c), np.uint8)
    for i, img in enumerate(images_uint8):
        r, col = divmod(i, ncols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save(path)


def gather_to_host(x) -> np.ndarray:
    """A global (possibly multi-process) array as one numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def grid_labels(n: int, num_classes: int) -> np.ndarray:
    """Labels for a grid: column j shows class j (mod num_classes)."""
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)

