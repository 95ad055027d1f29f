"""CelebA 64 unconditional, U-ViT-S/4 (official configs/celeba64_uvit_small.py).

A row of the paper's Table 1, built by configs/table1.py (the values, their sources, and the paper's FID there).
"""
from configs.table1 import get_config as table1_row


def get_config():
    return table1_row("celeba64_uvit_s4")
