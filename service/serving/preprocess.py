"""Raw images -> the uint8 crops the network was validated on (numpy + PIL only).

The served model must see exactly what validation saw: shorter side resized
to `resize_size`, the central square, then the centre crop (or the paper's 10
crops) of `image_size`. The steps are `service.data.transforms`' own, so the
served model and `python -m service.evaluate` cannot drift apart.

Untrusted input is checked before it is decoded: empty payloads, payloads
over `MAX_IMAGE_BYTES`, anything PIL cannot identify, and images over
`MAX_PIXELS` (a small PNG can claim 100k x 100k pixels) raise `BadImage`,
whose message names the image and what is accepted.
"""

from __future__ import annotations

import io
import warnings
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.data import transforms
from service.data.formats import short_side_size

# Limits on one request image. 40 MP covers any camera photo; ImageNet's
# largest image is ~2.6 MP.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000
ACCEPTED = "JPEG, PNG, WebP, BMP, GIF or TIFF bytes, or a uint8 array [H, W, 3]"

ImageInput = Union[bytes, bytearray, memoryview, np.ndarray]


class BadImage(ValueError):
    """One request image cannot be classified; the message says why."""


def open_image(data: bytes, resize_size: int, index: int = 0) -> Image.Image:
    """Decode encoded image bytes to RGB after checking the size limits.

    JPEGs are decoded as the shards are (`transforms.decode_short_side`, with
    DCT scaling), already at shorter side `resize_size`.
    """
    if len(data) == 0:
        raise BadImage(f"image {index} is empty (0 bytes); send {ACCEPTED}")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(
            f"image {index} has {len(data)} bytes, more than the {MAX_IMAGE_BYTES} accepted; "
            "resize or re-encode it"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, on decompression bombs; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise BadImage(f"image {index} claims more than {MAX_PIXELS} pixels; at most {MAX_PIXELS} accepted") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadImage(f"image {index} ({len(data)} bytes) is not an image PIL can read; send {ACCEPTED}") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise BadImage(
            f"image {index} is {width}x{height} pixels, more than the {MAX_PIXELS} accepted; resize it"
        )
    try:
        if img.format == "JPEG":
            return transforms.decode_short_side(data, resize_size)
        img.load()
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise BadImage(f"image {index} cannot be decoded ({error}); send a complete {img.format} file") from None
    return img.convert("RGB") if img.mode != "RGB" else img


def array_image(array: np.ndarray, index: int = 0) -> Image.Image:
    """A uint8 [H, W, 3] (or [H, W] grayscale) array as an RGB PIL image."""
    if array.dtype != np.uint8:
        raise BadImage(f"image {index} is a {array.dtype} array; send uint8 pixels [H, W, 3]")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadImage(f"image {index} has shape {list(array.shape)}; send [H, W, 3] RGB pixels")
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise BadImage(f"image {index} has more than {MAX_PIXELS} pixels; resize it")
    if min(array.shape[:2]) == 0:
        raise BadImage(f"image {index} has no pixels (shape {list(array.shape)})")
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def eval_crops(img: Image.Image, resize_size: int, image_size: int, crops: int) -> np.ndarray:
    """[crops, S, S, 3] uint8: shorter side to `resize_size`, then the
    pipeline's own evaluation crops (`service.data.transforms.eval_crops`)."""
    if crops not in (1, 10):
        raise ValueError(f"crops={crops}; choose 1 or 10")
    if min(img.size) != resize_size:
        img = img.resize(short_side_size(*img.size, resize_size), Image.BILINEAR)
    return transforms.eval_crops(img, image_size, crops)


def preprocess(images: list[ImageInput], resize_size: int, image_size: int, crops: int) -> np.ndarray:
    """[N, crops, S, S, 3] uint8 from encoded bytes or uint8 arrays; `BadImage` names the first bad one."""
    if not images:
        raise BadImage(f"the request holds no images; send at least one ({ACCEPTED})")
    out = np.empty((len(images), crops, image_size, image_size, 3), np.uint8)
    for index, item in enumerate(images):
        if isinstance(item, np.ndarray):
            img = array_image(item, index)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            img = open_image(bytes(item), resize_size, index)
        elif item is None:
            raise BadImage(f"image {index} is missing (null); send {ACCEPTED}")
        else:
            raise BadImage(f"image {index} is a {type(item).__name__}; send {ACCEPTED}")
        out[index] = eval_crops(img, resize_size, image_size, crops)
    return out
