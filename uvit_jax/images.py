"""Image conversions shared by grids, sample files and the FID pipeline (one uint8 rounding in the project), and
the grids themselves (plain and captioned)."""
from __future__ import annotations

import importlib.util
import math
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uvit_jax import files


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
    """Tile NHWC uint8 images into one PNG, `ncols` per row (1-channel images are saved as grayscale); written
    atomically."""
    n, h, w, c = images_uint8.shape
    nrows = int(math.ceil(n / ncols))
    grid = np.zeros((nrows * (h + 2) + 2, ncols * (w + 2) + 2, c), np.uint8)
    for i, img in enumerate(images_uint8):
        r, col = divmod(i, ncols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = img
    files.write_atomic(path, Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save)


def _caption_font_file() -> str | None:
    """A TrueType font with accents, dashes and common symbols (DejaVu Sans): matplotlib's copy when it is
    installed, else the system's; None when neither is found."""
    spec = importlib.util.find_spec("matplotlib")  # located, not imported: only its font file is used
    candidates = [os.path.join(p, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
                  for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    return next((c for c in candidates if os.path.exists(c)), None)


def caption_font(size: int = 10) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The captions' font: DejaVu Sans where available (PIL's default font draws non-Latin-1 characters as
    boxes), else PIL's default."""
    path = _caption_font_file()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def captioned_grid(pictures: np.ndarray, captions: list[str], path: str, ncols: int = 4,
                   lines: int = 4) -> list[int]:
    """uint8 NHWC RGB images in a grid, each with its caption (wrapped, at most `lines` lines) below it; written
    atomically. Returns the indices of the captions cut to fit."""
    n, h, w, _ = pictures.shape
    ncols = min(ncols, n)
    font = caption_font()
    cell_w, line_h = max(w, 160), 12
    cell_h = h + lines * line_h + 6
    grid = Image.new("RGB", (ncols * cell_w, math.ceil(n / ncols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    cut = []
    for j, (picture, caption) in enumerate(zip(pictures, captions)):
        r, c = divmod(j, ncols)
        x0, y0 = c * cell_w, r * cell_h
        grid.paste(Image.fromarray(picture), (x0 + (cell_w - w) // 2, y0))
        wrapped = textwrap.wrap(caption, width=max(8, cell_w // 6))
        if len(wrapped) > lines:
            cut.append(j)
        for k, line in enumerate(wrapped[:lines]):
            more = k == lines - 1 and len(wrapped) > lines
            draw.text((x0 + 2, y0 + h + 2 + k * line_h), line + (" ..." if more else ""), fill="black", font=font)
    files.write_atomic(path, grid.save)
    return cut
