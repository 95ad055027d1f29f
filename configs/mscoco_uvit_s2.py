"""MS-COCO 256 text-to-image, U-ViT-S/2 (Table 1; official configs/mscoco_uvit_small.py). FID 5.95.

Latents (4x32x32, scale 0.23010) + 77 CLIP ViT-L/14 token embeddings; discrete SD schedule, DPM-Solver++ 50 steps,
CFG scale 1.0 against the empty-string context; 30k samples at evaluation.
"""
from uvit_jax.config import base_config
from uvit_jax.models.presets import PRESETS


def get_config():
    c = base_config()
    c.train.n_steps = 1_000_000
    c.train.batch_size = 256
    c.optimizer.lr = 2e-4
    c.optimizer.betas = (0.9, 0.9)
    c.lr_scheduler.warmup_steps = 5000
    # FID-10k of the EMA params at every save, as the official training scripts (needs eval.inception_path).
    c.train.fid_interval = c.train.save_interval
    c.nnet = dict(PRESETS["mscoco_uvit_small"])
    c.dataset.name = "mscoco_latents"
    c.dataset.path = "assets/datasets/coco256_features"
    c.dataset.p_uncond = 0.1
    c.autoencoder.pretrained_path = "assets/stable-diffusion/autoencoder_kl.pth"
    c.autoencoder.scale_factor = 0.23010
    # The CLIP ViT-L/14 text encoder of Hugging Face's openai/clip-vit-large-patch14 (a snapshot folder or its
    # model.safetensors), for --mode extract and sample.prompts; training reads the extracted contexts.
    c.clip.pretrained_path = "assets/clip-vit-large-patch14"
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
