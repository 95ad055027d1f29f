"""Quickstart: a small class-conditional U-ViT on 5000 real MNIST digits bundled in a PyPI package (no download).

    python main.py --config configs/quickstart.py --workdir runs/quickstart

Trains on a 2-core CPU in under 10 minutes and writes sample grids (column j shows digit j) to WORKDIR/grids/. It
runs the same pipeline as the paper configs: TFDS (the digits are prepared once as the local dataset `uvit_digits`
in the default TFDS data_dir), the continuous VP schedule, AdamW + EMA, orbax checkpoints (run the command again to
resume), and the official pixel-space sampler (Euler-Maruyama reverse SDE) with classifier-free guidance.

To fit the CPU budget the digits are box-downsampled to 16x16 (4x4 patches: 16 tokens) and the network is small;
a U-ViT learns the near-identity map needed at high noise slowly, so many cheap steps beat a few expensive ones.
"""
from uvit_jax.config import base_config


def get_config():
    c = base_config()
    c.dtype = "float32"
    c.train.n_steps = 6000
    c.train.batch_size = 64
    c.train.log_interval = 500
    c.train.eval_interval = 3000
    c.train.save_interval = 1000
    c.optimizer.lr = 1e-3
    c.optimizer.betas = (0.9, 0.99)
    c.optimizer.weight_decay = 0.0
    c.lr_scheduler.warmup_steps = 100
    c.ema_rate = 0.995  # a short run: the EMA must forget the early weights within a few hundred steps
    # 11 labels: the digits 0-9 and the null label 10 for classifier-free guidance.
    c.nnet = dict(name="uvit", img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                  mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11, conv=True, skip=True,
                  use_checkpoint=False)
    c.dataset.name = "uvit_digits"
    c.dataset.image_size = 16  # 28x28 MNIST, box-downsampled
    c.dataset.random_flip = False  # mirrored digits are not digits
    c.dataset.p_uncond = 0.1
    c.schedule = "vp"
    c.sample.algorithm = "euler_maruyama_sde"
    c.sample.sample_steps = 200
    c.sample.grid_steps = 200
    c.sample.grid_size = 100
    c.sample.cfg = True
    c.sample.scale = 2.0
    c.sample.n_samples = 1000
    c.sample.mini_batch_size = 200
    return c
