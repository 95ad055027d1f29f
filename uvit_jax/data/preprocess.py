"""Per-example image preprocessing of the official pipelines (docs/official_behaviour.md §6.1), in numpy + PIL, NHWC.

Geometry works on uint8 HWC arrays; `to_float` maps to [-1, 1] last. Randomness is not drawn here: callers pass
the decision (e.g. `flip`), derived from (seed, example position) by `example_bits`, so results are reproducible.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# CelebA: the official 128x128 box centred at (row 121, column 89) of the 218x178 aligned image.
CELEBA_TOP, CELEBA_LEFT, CELEBA_CROP = 57, 25, 128

_M64 = (1 << 64) - 1


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as the official pipelines)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a bijection that scatters bits (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def example_bits(seed: int, stream: int, values: np.ndarray) -> np.ndarray:
    """64 pseudo-random bits per entry of `values`, a pure function of (seed, stream, value).

    Distinct values give distinct bits (the map is a bijection of the value for fixed seed and stream). Pure
    integer arithmetic, so identical on every machine and numpy version: this is what makes flips, caption
    choices and shuffles reproducible after a resume.
    """
    key = _mix64(np.array([seed & _M64], np.uint64))
    key = _mix64(key ^ np.array([stream & _M64], np.uint64))
    return _mix64(key ^ np.asarray(values).astype(np.uint64))


def flip_bits(bits: np.ndarray) -> np.ndarray:
    """Horizontal-flip decisions (probability 1/2) from `example_bits`."""
    return (bits & np.uint64(1)).astype(bool)


def caption_index(bits: np.ndarray, n_captions: np.ndarray) -> np.ndarray:
    """Which caption of each image an access uses: `bits % n_captions`, uniform over the image's captions (the
    official MS-COCO loader draws one at random per access), from the access's `example_bits`."""
    return (np.asarray(bits, np.uint64) % np.asarray(n_captions).astype(np.uint64)).astype(np.int64)


def pad_to(image: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Centre an HWC image on a `size`x`size` canvas filled with `value` (digits: 28 -> 32, black = -1)."""
    h, w = image.shape[:2]
    if size < h or size < w or (size - h) % 2 or (size - w) % 2:
        raise ValueError(f"pad_to: cannot centre a {h}x{w} image on {size}x{size} (needs an even, >= 0 margin)")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.full((size, size) + image.shape[2:], value, image.dtype)
    out[top:top + h, left:left + w] = image
    return out


def box_downsample(image: np.ndarray, size: int) -> np.ndarray:
    """Shrink an HWC uint8 image to `size`x`size` with PIL's box (area-average) filter (digits below 28)."""
    return _array(_pil(image).resize((size, size), Image.BOX), image.shape[-1])


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(pil: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(pil)
    return arr[..., None] if arr.ndim == 2 else arr[..., :channels]


def celeba_crop_resize(image: np.ndarray, size: int = 64) -> np.ndarray:
    """Official CelebA geometry: crop rows 57:185, columns 25:153 (128x128), then PIL bilinear resize to `size`.

    PIL's bilinear filter widens with the reduction factor, i.e. it is antialiased (torchvision `Resize` on a PIL
    image does exactly this).
    """
    h, w = image.shape[:2]
    if h < CELEBA_TOP + CELEBA_CROP or w < CELEBA_LEFT + CELEBA_CROP:
        raise ValueError(f"celeba_crop_resize: image {h}x{w} is smaller than the 218x178 aligned CelebA images")
    crop = image[CELEBA_TOP:CELEBA_TOP + CELEBA_CROP, CELEBA_LEFT:CELEBA_LEFT + CELEBA_CROP]
    if size == CELEBA_CROP:
        return np.ascontiguousarray(crop)
    return _array(_pil(crop).resize((size, size), resample=Image.BILINEAR), image.shape[-1])


def center_crop_arr(image: np.ndarray, size: int) -> np.ndarray:
    """ADM/official ImageNet geometry: halve with a BOX filter while the short side is >= 2*size, BICUBIC-resize so
    the short side is `size` (each side rounded), then take the central `size`x`size` crop (offsets floored)."""
    pil = _pil(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = _array(pil, image.shape[-1])
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def center_square_lanczos(image: np.ndarray, size: int) -> np.ndarray:
    """Official MS-COCO geometry (datasets.py `center_crop`): the central min(h, w) square, Lanczos-resized to
    `size` x `size`."""
    h, w = image.shape[:2]
    side = min(h, w)
    crop = image[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))
