"""CPU decode: JPEG bytes + `ImageParams` -> the crop, written straight into a batch row.

The lean path (the usual one: shards are stored at data.resize_size, paper
augmentation or evaluation) decodes with simplejpeg (libjpeg-turbo, the
same pixels as PIL) into a reused scratch buffer and copies only the crop
into the caller's batch row: no PIL image object, no pack, one copy of the
crop. Flip and lighting are not applied here: they travel as parameters and
are applied on the training device, as in device mode.

Where the image must be rescaled first (stored larger than resize_size) or
cut as a RandomResizedCrop, PIL does the resampling (its antialiased
bilinear filter, with JPEG DCT scaling); no other library here resamples
like it, and these paths are not the paper's hot path.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

from service.data import transforms
from service.data.params import ImageParams, eval_params, train_params

# The errors PIL and simplejpeg raise for data that is not a decodable JPEG.
DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError)


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header, without decoding."""
    height, width, _colorspace, _subsampling = simplejpeg.decode_jpeg_header(jpeg)
    return int(height), int(width)


class CpuDecoder:
    """Decodes one image at a time into a scratch buffer it reuses."""

    def __init__(self):
        self._scratch = np.empty(0, np.uint8)

    def _decode_stored(self, jpeg: bytes, height: int, width: int) -> np.ndarray:
        """The whole image as stored, [H, W, 3], a view of the scratch buffer."""
        if self._scratch.size < height * width * 3:
            self._scratch = np.empty(height * width * 3, np.uint8)
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=self._scratch)

    def scaled(self, jpeg: bytes, params: ImageParams) -> np.ndarray:
        """The image at `params.resize` (height, width), [H, W, 3]."""
        height, width = params.resize
        stored = jpeg_size(jpeg)
        if stored == (height, width):
            return self._decode_stored(jpeg, height, width)
        img = Image.open(io.BytesIO(jpeg))
        img.draft("RGB", (width, height))  # DCT scaling to >= the target size, as ingest does
        img = img.convert("RGB") if img.mode != "RGB" else img
        return np.asarray(img.resize((width, height), Image.BILINEAR))

    def train_crop(self, jpeg: bytes, params: ImageParams, size: int, augmentation: str, out: np.ndarray) -> None:
        """Write the training crop (not flipped) into `out` [size, size, 3]."""
        top, left, height, width = params.box
        if augmentation == "paper":
            out[...] = self.scaled(jpeg, params)[top:top + height, left:left + width]
            return
        stored_height, stored_width = params.resize  # rrc boxes are in stored pixels
        out[...] = np.asarray(transforms.resized_crop_image(jpeg, params.box, (stored_width, stored_height), size))

    def eval_crops(self, jpeg: bytes, params: ImageParams, size: int, crops: int, mirrored: bool,
                   out: np.ndarray) -> None:
        """Write the evaluation crop(s) into `out` ([size, size, 3], or [crops, size, size, 3])."""
        top, left, side, _ = params.box
        square = self.scaled(jpeg, params)[top:top + side, left:left + side]
        if crops == 1:
            y, x = transforms.center_crop_bounds(side, side, size)
            out[...] = square[y:y + size, x:x + size]
        else:
            out[...] = transforms.ten_crop(square, size, mirrored=mirrored)


def train_image(source, jpeg: bytes, key: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One training image's final pixels on the host, flip applied ([S, S, 3], lighting [3]).
    The reference for tests and benchmarks; the pipeline flips on the device."""
    params = train_params(source, key, epoch, *jpeg_size(jpeg))
    out = np.empty((source.image_size, source.image_size, 3), np.uint8)
    CpuDecoder().train_crop(jpeg, params, source.image_size, source.augmentation, out)
    return (out[:, ::-1] if params.flip else out), params.lighting


def eval_image(source, jpeg: bytes) -> np.ndarray:
    """One validation image's crop [S, S, 3] (or its crops [10 or 5, S, S, 3]) on the host."""
    size, crops = source.image_size, source.eval_crop_count
    out = np.empty(((crops,) if crops > 1 else ()) + (size, size, 3), np.uint8)
    CpuDecoder().eval_crops(jpeg, eval_params(source, *jpeg_size(jpeg)), size, source.eval_crops, source.hflip, out)
    return out
