"""Decode and augmentation maths, numpy + PIL only (testable without Ray).

Images are HWC uint8 arrays. Two training recipes:

- "paper" (Krizhevsky et al. 2012, section 4.1): rescale so the shorter side
  is `resize_size`, take the central `resize_size`² square, then a random
  `size`² crop and a horizontal flip with probability 1/2, plus PCA lighting
  (an RGB offset along the principal components of the training pixels).
- "rrc": RandomResizedCrop as in torchvision (area 8-100 %, aspect 3/4-4/3,
  10 tries then a centre fallback) + flip, no lighting.

Both recipes flip only when `data.hflip` is on (the caller decides).

Evaluation: centre `size`² crop of the central square, or the paper's 10 crops
(4 corners + centre, each also mirrored; the 5 unmirrored ones with hflip off).
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from service.data.formats import short_side_size


def decode_short_side(jpeg: bytes, short_side: Optional[int]) -> Image.Image:
    """Decode to RGB with shorter side `short_side` (None: as stored).

    Uses JPEG DCT scaling (`draft`) when the stored image is at least twice the
    target, so e.g. 256-shards feeding a 112 crop decode at half size.
    """
    img = Image.open(io.BytesIO(jpeg))
    if short_side is not None:
        img.draft("RGB", short_side_size(*img.size, short_side))
    img = img.convert("RGB") if img.mode != "RGB" else img
    if short_side is not None and min(img.size) != short_side:
        img = img.resize(short_side_size(*img.size, short_side), Image.BILINEAR)
    return img


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of the central min(w, h)² square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def random_crop_bounds(rng: np.random.Generator, height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a uniformly random size×size crop inside height×width."""
    if size > height or size > width:
        raise ValueError(f"crop {size} does not fit in a {height}x{width} image")
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def center_crop_bounds(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred size×size crop."""
    if size > height or size > width:
        raise ValueError(f"crop {size} does not fit in a {height}x{width} image")
    return (height - size) // 2, (width - size) // 2


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """A size×size view of an HWC array."""
    return image[top:top + size, left:left + size]


def hflip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right (a view)."""
    return image[:, ::-1]


def ten_crop_positions(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the paper's 5 crops: top-left, top-right, bottom-left, bottom-right, centre."""
    if size > height or size > width:
        raise ValueError(f"crop {size} does not fit in a {height}x{width} image")
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), center_crop_bounds(height, width, size)]


def ten_crop(image: np.ndarray, size: int, mirrored: bool = True) -> np.ndarray:
    """[10, size, size, 3]: the 5 crops, then the same 5 mirrored; [5, ...] without the mirrored ones."""
    crops = [crop(image, top, left, size) for top, left in ten_crop_positions(*image.shape[:2], size)]
    return np.stack(crops + ([hflip(c) for c in crops] if mirrored else []))


def eval_crops(img: Image.Image, image_size: int, crops: int, mirrored: bool = True) -> np.ndarray:
    """[1, S, S, 3] centre crop of the central square of `img` (already at
    the evaluation's shorter side), or its 10 crops ([5, ...] unmirrored).
    The one definition of evaluation geometry: the pipeline and the served
    model both call it."""
    square = np.asarray(img.crop(center_square_box(*img.size)))
    if crops == 1:
        top, left = center_crop_bounds(*square.shape[:2], image_size)
        return crop(square, top, left, image_size)[None]
    return ten_crop(square, image_size, mirrored=mirrored)


def pca_lighting_offset(
    rng: np.random.Generator, eigval: Sequence[float], eigvec: Sequence[Sequence[float]], std: float, n: int
) -> np.ndarray:
    """[n, 3] RGB offsets `eigvec @ (alpha * eigval)`, alpha ~ N(0, std²) per image and component.

    Units are those of `eigval` (meta.json: [0, 1]; multiply by 255 for pixels).
    """
    alpha = rng.normal(0.0, std, size=(n, 3)) if std > 0 else np.zeros((n, 3))
    return pca_lighting_from_alpha(alpha, eigval, eigvec)


def pca_lighting_from_alpha(alpha: np.ndarray, eigval: Sequence[float], eigvec: Sequence[Sequence[float]]) -> np.ndarray:
    """[n, 3] RGB offsets `eigvec @ (alpha * eigval)` for given alphas [n, 3] (the paper's PCA lighting)."""
    return (np.asarray(alpha, np.float64) * np.asarray(eigval, dtype=np.float64)) @ \
        np.asarray(eigvec, dtype=np.float64).T


def standard_normals(uniforms: np.ndarray) -> np.ndarray:
    """N(0, 1) draws from uniforms in [0, 1) (Box-Muller: each pair of columns gives two), [n, 2k] -> [n, 2k]."""
    u1, u2 = uniforms[:, 0::2], uniforms[:, 1::2]
    radius, angle = np.sqrt(-2.0 * np.log1p(-u1)), 2.0 * np.pi * u2
    out = np.empty_like(uniforms, dtype=np.float64)
    out[:, 0::2], out[:, 1::2] = radius * np.cos(angle), radius * np.sin(angle)
    return out


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    # Fallback: the largest centred crop whose aspect lies inside `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resized_crop_image(jpeg: bytes, box: tuple[int, int, int, int], stored_size: tuple[int, int],
                       size: int) -> Image.Image:
    """Decode `jpeg` and resize the box (top, left, h, w, in stored pixels) to a size×size image.

    Decodes at a reduced DCT scale when the box is >= 2x `size`.
    """
    top, left, crop_h, crop_w = box
    img = Image.open(io.BytesIO(jpeg))
    reduce = max(1, min(crop_h, crop_w) // size)
    if reduce >= 2:
        img.draft("RGB", (math.ceil(stored_size[0] / reduce), math.ceil(stored_size[1] / reduce)))
    img = img.convert("RGB") if img.mode != "RGB" else img
    sx, sy = img.size[0] / stored_size[0], img.size[1] / stored_size[1]
    pil_box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    return img.resize((size, size), Image.BILINEAR, box=pil_box)
