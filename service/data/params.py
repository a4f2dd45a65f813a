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

Draw order per training image: crop, flip coin, lighting. The coin is drawn
even with hflip off, so turning flips off changes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.data import transforms
from service.data.epochs import DataSource, image_stream
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


def _central_square(height: int, width: int) -> tuple[int, int, int]:
    left, top, right, _bottom = transforms.center_square_box(width, height)
    return top, left, right - left


def train_params(source: DataSource, key: str, epoch: int, stored_height: int, stored_width: int) -> ImageParams:
    """The augmentation of one training image in epoch `epoch`."""
    rng, size = image_stream(source.seed, epoch, key), source.image_size
    lighting = np.zeros(3, np.float32)
    if source.augmentation == "paper":
        resize = scaled_size(stored_height, stored_width, source.resize_size)
        top, left, side = _central_square(*resize)
        dy, dx = transforms.random_crop_bounds(rng, side, side, size)
        box = (top + dy, left + dx, size, size)
    else:
        resize = (stored_height, stored_width)
        box = transforms.random_resized_crop_box(rng, stored_height, stored_width)
    flip = bool(rng.random() < 0.5) and source.hflip
    if source.augmentation == "paper" and source.pca_lighting_std > 0:
        lighting[:] = 255.0 * transforms.pca_lighting_offset(
            rng, source.meta.eigval, source.meta.eigvec, source.pca_lighting_std, 1)[0]
    return ImageParams(resize=resize, box=tuple(int(v) for v in box), flip=flip, lighting=lighting)


def eval_params(source: DataSource, stored_height: int, stored_width: int) -> ImageParams:
    """Validation: the central square of the image at data.resize_size (crops are cut from it)."""
    resize = scaled_size(stored_height, stored_width, source.resize_size)
    top, left, side = _central_square(*resize)
    return ImageParams(resize=resize, box=(top, left, side, side), flip=False, lighting=np.zeros(3, np.float32))
