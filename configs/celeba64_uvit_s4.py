"""CelebA 64 unconditional, U-ViT-S/4 (Table 1; official configs/celeba64_uvit_small.py). FID 2.87 reported.

Official crop box (top 57, left 25, 128x128) -> 64, flips always on; 1000-step Euler-Maruyama SDE at evaluation.
"""
from uvit_jax.config import base_config
from uvit_jax.models.presets import PRESETS


def get_config():
    c = base_config()
    c.train.n_steps = 500_000
    c.train.batch_size = 128
    c.optimizer.lr = 2e-4
    c.optimizer.betas = (0.99, 0.99)
    c.lr_scheduler.warmup_steps = 5000
    # FID-10k of the EMA params at every save, as the official training scripts (needs eval.inception_path).
    c.train.fid_interval = c.train.save_interval
    c.nnet = dict(PRESETS["celeba64_uvit_small"])
    c.dataset.name = "celeb_a"
    c.dataset.image_size = 64
    c.dataset.random_flip = True
    c.schedule = "vp"
    c.sample.algorithm = "euler_maruyama_sde"
    c.sample.sample_steps = 1000
    c.sample.n_samples = 50_000
    c.sample.mini_batch_size = 500
    c.eval.ref_stats = "assets/fid_stats/fid_stats_celeba64_train_50000_ddim.npz"
    return c
