"""A tiny config for tests and smoke runs: a few seconds per step on CPU. Not a paper setting."""
from uvit_jax.config import base_config


def get_config():
    c = base_config()
    c.dtype = "float32"
    c.train.n_steps = 6
    c.train.batch_size = 16
    c.train.log_interval = 2
    c.train.eval_interval = 6
    c.train.save_interval = 2
    c.optimizer.lr = 1e-3
    c.lr_scheduler.warmup_steps = 2
    c.nnet = dict(name="uvit", img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                  mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11, conv=True, skip=True,
                  use_checkpoint=False)
    c.dataset.name = "uvit_digits"
    c.dataset.image_size = 32
    c.dataset.random_flip = False
    c.dataset.p_uncond = 0.1
    c.schedule = "vp"
    c.sample.algorithm = "dpm_solver"
    c.sample.sample_steps = 4
    c.sample.grid_steps = 4
    c.sample.grid_size = 16
    c.sample.cfg = True
    c.sample.scale = 1.0
    c.sample.n_samples = 24
    c.sample.mini_batch_size = 2  # per device: 16 on the 8 test devices
    c.eval.batch_size = 16
    return c
