"""ImageNet 64 class-conditional, U-ViT-M/4 (Table 1; official configs/imagenet64_uvit_mid.py). FID 5.85 reported.

1000 classes and no null class (no classifier-free guidance); 50-step DPM-Solver-fast (continuous VP) at evaluation.
"""
from uvit_jax.config import base_config
from uvit_jax.models.presets import PRESETS


def get_config():
    c = base_config()
    c.train.n_steps = 300_000
    c.train.batch_size = 1024
    c.optimizer.lr = 3e-4
    c.optimizer.betas = (0.99, 0.99)
    c.lr_scheduler.warmup_steps = 5000
    # FID-10k of the EMA params at every save, as the official training scripts (needs eval.inception_path).
    c.train.fid_interval = c.train.save_interval
    c.nnet = dict(PRESETS["imagenet64_uvit_mid"])
    c.dataset.name = "imagenet2012"
    c.dataset.image_size = 64
    c.dataset.random_flip = True
    c.schedule = "vp"
    c.sample.algorithm = "dpm_solver"
    c.sample.method = "fast"
    c.sample.order = 3
    c.sample.skip_type = "logSNR"
    c.sample.sample_steps = 50
    c.sample.n_samples = 50_000
    c.sample.label_distribution = "dataset"  # official eval.py: labels from the training-set class frequencies
    c.sample.mini_batch_size = 200
    c.eval.ref_stats = "assets/fid_stats/fid_stats_imagenet64_guided_diffusion.npz"
    return c
