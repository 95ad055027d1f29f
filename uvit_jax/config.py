"""The configuration schema: defaults shared by every config file, and validation before anything compiles.

Key names follow the official U-ViT configs where they exist (`seed`, `train.n_steps`, `train.batch_size`,
`optimizer.lr`, `lr_scheduler.warmup_steps`, `nnet.*`, `dataset.*`, `sample.*`), so people who know the official
code feel at home. Each config in configs/ starts from `base_config()` (the paper's Table 1 rows in configs/table1.py).
A config is locked after loading: an unknown `--config.x.y=...` override stops at flag parsing, naming the key.
"""
from __future__ import annotations

import math
import os

import ml_collections
from ml_collections import config_dict
from ml_collections.config_flags import config_path

from uvit_jax.dataset_specs import DEFAULT_CACHE_GB, KNOWN_DATASETS, PIXEL_DATASETS, class_count

SCHEDULES = ("vp", "discrete")
SAMPLERS = ("dpm_solver", "dpm_solver_pp", "euler_maruyama_sde", "euler_maruyama_ode")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "xla", "cudnn", "einsum")
# Values one batch array may hold: XLA indexes arrays with 32-bit integers, and a batch past this is a typo
# (1e8 images) that would otherwise abort inside XLA or allocate for minutes.
MAX_BATCH_VALUES = 2 ** 31 - 1
INCEPTION_VALUES = 299 * 299 * 3  # one image as the FID network sees it


def base_config() -> ml_collections.ConfigDict:
    """Defaults common to every run; config files override what their column of Table 1 sets."""
    c = ml_collections.ConfigDict()
    c.seed = 1234
    c.pred = "noise_pred"
    # Compute dtype of the network (params, optimizer state and EMA are always float32).
    c.dtype = "bfloat16"
    # Attention kernel: "auto" picks per backend and dtype; "xla", "cudnn" (GPU, bf16) or "einsum" force one.
    c.attention = "auto"
    # Rematerialisation: None follows nnet.use_checkpoint (the official flag: "block"); "none", "block", "dots".
    c.remat_policy = config_dict.placeholder(str)
    # Which parts of the network stay float32 when `dtype` is bfloat16 (uvit_jax/models/layers.py Precision):
    # residual "float32" | "until_skip" (the official fp16-autocast runs) | "compute"; attention "float32" |
    # "compute"; final_layer "float32" | "compute". LayerNorm statistics and the softmax are float32 always.
    c.precision = ml_collections.ConfigDict()
    c.precision.residual = "float32"
    c.precision.attention = "compute"
    c.precision.final_layer = "float32"
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
    c.train.profile_steps = 0  # >0: capture a profiler trace of this many steps (after the first log interval)

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
    c.mesh.expect_devices = 0  # >0: stop unless the run sees exactly this many devices (set by the launch scripts)

    c.nnet = ml_collections.ConfigDict()  # filled by each config: official constructor kwargs + name

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = config_dict.placeholder(str)
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the feature dir for latents
    c.dataset.path = config_dict.placeholder(str)  # latent feature dir (official extract scripts' or --mode extract's)
    # Pixel datasets: None takes the dataset's own default (uvit_jax/dataset_specs.py PIXEL_DATASETS).
    c.dataset.image_size = config_dict.placeholder(int)
    c.dataset.random_flip = config_dict.placeholder(bool)
    c.dataset.cache_gb = DEFAULT_CACHE_GB  # keep decoded pixel splits up to this size in memory (0: never)
    c.dataset.p_uncond = 0.0  # CFG training: condition dropped to the null label / empty context

    c.autoencoder = ml_collections.ConfigDict()
    # The official autoencoder_kl.pth / autoencoder_kl_ema.pth, or a diffusers diffusion_pytorch_model.safetensors.
    c.autoencoder.pretrained_path = config_dict.placeholder(str)
    c.autoencoder.scale_factor = 0.18215
    # The SD KL-f8 network (= uvit_jax.models.autoencoder.KL_F8_DDCONFIG, KL_F8_EMBED_DIM); tests shrink it.
    c.autoencoder.ddconfig = ml_collections.ConfigDict(dict(
        double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4),
        num_res_blocks=2, attn_resolutions=(), dropout=0.0))
    c.autoencoder.embed_dim = 4

    c.clip = ml_collections.ConfigDict()
    # Hugging Face openai/clip-vit-large-patch14: model.safetensors, pytorch_model.bin or the snapshot dir (a
    # config.json beside the weights gives the text tower's size; without one it is ViT-L/14's).
    c.clip.pretrained_path = config_dict.placeholder(str)

    # --mode extract: raw images (+ captions) -> autoencoder moments (+ CLIP contexts) for the latent configs.
    c.extract = ml_collections.ConfigDict()
    c.extract.source = "tfds"  # "tfds" (imagenet2012 / coco_captions) or a folder (ImageNet train dir, COCO root)
    c.extract.data_dir = config_dict.placeholder(str)  # TFDS data_dir for source "tfds" (None: TFDS default)
    c.extract.split = config_dict.placeholder(str)  # comma list; None: ImageNet "train", MS-COCO "train,val"
    c.extract.resolution = config_dict.placeholder(int)  # None: nnet.img_size x the autoencoder's downsampling
    c.extract.output = config_dict.placeholder(str)  # None: WORKDIR/features
    c.extract.batch_size = 64  # global images (and captions) per encoder call
    c.extract.shard_size = 256  # source images per shard: the unit written atomically and resumed
    c.extract.log_interval = 10  # shards between progress lines

    c.sample = ml_collections.ConfigDict()
    c.sample.algorithm = "dpm_solver"
    # Compute dtype of the network while sampling (grids, sample mode, FID): float32 unless measured otherwise.
    c.sample.dtype = "float32"
    c.sample.sample_steps = 50
    c.sample.n_samples = 50_000
    # Images per device per sampling call (sample mode, FID, grids, prompts), as the official sample2dir's
    # mini_batch_size is per process (one GPU each): a call draws mini_batch_size x device count images, or fewer
    # when fewer are asked for (then padded only to the device count).
    c.sample.mini_batch_size = 500
    c.sample.cfg = False
    c.sample.scale = 0.0  # eps = (1 + s) eps_c - s eps_u
    # DPM-Solver details (the official runs: "fast" for vp, "fast_grid" for discrete; see configs).
    c.sample.method = "fast"
    c.sample.order = 3
    c.sample.skip_type = "logSNR"
    c.sample.thresholding = False  # DPM-Solver++ only: dynamic thresholding of x0 (pixel space; off officially)
    c.sample.path = config_dict.placeholder(str)  # where sample mode writes; default WORKDIR/samples
    # A samples dir holding samples of other settings (checkpoint, seed, n_samples, batch, sampler) is refused;
    # True sets it aside as PATH.old-<n> and starts again.
    c.sample.restart = False
    # Sample from a converted official checkpoint (main.py --mode convert writes WORKDIR/converted) instead of the
    # EMA params of WORKDIR's newest checkpoint.
    c.sample.params_dir = config_dict.placeholder(str)
    # Which checkpoint of the workdir sample mode uses: "best" (lowest FID during training, W/eval/best.json; the
    # newest when no FID was computed), "latest", or a step number such as "250000".
    c.sample.step = "best"
    c.sample.random_params = False  # timing only (benchmarks): sample from freshly initialised weights
    # Class labels of samples: "uniform" over the real classes, or "dataset" (the training set's class
    # frequencies, as the official ImageNet-64 evaluation draws them).
    c.sample.label_distribution = "uniform"
    c.sample.grid_steps = 25  # few-step DPM-Solver for the training-time grids
    c.sample.grid_size = 64  # images in the training grids and in sample mode's grid.png
    # Text-to-image: a file of prompts (one a line) -> one image per prompt + a captioned grid, instead of the
    # n_samples validation-caption samples.
    c.sample.prompts = config_dict.placeholder(str)

    c.eval = ml_collections.ConfigDict()
    c.eval.inception_path = config_dict.placeholder(str)  # pytorch-fid pt_inception-2015-12-05-6726825d.pth
    # Another feature network instead of Inception: "module:function" returning a feature_fn (see evaluate.py).
    c.eval.feature_fn = config_dict.placeholder(str)
    c.eval.ref_stats = config_dict.placeholder(str)  # official fid_stats_*.npz or ADM VIRTUAL_*.npz
    c.eval.batch_size = 200
    c.eval.pr_k = 3
    return c


class ConfigError(ValueError):
    """A config value that would fail later; the message names the key, the value and what is allowed."""


def validate(config: ml_collections.ConfigDict, device_count: int | None = None, workdir: str | None = None) -> None:
    """Raise ConfigError naming the offending key for values that would fail later (before JAX starts when
    `device_count` is None; the device-dependent checks run when it is given). `workdir` is checked writable."""
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config.{key}: {msg} (got {config_path.get_value(key, config)!r})")

    need(config.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
    need(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(config.attention in ATTENTION, "attention", f"must be one of {ATTENTION}")
    need(config.sample.dtype in DTYPES, "sample.dtype", f"must be one of {DTYPES}")
    need(config.remat_policy in (None, "none", "block", "dots"), "remat_policy",
         "must be 'none', 'block', 'dots' or unset (follows nnet.use_checkpoint)")
    need(config.precision.residual in ("float32", "until_skip", "compute"), "precision.residual",
         "must be 'float32', 'until_skip' or 'compute'")
    for part in ("attention", "final_layer"):
        need(config.precision[part] in ("float32", "compute"), f"precision.{part}", "must be 'float32' or 'compute'")
    if config.precision.attention == "float32":
        need(config.attention != "cudnn", "attention", "cuDNN flash attention needs bf16/fp16 inputs; "
             "precision.attention='float32' casts q, k, v to float32")
    need(config.pred == "noise_pred", "pred", "only noise prediction is implemented (as in every official config)")
    need(isinstance(config.seed, int) and 0 <= config.seed < 2 ** 63, "seed", "must be an integer in [0, 2^63)")
    need(0.0 <= config.ema_rate < 1.0, "ema_rate", "must be in [0, 1)")
    need(config.train.n_steps > 0, "train.n_steps", "must be positive")
    need(config.train.batch_size > 0, "train.batch_size", "must be positive")
    _validate_batch_sizes(config, need)
    need(config.train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    need(config.train.batch_size % config.train.grad_accum_steps == 0, "train.batch_size",
         f"must be divisible by train.grad_accum_steps={config.train.grad_accum_steps}")
    for key in ("log_interval", "eval_interval", "save_interval", "max_to_keep"):
        need(config.train[key] > 0, f"train.{key}", "must be positive")
    need(config.train.fid_interval >= 0, "train.fid_interval", "must be >= 0 (0 = off)")
    need(config.train.fid_interval % config.train.save_interval == 0, "train.fid_interval",
         f"must be a multiple of train.save_interval={config.train.save_interval} (FID is computed at saves, so "
         "the best checkpoint exists on disk)")
    need(config.train.profile_steps >= 0, "train.profile_steps", "must be >= 0")
    need(config.optimizer.name == "adamw", "optimizer.name", "only adamw is implemented")
    need(0 < config.optimizer.lr <= 1, "optimizer.lr", "must be in (0, 1] (the paper's runs use 1e-4 to 2e-4)")
    need(_finite(config.optimizer.weight_decay) and config.optimizer.weight_decay >= 0, "optimizer.weight_decay",
         "must be a finite number >= 0")
    need(_finite(config.optimizer.eps) and config.optimizer.eps > 0, "optimizer.eps", "must be a finite number > 0")
    need(len(config.optimizer.betas) == 2 and all(0 <= b < 1 for b in config.optimizer.betas),
         "optimizer.betas", "must be two numbers in [0, 1)")
    need(config.lr_scheduler.name == "customized", "lr_scheduler.name", "only 'customized' (warm-up) is implemented")
    need(config.lr_scheduler.warmup_steps >= 0, "lr_scheduler.warmup_steps", "must be >= 0")
    need(config.sample.algorithm in SAMPLERS, "sample.algorithm", f"must be one of {SAMPLERS}")
    need(config.sample.sample_steps > 0, "sample.sample_steps", "must be positive")
    need(_finite(config.sample.scale) and config.sample.scale >= 0, "sample.scale", "must be a finite number >= 0")
    need(config.sample.grid_size > 0, "sample.grid_size", "must be positive")
    need(config.sample.grid_steps > 0, "sample.grid_steps", "must be positive")
    need(config.eval.pr_k >= 1, "eval.pr_k", "must be >= 1 (the k of the k-NN radii of precision/recall)")
    need(config.sample.label_distribution in ("uniform", "dataset"), "sample.label_distribution",
         "must be 'uniform' or 'dataset'")
    need(config.sample.step in ("best", "latest") or config.sample.step.isdigit(), "sample.step",
         "must be 'best', 'latest' or a step number")
    need(0.0 <= config.dataset.p_uncond < 1.0, "dataset.p_uncond", "must be in [0, 1)")
    need(config.dataset.cache_gb >= 0, "dataset.cache_gb", "must be >= 0 (0: never keep decoded images)")
    need(config.mesh.fsdp >= 1, "mesh.fsdp", "must be >= 1")
    for key in ("batch_size", "shard_size", "log_interval"):
        need(config.extract[key] > 0, f"extract.{key}", "must be positive")
    if config.extract.split:
        need(set(config.extract.split.split(",")) <= {"train", "val"}, "extract.split",
             "must be 'train', 'val' or 'train,val'")
    if config.sample.prompts:
        need(config.nnet.get("name") == "uvit_t2i", "sample.prompts", "needs a text-to-image network (uvit_t2i)")
        _check_prompts_file(config.sample.prompts)
    need(config.mesh.expect_devices >= 0, "mesh.expect_devices", "must be >= 0 (0 = no check)")
    need("name" in config.nnet and config.nnet.name in ("uvit", "uvit_t2i"), "nnet.name",
         "must be 'uvit' or 'uvit_t2i'")
    need(config.dataset.name in KNOWN_DATASETS, "dataset.name", f"must be one of {sorted(KNOWN_DATASETS)}")
    _validate_image_size(config, need)
    _validate_conditioning(config, need)
    if config.sample.thresholding:
        need(config.sample.algorithm == "dpm_solver_pp", "sample.thresholding", "applies to dpm_solver_pp only")
    if config.sample.algorithm.startswith("euler"):
        need(config.schedule == "vp", "sample.algorithm", "Euler-Maruyama is defined for the vp schedule only")
    if workdir is not None:
        _check_writable(workdir)
    if device_count is not None:
        micro = config.train.batch_size // config.train.grad_accum_steps
        need(micro % device_count == 0, "train.batch_size",
             f"each micro-batch ({micro}) must split evenly over the {device_count} devices")
        need(device_count % config.mesh.fsdp == 0, "mesh.fsdp", f"must divide the device count {device_count}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _validate_batch_sizes(config, need) -> None:
    """Every batch positive, and small enough for one array (MAX_BATCH_VALUES): train, sample, eval, extract."""
    nnet_values = int(config.nnet.get("img_size", 1)) ** 2 * int(config.nnet.get("in_chans", 1))
    for key, values in (("train.batch_size", nnet_values), ("sample.mini_batch_size", nnet_values),
                        ("eval.batch_size", INCEPTION_VALUES), ("sample.n_samples", 1), ("train.fid_n_samples", 1)):
        n = config_path.get_value(key, config)
        need(n > 0, key, "must be positive")
        need(n * values <= MAX_BATCH_VALUES, key,
             f"must be at most {MAX_BATCH_VALUES // values:,}" + (f" ({values:,} values an image, 2^31 in one array)"
                                                                  if values > 1 else ""))


def _validate_image_size(config, need) -> None:
    """A pixel dataset's images must be the network's: same side (dataset.image_size, or the dataset's default)
    and channels; caught here instead of in the first traced step."""
    side = config.dataset.image_size
    if side is not None:
        need(side > 0, "dataset.image_size", "must be positive (or unset: the dataset's default)")
    spec = PIXEL_DATASETS.get(config.dataset.name)
    if spec is None or "img_size" not in config.nnet:
        return
    side = spec.default_size if side is None else side
    need(side == config.nnet.img_size, "dataset.image_size",
         f"must equal nnet.img_size={config.nnet.img_size} (unset: {config.dataset.name}'s default "
         f"{spec.default_size})")
    need(config.nnet.get("in_chans") == spec.channels, "nnet.in_chans",
         f"must be {spec.channels}, the channels of {config.dataset.name}")


def _check_prompts_file(path: str) -> None:
    if "://" in path:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"config.sample.prompts: {path} is {'a directory' if os.path.isdir(path) else 'missing'}; "
                          "give a text file, one prompt a line")
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config.sample.prompts: {path} is not UTF-8 text (byte {e.start}): save it as "
                          "UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config.sample.prompts: cannot read {path}: {e.strerror}") from None


def _validate_conditioning(config, need) -> None:
    """The network's condition must fit the dataset: a class model trained with condition drop reserves a null
    label after the real classes (num_classes = K + 1), else the last real class would silently become it."""
    text = config.nnet.name == "uvit_t2i"
    k_net = int(config.nnet.get("num_classes", -1)) if not text else 0
    k_data = class_count(config.dataset.name)
    if text:
        need(config.dataset.name == "mscoco_latents", "dataset.name", "a text-conditional network trains on "
             "mscoco_latents")
    elif k_net > 0:
        need(k_data > 0, "nnet.num_classes", f"dataset {config.dataset.name} has no class labels; use -1 "
             "(unconditional)")
        want = k_data + 1 if config.dataset.p_uncond > 0 else k_data
        need(k_net == want, "nnet.num_classes",
             f"must be {want} for {k_data} classes of {config.dataset.name}"
             + (" plus the null label of classifier-free guidance (dataset.p_uncond > 0)"
                if config.dataset.p_uncond > 0 else " (no condition drop: no null label)"))
    if config.sample.cfg or config.dataset.p_uncond > 0:
        need(text or k_net > 0, "sample.cfg", "classifier-free guidance needs a class- or text-conditional network")
    if config.sample.cfg and config.sample.scale > 0:
        need(config.dataset.p_uncond > 0, "sample.cfg", "guidance needs a network trained with condition drop "
             "(dataset.p_uncond > 0): it has no null condition otherwise")


def _check_writable(workdir: str) -> None:
    """A local workdir must be creatable and writable (object stores such as gs:// are checked at the first save)."""
    if workdir.startswith("file://"):
        raise ConfigError(f"--workdir {workdir}: give a local directory as a plain path ({workdir[len('file://'):]}), "
                          "not a file:// URL")
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: {path} is not a writable directory")
