"""The configuration schema: defaults shared by every config file, and validation before anything compiles.

Key names follow the official U-ViT configs where they exist (`seed`, `train.n_steps`, `train.batch_size`,
`optimizer.lr`, `lr_scheduler.warmup_steps`, `nnet.*`, `dataset.*`, `sample.*`), so people who know the official
code feel at home. Each file in configs/ calls `base_config()` and fills in its column of the paper's Table 1.
A config is locked after loading: an unknown `--config.x.y=...` override stops at flag parsing, naming the key.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SCHEDULES = ("vp", "discrete")
SAMPLERS = ("dpm_solver", "dpm_solver_pp", "euler_maruyama_sde", "euler_maruyama_ode")
DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    """Defaults common to every run; config files override what their column of Table 1 sets."""
    c = ml_collections.ConfigDict()
    c.seed = 1234
    c.pred = "noise_pred"
    # Compute dtype of the network (params, optimizer state and EMA are always float32).
    c.dtype = "bfloat16"
    c.ema_rate = 0.9999
    # "vp": continuous VP SDE (beta 0.1 -> 20), network time 999*t; "discrete": Stable-Diffusion betas, time n.
    c.schedule = "vp"

    c.train = ml_collections.ConfigDict()
    c.train.n_steps = 500_000
    c.train.batch_size = 128  # global, over all processes and devices
    c.train.grad_accum_steps = 1  # micro-batches per optimizer step (the global batch is split into them)
    c.train.log_interval = 10
    c.train.eval_interval = 5000  # sample grid from the EMA params
    c.train.save_interval = 50_000
    c.train.fid_interval = 0  # FID-n_samples during training; 0 = off (needs eval.inception_path)
    c.train.fid_n_samples = 10_000
    c.train.max_to_keep = 3

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 2e-4
    c.optimizer.weight_decay = 0.03
    c.optimizer.betas = (0.99, 0.999)
    c.optimizer.eps = 1e-8

    c.lr_scheduler = ml_collections.ConfigDict()
    c.lr_scheduler.name = "customized"  # linear warm-up from 0, then constant (official)
    c.lr_scheduler.warmup_steps = 5000

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1  # >1 shards params and optimizer state over that many devices

    c.nnet = ml_collections.ConfigDict()  # filled by each config: official constructor kwargs + name

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = config_dict.placeholder(str)
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the feature dir for latents
    c.dataset.path = config_dict.placeholder(str)  # latent feature dir (official extract scripts' output)
    c.dataset.image_size = 32
    c.dataset.random_flip = True
    c.dataset.p_uncond = 0.0  # CFG training: condition dropped to the null label / empty context

    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.pretrained_path = config_dict.placeholder(str)
    c.autoencoder.scale_factor = 0.18215

    c.sample = ml_collections.ConfigDict()
    c.sample.algorithm = "dpm_solver"
    c.sample.sample_steps = 50
    c.sample.n_samples = 50_000
    c.sample.mini_batch_size = 500  # global batch per sampling call
    c.sample.cfg = False
    c.sample.scale = 0.0  # eps = (1 + s) eps_c - s eps_u
    # DPM-Solver details (the official runs: "fast" for vp, "fast_grid" for discrete; see configs).
    c.sample.method = "fast"
    c.sample.order = 3
    c.sample.skip_type = "logSNR"
    c.sample.thresholding = False  # DPM-Solver++ only: dynamic thresholding of x0 (pixel space; off officially)
    c.sample.path = config_dict.placeholder(str)  # where sample mode writes; default WORKDIR/samples
    # Sample from a converted official checkpoint (python -m uvit_jax.convert ... --output DIR) instead of the
    # EMA params of WORKDIR's newest checkpoint.
    c.sample.params_dir = config_dict.placeholder(str)
    c.sample.grid_steps = 25  # few-step DPM-Solver for the training-time grids
    c.sample.grid_size = 64

    c.eval = ml_collections.ConfigDict()
    c.eval.inception_path = config_dict.placeholder(str)  # pytorch-fid pt_inception-2015-12-05-6726825d.pth
    c.eval.ref_stats = config_dict.placeholder(str)  # official fid_stats_*.npz or ADM VIRTUAL_*.npz
    c.eval.batch_size = 200
    c.eval.pr_k = 3
    return c


def nnet_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The model's constructor kwargs (plus `name`) as a plain dict."""
    return dict(config.nnet.to_dict())


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raise ValueError naming the offending key for values that would fail later (before any compile)."""
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ValueError(f"config.{key}: {msg} (got {_get(config, key)!r})")

    need(config.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
    need(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(config.pred == "noise_pred", "pred", "only noise prediction is implemented (as in every official config)")
    need(0.0 <= config.ema_rate < 1.0, "ema_rate", "must be in [0, 1)")
    need(config.train.n_steps > 0, "train.n_steps", "must be positive")
    need(config.train.batch_size > 0, "train.batch_size", "must be positive")
    need(config.train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    need(config.train.batch_size % config.train.grad_accum_steps == 0, "train.batch_size",
         f"must be divisible by train.grad_accum_steps={config.train.grad_accum_steps}")
    for key in ("log_interval", "eval_interval", "save_interval"):
        need(config.train[key] > 0, f"train.{key}", "must be positive")
    need(config.optimizer.name == "adamw", "optimizer.name", "only adamw is implemented")
    need(config.optimizer.lr > 0, "optimizer.lr", "must be positive")
    need(len(config.optimizer.betas) == 2 and all(0 <= b < 1 for b in config.optimizer.betas),
         "optimizer.betas", "must be two numbers in [0, 1)")
    need(config.lr_scheduler.name == "customized", "lr_scheduler.name", "only 'customized' (warm-up) is implemented")
    need(config.lr_scheduler.warmup_steps >= 0, "lr_scheduler.warmup_steps", "must be >= 0")
    need(config.sample.algorithm in SAMPLERS, "sample.algorithm", f"must be one of {SAMPLERS}")
    need(config.sample.sample_steps > 0, "sample.sample_steps", "must be positive")
    need(config.sample.scale >= 0, "sample.scale", "must be >= 0")
    need(0.0 <= config.dataset.p_uncond < 1.0, "dataset.p_uncond", "must be in [0, 1)")
    need(config.mesh.fsdp >= 1, "mesh.fsdp", "must be >= 1")
    need("name" in config.nnet and config.nnet.name in ("uvit", "uvit_t2i"), "nnet.name", "must be 'uvit' or 'uvit_t2i'")
    need(config.dataset.name is not None, "dataset.name", "must be set")
    if config.sample.thresholding:
        need(config.sample.algorithm == "dpm_solver_pp", "sample.thresholding", "applies to dpm_solver_pp only")
    if config.sample.algorithm.startswith("euler"):
        need(config.schedule == "vp", "sample.algorithm", "Euler-Maruyama is defined for the vp schedule only")
    if config.sample.cfg or config.dataset.p_uncond > 0:
        need(config.nnet.get("num_classes", 0) > 0 or config.nnet.name == "uvit_t2i", "sample.cfg",
             "classifier-free guidance needs a class- or text-conditional network")
    if device_count is not None:
        micro = config.train.batch_size // config.train.grad_accum_steps
        need(micro % device_count == 0, "train.batch_size",
             f"each micro-batch ({micro}) must split evenly over the {device_count} devices")
        need(device_count % config.mesh.fsdp == 0, "mesh.fsdp", f"must divide the device count {device_count}")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node
