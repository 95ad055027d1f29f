"""MS-COCO 256 text-to-image, U-ViT-S/2 (Deep, depth 16) (Table 1; official configs/mscoco_uvit_small.py with nnet.depth=16). FID 5.48.

Latents (4x32x32, scale 0.23010) + 77 CLIP ViT-L/14 token embeddings; discrete SD schedule, DPM-Solver++ 50 steps,
CFG scale 1.0 against the empty-string context; 30k samples at evaluation.
"""
from uvit_jax.config import base_config


def get_config():
    c = base_config()
    c.train.n_steps = 1_000_000
    c.train.batch_size = 256
    c.optimizer.lr = 2e-4
    c.optimizer.betas = (0.9, 0.9)
    c.lr_scheduler.warmup_steps = 5000
    c.nnet = dict(name="uvit_t2i", img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=16, num_heads=8,
                  mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77, conv=True,
                  skip=True, use_checkpoint=False)
    c.dataset.name = "mscoco_latents"
    c.dataset.path = "assets/datasets/coco256_features"
    c.dataset.image_size = 32
    c.dataset.random_flip = False
    c.dataset.p_uncond = 0.1
    c.autoencoder.pretrained_path = "assets/stable-diffusion/autoencoder_kl.pth"
    c.autoencoder.scale_factor = 0.23010
    c.schedule = "discrete"
    c.sample.algorithm = "dpm_solver_pp"
    c.sample.method = "fast_grid"
    c.sample.order = 3
    c.sample.skip_type = "time_uniform"
    c.sample.sample_steps = 50
    c.sample.n_samples = 30_000
    c.sample.mini_batch_size = 50
    c.sample.cfg = True
    c.sample.scale = 1.0
    c.eval.ref_stats = "assets/fid_stats/fid_stats_mscoco256_val.npz"
    return c
