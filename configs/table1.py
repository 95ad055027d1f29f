"""The paper's Table 1 as one table: the ten configs that reproduce the official U-ViT runs.

    python main.py --config configs/table1.py:imagenet256_uvit_h2 --workdir W    # the same config as
    python main.py --config configs/imagenet256_uvit_h2.py --workdir W

Each row holds what its official config file sets (`configs/<official>.py` of github.com/baofff/U-ViT, named in the
row; the network is the `PRESETS` entry of that name) and what the file leaves to the official README's commands:
which training script, hence which schedule and final sampler (docs/official_behaviour.md §2, §8 item 5). Values
all official configs share are the defaults of `Row` and of `base_config` (seed 1234, AdamW weight decay 0.03, EMA
0.9999, 50,000 samples). Paper FIDs: docs/published_numbers.md.
"""
from typing import NamedTuple

from uvit_jax.config import base_config
from uvit_jax.models.presets import PRESETS


class Row(NamedTuple):
    official: str  # the official config file's name, also its network's PRESETS key
    data: str  # a key of DATA
    steps: int
    sampler: str  # the final sampler, a key of SAMPLERS
    batch: int = 1024
    lr: float = 2e-4
    betas: tuple[float, float] = (0.99, 0.99)
    warmup: int = 5000
    p_uncond: float = 0.0  # classifier-free guidance training: probability of the null condition
    scale: float = 0.0  # guidance scale of the final sampler, eps = (1 + s) eps_c - s eps_u (0: none)
    autoencoder: str | None = None  # latent configs: the decoder's weights, under assets/stable-diffusion/


TABLE_1 = {
    "cifar10_uvit_s2": Row("cifar10_uvit_small", "cifar10", 500_000, "euler_maruyama", batch=128,
                           betas=(0.99, 0.999), warmup=2500),
    "celeba64_uvit_s4": Row("celeba64_uvit_small", "celeba64", 500_000, "euler_maruyama", batch=128),
    "imagenet64_uvit_m4": Row("imagenet64_uvit_mid", "imagenet64", 300_000, "dpm_solver", lr=3e-4),
    "imagenet64_uvit_l4": Row("imagenet64_uvit_large", "imagenet64", 300_000, "dpm_solver", lr=3e-4),
    "imagenet256_uvit_l2": Row("imagenet256_uvit_large", "imagenet256", 300_000, "dpm_solver", p_uncond=0.15,
                               scale=0.4, autoencoder="autoencoder_kl.pth"),
    "imagenet256_uvit_h2": Row("imagenet256_uvit_huge", "imagenet256", 500_000, "dpm_solver_pp", p_uncond=0.1,
                               scale=0.4, autoencoder="autoencoder_kl_ema.pth"),
    "imagenet512_uvit_l4": Row("imagenet512_uvit_large", "imagenet512", 500_000, "dpm_solver", p_uncond=0.15,
                               scale=0.7, autoencoder="autoencoder_kl.pth"),
    "imagenet512_uvit_h4": Row("imagenet512_uvit_huge", "imagenet512", 500_000, "dpm_solver_pp", p_uncond=0.1,
                               scale=0.7, autoencoder="autoencoder_kl_ema.pth"),
    "mscoco_uvit_s2": Row("mscoco_uvit_small", "mscoco", 1_000_000, "dpm_solver_pp", batch=256, betas=(0.9, 0.9),
                          p_uncond=0.1, scale=1.0, autoencoder="autoencoder_kl.pth"),
    # The paper's "U-ViT-S/2 (Deep)": the official README trains it as mscoco_uvit_small.py with nnet.depth=16.
    "mscoco_uvit_s2_deep": Row("mscoco_uvit_small_deep", "mscoco", 1_000_000, "dpm_solver_pp", batch=256,
                               betas=(0.9, 0.9), p_uncond=0.1, scale=1.0, autoencoder="autoencoder_kl.pth"),
}

# Per dataset: config.dataset entries, the official eval script's sample mini-batch, the FID reference statistics
# (under assets/fid_stats/).
DATA = {
    "cifar10": (dict(name="cifar10", image_size=32, random_flip=True), 500, "fid_stats_cifar10_train_pytorch.npz"),
    "celeba64": (dict(name="celeb_a", image_size=64, random_flip=True), 500,
                 "fid_stats_celeba64_train_50000_ddim.npz"),
    "imagenet64": (dict(name="imagenet2012", image_size=64, random_flip=True), 200,
                   "fid_stats_imagenet64_guided_diffusion.npz"),
    "imagenet256": (dict(name="imagenet_latents", path="assets/datasets/imagenet256_features"), 50,
                    "fid_stats_imagenet256_guided_diffusion.npz"),
    # On a TPU v5e chip (16 GiB) the decode of 50 latents to 512x512 images needs 28.3 GiB (XLA:TPU): there, run
    # sampling and FID during training with --config.sample.mini_batch_size=10 (README, "Will it fit on a TPU pod?").
    "imagenet512": (dict(name="imagenet_latents", path="assets/datasets/imagenet512_features"), 50,
                    "fid_stats_imagenet512_guided_diffusion.npz"),
    "mscoco": (dict(name="mscoco_latents", path="assets/datasets/coco256_features"), 50,
               "fid_stats_mscoco256_val.npz"),
}

# The final samplers of the official eval scripts, and the schedule their training script uses.
SAMPLERS = {
    # eval.py on pixels: sde.py's reverse SDE, 1000 steps.
    "euler_maruyama": ("vp", dict(algorithm="euler_maruyama_sde", sample_steps=1000)),
    # eval.py / eval_ldm.py: dpm_solver_pytorch.py, 50 steps of DPM-Solver-fast.
    "dpm_solver": ("vp", dict(algorithm="dpm_solver", method="fast", order=3, skip_type="logSNR", sample_steps=50)),
    # eval_ldm_discrete.py / eval_t2i_discrete.py: dpm_solver_pp.py, 50 steps of its "fast" plan.
    "dpm_solver_pp": ("discrete", dict(algorithm="dpm_solver_pp", method="fast_grid", order=3,
                                       skip_type="time_uniform", sample_steps=50)),
}


def get_config(name: str):
    """The config of row `name` of TABLE_1 (e.g. "imagenet256_uvit_h2")."""
    if name not in TABLE_1:
        raise ValueError(f"configs/table1.py: unknown row {name!r}; one of {sorted(TABLE_1)}")
    row = TABLE_1[name]
    c = base_config()
    c.train.n_steps = row.steps
    c.train.batch_size = row.batch
    c.optimizer.lr = row.lr
    c.optimizer.betas = row.betas
    c.lr_scheduler.warmup_steps = row.warmup
    # FID-10k of the EMA params at every save, as the official training scripts (needs eval.inception_path).
    c.train.fid_interval = c.train.save_interval
    c.nnet = dict(PRESETS[row.official])
    dataset, c.sample.mini_batch_size, ref_stats = DATA[row.data]
    c.dataset.update(dataset)
    c.eval.ref_stats = f"assets/fid_stats/{ref_stats}"
    c.schedule, sampler = SAMPLERS[row.sampler]
    c.sample.update(sampler)
    if row.p_uncond:
        c.dataset.p_uncond = row.p_uncond
    if row.scale:
        c.sample.cfg, c.sample.scale = True, row.scale
    if row.autoencoder:
        c.autoencoder.pretrained_path = f"assets/stable-diffusion/{row.autoencoder}"
        c.autoencoder.scale_factor = 0.18215
    if row.data == "imagenet64":
        c.sample.label_distribution = "dataset"  # official eval.py: labels from the training-set class frequencies
    if row.data == "mscoco":
        c.autoencoder.scale_factor = 0.23010  # the std of COCO's latents, not SD's 0.18215
        # The CLIP ViT-L/14 text encoder of Hugging Face's openai/clip-vit-large-patch14 (a snapshot folder or its
        # model.safetensors), for --mode extract and sample.prompts; training reads the extracted contexts.
        c.clip.pretrained_path = "assets/clip-vit-large-patch14"
        c.sample.n_samples = 30_000  # eval_t2i_discrete.py
    return c
