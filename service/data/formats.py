"""What a raw image becomes at ingest, and the on-disk shard format.

Shards are Parquet files, one row per image:

| column | type   | what |
|--------|--------|------|
| key    | string | stable id, the path inside the raw layout (e.g. `train/n01440764/n01440764_10026.JPEG`) |
| jpeg   | binary | RGB baseline JPEG, shorter side = `resize_size`, aspect kept |
| label  | int64  | index into the sorted wnid list of meta.json |
| wnid   | string | WordNet id of the class |
| height | int32  | stored image height |
| width  | int32  | stored image width |
| source | string | where the bytes came from (URI, `#member` inside a tar) |

Why Parquet rather than tar/WebDataset or TFRecord: Ray Data reads Parquet
natively and in parallel from S3 (one read task per file or row group, column
projection so `key`/`source` are never fetched during training), the schema is
typed and self-describing, a shard is one object (one GET, no per-image
requests), and pyarrow writes it from any Ray task straight to S3. JPEG bytes
are stored uncompressed (`compression="none"`: they do not compress further).

Keeping the aspect ratio (rather than storing 256×256) lets the paper's centre
square and RandomResizedCrop both be cut from the same shards at read time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("jpeg", pa.binary()),
        ("label", pa.int64()),
        ("wnid", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),
    ]
)

# Quarantine reasons (the report groups by these).
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
TOO_LARGE = "too_large"
UNKNOWN_WNID = "unknown_wnid"
NO_GROUND_TRUTH = "no_ground_truth"
BAD_ARCHIVE = "bad_archive"
READ_ERROR = "read_error"

# Conversions applied to images that were kept.
CONVERTED_FORMAT = "format_"        # + source format, e.g. format_png (a PNG named .JPEG)
CONVERTED_MODE = "mode_"            # + PIL mode, e.g. mode_cmyk, mode_l (grayscale)
EXIF_ROTATED = "exif_orientation_"  # + orientation 2..8, applied
EXIF_IGNORED = "exif_orientation_invalid"  # tag present but not 1..8: left as stored

_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class NormalizedImage:
    """The outcome for one raw image: either JPEG bytes or a quarantine reason."""

    jpeg: Optional[bytes] = None
    height: int = 0
    width: int = 0
    conversions: list[str] = field(default_factory=list)
    reason: str = ""
    detail: str = ""
    # Pixel statistics of the stored image, for the dataset mean/covariance:
    # channel sums (3), sums of products x_c * x_d (3x3, flattened), pixel count.
    pixel_sum: np.ndarray = field(default_factory=lambda: np.zeros(3))
    pixel_outer: np.ndarray = field(default_factory=lambda: np.zeros(9))
    pixel_count: int = 0

    @property
    def ok(self) -> bool:
        return self.jpeg is not None


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) scaled so that min(w, h) == short_side, aspect kept."""
    scale = short_side / min(width, height)
    if width <= height:
        return short_side, max(short_side, round(height * scale))
    return max(short_side, round(width * scale)), short_side


def _exif_orientation(img: Image.Image) -> Optional[int]:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # corrupt EXIF block: treat as absent
        return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return -1


def normalize_image(data: bytes, resize_size: int, quality: int = 90) -> NormalizedImage:
    """Decode any raw image, fix it to upright RGB, resize, re-encode as JPEG.

    Never raises: every failure becomes a quarantine reason. Fixed: non-JPEG
    formats (PNG named .JPEG), CMYK, grayscale/palette/alpha modes and EXIF
    orientation 2..8. Quarantined: empty files, non-images, truncated or
    otherwise undecodable images, decompression bombs.
    """
    out = NormalizedImage()
    if len(data) == 0:
        out.reason = EMPTY_FILE
        return out
    try:
        img = Image.open(io.BytesIO(data))
        fmt = (img.format or "unknown").lower()
        if fmt != "jpeg":
            out.conversions.append(CONVERTED_FORMAT + fmt)
        orientation = _exif_orientation(img)
        if fmt == "jpeg":
            # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target:
            # full-size ImageNet JPEGs decode several times faster this way.
            width, height = img.size
            img.draft(img.mode, short_side_size(width, height, resize_size))
        img.load()
        if orientation is not None and orientation != 1:
            if 2 <= orientation <= 8:
                img = ImageOps.exif_transpose(img)
                out.conversions.append(f"{EXIF_ROTATED}{orientation}")
            else:
                out.conversions.append(EXIF_IGNORED)
        if img.mode != "RGB":
            out.conversions.append(CONVERTED_MODE + img.mode.lower().replace(";", ""))
            if img.mode in _GRAYSCALE_MODES and img.mode not in ("L", "LA"):
                # 16-bit/float grayscale: scale to 8 bits instead of clipping.
                arr = np.asarray(img, dtype=np.float64)
                top = arr.max() if arr.size and arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
        img = img.resize(short_side_size(*img.size, resize_size), Image.BICUBIC, reducing_gap=3.0)
        arr = np.asarray(img)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    except Image.DecompressionBombError as err:
        out.reason, out.detail = TOO_LARGE, str(err)[:200]
        return out
    except UnidentifiedImageError as err:
        out.reason, out.detail = NOT_AN_IMAGE, str(err)[:200]
        return out
    except Exception as err:  # noqa: BLE001 - every decoder failure is a quarantine reason
        message = str(err)
        reason = TRUNCATED if "truncated" in message.lower() or isinstance(err, EOFError) else UNDECODABLE
        out.reason, out.detail = reason, f"{type(err).__name__}: {message}"[:200]
        return out
    pixels = arr.reshape(-1, 3).astype(np.float64)
    out.jpeg, out.height, out.width = buf.getvalue(), arr.shape[0], arr.shape[1]
    out.pixel_sum = pixels.sum(axis=0)
    out.pixel_outer = (pixels.T @ pixels).reshape(-1)
    out.pixel_count = pixels.shape[0]
    return out


@dataclass
class PixelStats:
    """Running sums over training pixels (0-255 units)."""

    total: np.ndarray = field(default_factory=lambda: np.zeros(3))
    outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    count: int = 0

    def add(self, pixel_sum: np.ndarray, pixel_outer: np.ndarray, pixel_count: int) -> None:
        self.total += np.asarray(pixel_sum, dtype=np.float64)
        self.outer += np.asarray(pixel_outer, dtype=np.float64).reshape(3, 3)
        self.count += int(pixel_count)

    def summary(self) -> dict:
        """mean/std per channel in 0-255 units; PCA of the covariance in [0, 1] units.

        The eigenvalues are variances of pixel values scaled to [0, 1] (the
        scale of the well-known ImageNet values 0.2175, 0.0188, 0.0045), so the
        paper's lighting offset `eigvec @ (alpha * eigval)` with alpha ~ N(0, 0.1)
        is in [0, 1] units; multiply by 255 for 0-255 pixels. `eigvec[:, i]`
        (column i) is the eigenvector of `eigval[i]`, sorted descending.
        """
        if self.count == 0:
            return {"mean": [0.0] * 3, "std": [0.0] * 3, "eigval": [0.0] * 3, "eigvec": np.eye(3).tolist()}
        mean = self.total / self.count
        cov = self.outer / self.count - np.outer(mean, mean)
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        eigval, eigvec = np.linalg.eigh(cov / 255.0**2)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        # Fix the sign so the result is deterministic: first component positive.
        eigvec = eigvec * np.where(eigvec[0] < 0, -1.0, 1.0)
        return {
            "mean": [float(x) for x in mean],
            "std": [float(x) for x in std],
            "eigval": [float(x) for x in eigval],
            "eigvec": [[float(x) for x in row] for row in eigvec],
        }
