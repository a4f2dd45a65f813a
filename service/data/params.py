"""Per-image augmentation parameters: a pure function of (seed, epoch, key, image size).

Both decode modes ship these with every image and apply them the same way,
so the CPU and the device path cut identical boxes and flip identical rows:

  resize    int32 [2]  (height, width) the decoded image is scaled to first;
            the stored size when nothing is scaled (the usual case: shards
            are stored at data.resize_size).
  box       int32 [4]  (top, left, height, width) in the scaled image.
            paper: the random size² crop of the central square (no resize
            after it); rrc: the RandomResizedCrop box, resized to size²
            afterwards; val: the central square, cut into the evaluation
            crops afterwards.
  flip      bool       mirror the crop left-right (training with data.hflip).
  lighting  float32 [3] PCA lighting offset in 0-255 units (zeros for val/rrc).

Randomness: paper training draws from `image_uniforms(seed, epoch, key)`,
for a whole share at once; rrc from `image_stream(seed, epoch, key)`, image
by image. Both are pure functions of (seed, epoch, key). Draw order per
training image: crop, flip coin, lighting. The coin is drawn even with hflip
off, so turning flips off changes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from service.data import transforms
from service.data.epochs import DataSource, image_stream, image_uniforms
from service.data.formats import short_side_size


@dataclass(frozen=True)
class ImageParams:
    """Where and how one image is cut (see the module docstring)."""

    resize: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    lighting: np.ndarray


def scaled_size(stored_height: int, stored_width: int, short_side: int) -> tuple[int, int]:
    """(height, width) of the image at shorter side `short_side` (the stored size when it already is)."""
    if min(stored_height, stored_width) == short_side:
        return stored_height, stored_width
    width, height = short_side_size(stored_width, stored_height, short_side)
    return height, width


def _scaled_sizes(heights: Sequence[int], widths: Sequence[int], short_side: int) -> np.ndarray:
    """int32 [n, 2]: `scaled_size` of each image."""
    return np.array([scaled_size(int(h), int(w), short_side) for h, w in zip(heights, widths)],
                    np.int32).reshape(len(heights), 2)


def _central_squares(resize: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, side) of each [height, width] row's central square (`transforms.center_square_box`)."""
    side = resize.min(axis=1)
    return (resize[:, 0] - side) // 2, (resize[:, 1] - side) // 2, side


def share_params(source: DataSource, split: str, epoch: int, keys: Sequence[str], heights: Sequence[int],
                 widths: Sequence[int]) -> dict[str, np.ndarray]:
    """The parameters of a share's images (stored sizes `heights`, `widths`), as the share's
    columns: resize int32 [n, 2], box int32 [n, 4], flip bool [n], lighting float32 [n, 3].
    Paper training and evaluation are drawn for the whole share at once; RandomResizedCrop
    image by image (its rejection loop draws a varying count)."""
    n, size = len(keys), source.image_size
    if split == "train" and source.augmentation != "paper":
        rows = [train_params(source, key, epoch, int(h), int(w)) for key, h, w in zip(keys, heights, widths)]
        return {"resize": np.array([p.resize for p in rows], np.int32).reshape(n, 2),
                "box": np.array([p.box for p in rows], np.int32).reshape(n, 4),
                "flip": np.array([p.flip for p in rows], bool),
                "lighting": np.array([p.lighting for p in rows], np.float32).reshape(n, 3)}
    resize = _scaled_sizes(heights, widths, source.resize_size)
    top, left, side = _central_squares(resize)
    flip, lighting = np.zeros(n, bool), np.zeros((n, 3), np.float32)
    if split != "train":
        return {"resize": resize, "box": np.stack([top, left, side, side], axis=1).astype(np.int32),
                "flip": flip, "lighting": lighting}
    if n and side.min() < size:
        raise ValueError(f"crop {size} does not fit in a {int(side.min())}x{int(side.min())} central square")
    # Draws, per image: crop top, crop left, flip coin, then 4 uniforms for the lighting's
    # normals. The coin is drawn even with hflip off, so turning flips off changes nothing else.
    uniforms = image_uniforms(source.seed, epoch, keys)
    span = (side - size + 1).astype(np.float64)
    dy, dx = (uniforms[:, 0] * span).astype(np.int32), (uniforms[:, 1] * span).astype(np.int32)
    box = np.stack([top + dy, left + dx, np.full(n, size), np.full(n, size)], axis=1).astype(np.int32)
    flip[:] = (uniforms[:, 2] < 0.5) & source.hflip
    if source.pca_lighting_std > 0:
        alpha = source.pca_lighting_std * transforms.standard_normals(uniforms[:, 3:7])[:, :3]
        lighting[:] = 255.0 * transforms.pca_lighting_from_alpha(alpha, source.meta.eigval, source.meta.eigvec)
    return {"resize": resize, "box": box, "flip": flip, "lighting": lighting}


def row_params(params: dict[str, np.ndarray], row: int) -> ImageParams:
    """Row `row` of `share_params`' columns as one image's `ImageParams`."""
    return ImageParams(resize=tuple(int(v) for v in params["resize"][row]),
                       box=tuple(int(v) for v in params["box"][row]),
                       flip=bool(params["flip"][row]), lighting=params["lighting"][row])


def train_params(source: DataSource, key: str, epoch: int, stored_height: int, stored_width: int) -> ImageParams:
    """The augmentation of one training image in epoch `epoch`."""
    if source.augmentation == "paper":
        return row_params(share_params(source, "train", epoch, [key], [stored_height], [stored_width]), 0)
    rng = image_stream(source.seed, epoch, key)
    box = transforms.random_resized_crop_box(rng, stored_height, stored_width)
    flip = bool(rng.random() < 0.5) and source.hflip
    return ImageParams(resize=(stored_height, stored_width), box=tuple(int(v) for v in box), flip=flip,
                       lighting=np.zeros(3, np.float32))


def eval_params(source: DataSource, stored_height: int, stored_width: int) -> ImageParams:
    """Validation: the central square of the image at data.resize_size (crops are cut from it)."""
    return row_params(share_params(source, "val", 0, [""], [stored_height], [stored_width]), 0)
