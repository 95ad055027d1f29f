"""MS-COCO 256 text-to-image, U-ViT-S/2 (Deep): official configs/mscoco_uvit_small.py, depth 16.

A row of the paper's Table 1, built by configs/table1.py (the values, their sources, and the paper's FID there).
"""
from configs.table1 import get_config as table1_row


def get_config():
    return table1_row("mscoco_uvit_s2_deep")
