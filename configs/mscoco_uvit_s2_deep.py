"""MS-COCO 256 text-to-image, U-ViT-S/2 (Deep) (Table 1; the official README trains it as
configs/mscoco_uvit_small.py with --config.nnet.depth=16). FID 5.48.

Everything else as configs/mscoco_uvit_s2.py: latents (4x32x32, scale 0.23010) + 77 CLIP ViT-L/14 token
embeddings, discrete SD schedule, DPM-Solver++ 50 steps, CFG scale 1.0, 30k samples at evaluation.
"""
import importlib.util
import os

from uvit_jax.models.presets import PRESETS


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mscoco_uvit_s2.py")
    spec = importlib.util.spec_from_file_location("mscoco_uvit_s2", path)
    small = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small)
    c = small.get_config()
    c.nnet = dict(PRESETS["mscoco_uvit_small_deep"])
    return c
