"""ImageNet 256 latents, class-conditional U-ViT-L/2 (official configs/imagenet256_uvit_large.py).

A row of the paper's Table 1, built by configs/table1.py (the values, their sources, and the paper's FID there).
"""
from configs.table1 import get_config as table1_row


def get_config():
    return table1_row("imagenet256_uvit_l2")
