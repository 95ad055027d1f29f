"""Quickstart: a small class-conditional U-ViT on 5000 real MNIST digits bundled in a PyPI package (no download).

    python main.py --config configs/quickstart.py --workdir runs/quickstart

Trains on one CPU in minutes and writes sample grids (one row per digit 0-9) to WORKDIR/grids/. It runs the same
pipeline as the paper configs: TFDS (a local builder prepared into WORKDIR/tfds on first use), the continuous
VP schedule, AdamW + EMA, orbax checkpoints (run the command again to resume) and DPM-Solver grids with CFG.
"""
from uvit_jax.config import base_config


def get_config():
    c = base_config()
    c.dtype = "float32"
    c.train.n_steps = 900
    c.train.batch_size = 64
    c.train.log_interval = 100
    c.train.eval_interval = 450
    c.train.save_interval = 300
    c.optimizer.lr = 1e-3
    c.optimizer.betas = (0.9, 0.99)
    c.optimizer.weight_decay = 0.0
    c.lr_scheduler.warmup_steps = 100
    c.ema_rate = 0.99  # a short run: the EMA must forget the early weights within ~100 steps
    # 11 labels: the digits 0-9 and the null label 10 for classifier-free guidance.
    c.nnet = dict(name="uvit", img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4,
                  mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11, conv=True, skip=True,
                  use_checkpoint=False)
    c.dataset.name = "uvit_digits"
    c.dataset.image_size = 28  # the raw digits: 7x7 patches of 4x4
    c.dataset.random_flip = False  # mirrored digits are not digits
    c.dataset.p_uncond = 0.1
    c.schedule = "vp"
    c.sample.algorithm = "dpm_solver"
    c.sample.method = "fast"
    c.sample.skip_type = "logSNR"
    c.sample.sample_steps = 25
    c.sample.grid_steps = 25
    c.sample.grid_size = 100
    c.sample.cfg = True
    c.sample.scale = 1.0
    c.sample.n_samples = 1000
    c.sample.mini_batch_size = 200
    return c
