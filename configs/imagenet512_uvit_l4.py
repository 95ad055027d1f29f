"""ImageNet 512 latent class-conditional, U-ViT-L/4 (Table 1; official configs/imagenet512_uvit_large.py). FID 4.67.

Trained on pre-extracted KL-f8 latent moments (4x64x64); 1000 classes + null class 1000 for CFG.
Schedule "vp" and sampler "dpm_solver" (fast) are what the official README's scripts use for this model
(the official config file alone doesn't say; docs/official_behaviour.md §8 item 5).
CFG scale 0.7 (eps = (1+s) eps_c - s eps_u).
"""
from uvit_jax.config import base_config
from uvit_jax.models.presets import PRESETS


def get_config():
    c = base_config()
    c.train.n_steps = 500_000
    c.train.batch_size = 1024
    c.optimizer.lr = 2e-4
    c.optimizer.betas = (0.99, 0.99)
    c.lr_scheduler.warmup_steps = 5000
    # FID-10k of the EMA params at every save, as the official training scripts (needs eval.inception_path).
    c.train.fid_interval = c.train.save_interval
    c.nnet = dict(PRESETS["imagenet512_uvit_large"])
    c.dataset.name = "imagenet_latents"
    c.dataset.path = "assets/datasets/imagenet512_features"
    c.dataset.p_uncond = 0.15
    c.autoencoder.pretrained_path = "assets/stable-diffusion/autoencoder_kl.pth"
    c.autoencoder.scale_factor = 0.18215
    c.schedule = "vp"
    c.sample.algorithm = "dpm_solver"
    c.sample.method = "fast"
    c.sample.order = 3
    c.sample.skip_type = "logSNR"
    c.sample.sample_steps = 50
    c.sample.n_samples = 50_000
    c.sample.mini_batch_size = 50
    c.sample.cfg = True
    c.sample.scale = 0.7
    c.eval.ref_stats = "assets/fid_stats/fid_stats_imagenet512_guided_diffusion.npz"
    return c
