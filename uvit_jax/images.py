"""Image conversions shared by grids, sample files and the FID pipeline (one uint8 rounding in the project)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
    """Model-space images in [-1, 1] -> uint8, rounding like torchvision's save_image: floor(255 (x+1)/2 + 0.5),
    clamped. This is the official PNG round trip that its FIDs were computed on. uint8 input passes through."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected uint8 or float images in [-1, 1], got dtype {x.dtype}")
    return np.clip(np.floor((x.astype(np.float32) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def save_grid(images_uint8: np.ndarray, path: str, ncols: int) -> None:
    """Tile NHWC uint8 images into one PNG, `ncols` per row (1-channel images are saved as grayscale)."""
    n, h, w, c = images_uint8.shape
    nrows = int(math.ceil(n / ncols))
    grid = np.zeros((nrows * (h + 2) + 2, ncols * (w + 2) + 2, c), np.uint8)
    for i, img in enumerate(images_uint8):
        r, col = divmod(i, ncols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save(path)
