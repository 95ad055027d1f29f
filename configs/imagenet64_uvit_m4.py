"""ImageNet 64 class-conditional, U-ViT-M/4 (official configs/imagenet64_uvit_mid.py).

A row of the paper's Table 1, built by configs/table1.py (the values, their sources, and the paper's FID there).
"""
from configs.table1 import get_config as table1_row


def get_config():
    return table1_row("imagenet64_uvit_m4")
