"""CIFAR-10 unconditional, U-ViT-S/2 (Table 1; official configs/cifar10_uvit_small.py). FID 3.11 reported.

Continuous VP SDE; final evaluation with 1000-step Euler-Maruyama (reverse SDE) on the EMA network.
"""
from uvit_jax.config import base_config
from uvit_jax.models.presets import PRESETS


def get_config():
    c = base_config()
    c.train.n_steps = 500_000
    c.train.batch_size = 128
    c.optimizer.lr = 2e-4
    c.optimizer.betas = (0.99, 0.999)
    c.lr_scheduler.warmup_steps = 2500
    # FID-10k of the EMA params at every save, as the official training scripts (needs eval.inception_path).
    c.train.fid_interval = c.train.save_interval
    c.nnet = dict(PRESETS["cifar10_uvit_small"])
    c.dataset.name = "cifar10"
    c.dataset.image_size = 32
    c.dataset.random_flip = True
    c.schedule = "vp"
    c.sample.algorithm = "euler_maruyama_sde"
    c.sample.sample_steps = 1000
    c.sample.n_samples = 50_000
    c.sample.mini_batch_size = 500
    c.eval.ref_stats = "assets/fid_stats/fid_stats_cifar10_train_pytorch.npz"
    return c
