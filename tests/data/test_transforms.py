"""Augmentation maths and image fixing, without Ray."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from service.data import formats, transforms
from service.data.decode import eval_image, train_image
from service.data.epochs import DataSource, image_stream, image_uniforms
from service.data.meta import DatasetMeta
from service.data.params import share_params, train_params
from service.data.storage import S3Settings


def _source(image_size: int = 64, resize_size: int = 72, **overrides) -> DataSource:
    """A DataSource over no files: enough for the per-image decode functions."""
    meta = DatasetMeta(num_classes=2, wnids=["n0", "n1"], names=["a", "b"], mean=[0.0] * 3, std=[1.0] * 3,
                       eigval=[0.2, 0.02, 0.004], eigvec=np.eye(3).tolist(), num_train=0, num_val=0)
    fields = dict(root="/nowhere", s3=S3Settings(), meta=meta, image_size=image_size, resize_size=resize_size,
                  augmentation="paper", hflip=True, pca_lighting_std=0.1, eval_crops=1, seed=1,
                  skip_bad_shards=False)
    fields.update(overrides)
    return DataSource(**fields)


def _jpeg(width: int, height: int, seed: int = 0, **kwargs) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def test_random_crop_bounds_cover_every_position_and_stay_inside():
    rng = np.random.default_rng(0)
    seen = {random_pos for random_pos in (transforms.random_crop_bounds(rng, 10, 12, 7) for _ in range(2000))}
    # 4 x 6 valid positions, each drawn.
    assert seen == {(top, left) for top in range(4) for left in range(6)}
    with pytest.raises(ValueError):
        transforms.random_crop_bounds(rng, 6, 12, 7)


def test_center_crop_and_square():
    assert transforms.center_crop_bounds(256, 256, 224) == (16, 16)
    assert transforms.center_square_box(341, 256) == (42, 0, 298, 256)
    assert transforms.center_square_box(256, 300) == (0, 22, 256, 278)


def test_hflip_mirrors_columns():
    image = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    flipped = transforms.hflip(image)
    assert np.array_equal(flipped[:, 0], image[:, 2]) and np.array_equal(transforms.hflip(flipped), image)


def test_ten_crop_positions_are_corners_centre_and_mirrors():
    assert transforms.ten_crop_positions(256, 256, 224) == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    image = np.random.default_rng(1).integers(0, 255, (9, 9, 3), dtype=np.uint8)
    crops = transforms.ten_crop(image, 5)
    assert crops.shape == (10, 5, 5, 3)
    assert np.array_equal(crops[0], image[:5, :5]) and np.array_equal(crops[3], image[4:, 4:])
    assert np.array_equal(crops[4], image[2:7, 2:7])
    for k in range(5):
        assert np.array_equal(crops[5 + k], crops[k][:, ::-1])
    assert np.array_equal(transforms.ten_crop(image, 5, mirrored=False), crops[:5])


def test_pca_lighting_statistics_match_the_paper_formula():
    eigval = np.array([0.2175, 0.0188, 0.0045])
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    std, n = 0.1, 200_000
    offsets = transforms.pca_lighting_offset(np.random.default_rng(4), eigval, q, std, n)
    assert offsets.shape == (n, 3)
    # offset = Q (alpha * lambda), alpha ~ N(0, std^2): mean 0, covariance Q diag((std*lambda)^2) Q^T.
    expected_cov = q @ np.diag((std * eigval) ** 2) @ q.T
    assert np.allclose(offsets.mean(axis=0), 0.0, atol=4 * std * eigval[0] / math.sqrt(n))
    assert np.allclose(np.cov(offsets.T), expected_cov, rtol=0.02, atol=1e-7)
    # Projected on the eigenvectors, the components are independent with std = std * lambda_i.
    assert np.allclose((offsets @ q).std(axis=0), std * eigval, rtol=0.02)
    assert np.array_equal(transforms.pca_lighting_offset(np.random.default_rng(0), eigval, q, 0.0, 5), np.zeros((5, 3)))


def test_a_share_draws_the_papers_augmentation_per_image_whatever_shares_it():
    """`share_params` draws a whole share at once from `image_uniforms`: each image's
    parameters are a pure function of (seed, epoch, key), with the paper's distributions."""
    source, n = _source(image_size=64, resize_size=72), 20_000
    keys = [f"n{i % 7}/img_{i}.JPEG" for i in range(n)]
    heights, widths = np.full(n, 72), np.full(n, 96)
    params = share_params(source, "train", 3, keys, heights, widths)
    # Crop: every one of the 9 x 9 positions of a 64² window in the central 72² square, evenly.
    top, left = params["box"][:, 0], params["box"][:, 1] - 12
    counts = np.bincount((top * 9 + left).astype(int), minlength=81)
    assert counts.size == 81 and counts.min() > 0.8 * n / 81 and counts.max() < 1.2 * n / 81
    assert np.all(params["box"][:, 2:] == 64) and np.all(params["resize"] == (72, 96))
    assert abs(params["flip"].mean() - 0.5) < 0.02
    # Lighting: 255 * eigvec @ (alpha * eigval), alpha ~ N(0, 0.1^2) (eigvec = I here).
    alpha = params["lighting"] / 255.0 / np.array(source.meta.eigval)
    assert np.allclose(alpha.mean(axis=0), 0, atol=0.005) and np.allclose(alpha.std(axis=0), 0.1, rtol=0.03)
    assert abs(np.corrcoef(alpha.T)[0, 1]) < 0.03
    # The same image gets the same draw alone or in any share; another epoch or seed draws anew.
    for i in (0, 4321, n - 1):
        one = train_params(source, keys[i], 3, 72, 96)
        assert one.box == tuple(params["box"][i]) and one.flip == params["flip"][i]
        assert np.array_equal(one.lighting, params["lighting"][i])
    assert np.array_equal(image_uniforms(1, 3, keys[5:9]), image_uniforms(1, 3, keys)[5:9])
    assert not np.any(image_uniforms(1, 4, keys[:50]) == image_uniforms(1, 3, keys[:50]))
    assert not np.any(image_uniforms(2, 3, keys[:50]) == image_uniforms(1, 3, keys[:50]))
    uniforms = image_uniforms(1, 3, keys)
    assert uniforms.min() >= 0 and uniforms.max() < 1 and np.allclose(uniforms.mean(axis=0), 0.5, atol=0.01)
    normals = transforms.standard_normals(uniforms[:, :4])
    assert np.allclose(normals.mean(axis=0), 0, atol=0.03) and np.allclose(normals.std(axis=0), 1, rtol=0.03)
    # hflip off: no flips, and nothing else moves.
    unflipped = share_params(_source(hflip=False), "train", 3, keys[:200], heights[:200], widths[:200])
    assert not unflipped["flip"].any() and np.array_equal(unflipped["box"], params["box"][:200])


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(5)
    height, width = 256, 341
    for _ in range(500):
        top, left, crop_h, crop_w = transforms.random_resized_crop_box(rng, height, width)
        assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
        area = crop_h * crop_w / (height * width)
        assert 0.07 <= area <= 1.0
        if (top, left) != ((height - crop_h) // 2, (width - crop_w) // 2):
            assert 3 / 4 - 0.05 <= crop_w / crop_h <= 4 / 3 + 0.05
    # A very thin image never fits the aspect range: centred fallback clipped to the ratio.
    top, left, crop_h, crop_w = transforms.random_resized_crop_box(rng, 10, 1000, scale=(0.99, 1.0))
    assert crop_h == 10 and crop_w == round(10 * 4 / 3) and left == (1000 - crop_w) // 2


def test_decode_short_side_uses_draft_and_returns_exact_size():
    jpeg = _jpeg(512, 384)
    assert transforms.decode_short_side(jpeg, 128).size == (171, 128)
    assert transforms.decode_short_side(jpeg, 384).size == (512, 384)
    assert transforms.decode_short_side(jpeg, None).size == (512, 384)


def test_resized_crop_image_is_size_by_size():
    jpeg = _jpeg(300, 200)
    out = np.asarray(transforms.resized_crop_image(jpeg, (10, 20, 150, 180), (300, 200), 32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_train_image_contract_paper_and_rrc():
    jpegs = [_jpeg(96, 72, s) for s in range(4)]
    paper = [train_image(_source(), j, f"k{i}", 0) for i, j in enumerate(jpegs)]
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img, _ in paper)
    assert all(light.shape == (3,) and light.dtype == np.float32 for _, light in paper)
    assert any(np.any(light != 0) for _, light in paper)
    again = [train_image(_source(), j, f"k{i}", 0) for i, j in enumerate(jpegs)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(paper, again)), "augmentation must replay for a seed"
    other_epoch = [train_image(_source(), j, f"k{i}", 1)[0] for i, j in enumerate(jpegs)]
    assert any(not np.array_equal(a[0], b) for a, b in zip(paper, other_epoch)), "epochs draw new crops"
    rrc = [train_image(_source(augmentation="rrc"), j, f"k{i}", 0) for i, j in enumerate(jpegs)]
    assert all(img.shape == (64, 64, 3) and not np.any(light) for img, light in rrc)


def test_hflip_off_changes_only_the_flip():
    jpeg = _jpeg(96, 72, seed=4)
    for augmentation in ("paper", "rrc"):
        flipped_somewhere = False
        for key in (f"k{i}" for i in range(16)):
            on_img, on_light = train_image(_source(augmentation=augmentation), jpeg, key, 0)
            off_img, off_light = train_image(_source(augmentation=augmentation, hflip=False), jpeg, key, 0)
            assert np.array_equal(on_light, off_light), "lighting is drawn the same with flips off"
            if not np.array_equal(on_img, off_img):
                assert np.array_equal(on_img, off_img[:, ::-1]), "the only difference is a mirror"
                flipped_somewhere = True
        assert flipped_somewhere, "with hflip on, some of 16 images are mirrored"


def test_train_crop_is_a_window_of_the_central_square():
    jpeg = _jpeg(96, 72, seed=9)
    square = np.asarray(transforms.decode_short_side(jpeg, 72).crop(transforms.center_square_box(96, 72)))
    out, _ = train_image(_source(pca_lighting_std=0.0, seed=3), jpeg, "key", 0)
    windows = [square[t:t + 64, l:l + 64] for t in range(9) for l in range(9)]
    assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)
    # The image stream is a pure function of (seed, epoch, key).
    assert image_stream(3, 0, "a").random() == image_stream(3, 0, "a").random() != image_stream(3, 1, "a").random()
    assert image_stream(3, 0, "a").random() != image_stream(3, 0, "b").random()


def test_eval_image_one_ten_and_five_crops():
    jpeg = _jpeg(96, 72, 1)
    one = eval_image(_source(), jpeg)
    ten = eval_image(_source(eval_crops=10), jpeg)
    five = eval_image(_source(eval_crops=10, hflip=False), jpeg)
    assert one.shape == (64, 64, 3) and ten.shape == (10, 64, 64, 3) and five.shape == (5, 64, 64, 3)
    assert np.array_equal(one, ten[4]), "crop 4 of the ten is the centre crop"
    assert np.array_equal(five, ten[:5]), "with hflip off, the 5 unmirrored crops"
    assert _source(eval_crops=10).eval_crop_count == 10 and _source(eval_crops=10, hflip=False).eval_crop_count == 5


# --- ingest-time fixing of bad inputs (formats.normalize_image) ---------------------------------


def _image(mode: str = "RGB", size=(80, 60)) -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, conversion",
    [
        (_encode(_image("CMYK")), "mode_cmyk"),
        (_encode(_image("L")), "mode_l"),
        (_encode(_image("RGB"), "PNG"), "format_png"),
        (_encode(_image("RGBA"), "PNG"), "format_png"),
    ],
)
def test_convertible_inputs_become_rgb_jpeg(data, conversion):
    out = formats.normalize_image(data, 32)
    assert out.ok and conversion in out.conversions
    decoded = Image.open(io.BytesIO(out.jpeg))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and min(decoded.size) == 32
    assert out.pixel_count == decoded.size[0] * decoded.size[1]


def test_exif_orientation_is_applied_and_invalid_values_ignored():
    exif = Image.Exif()
    exif[0x0112] = 6
    out = formats.normalize_image(_encode(_image(size=(60, 80)), exif=exif.tobytes()), 30)
    assert out.ok and "exif_orientation_6" in out.conversions
    assert (out.width, out.height) == (40, 30), "a 60x80 image with orientation 6 displays as 80x60"
    exif[0x0112] = 9
    out = formats.normalize_image(_encode(_image(size=(60, 80)), exif=exif.tobytes()), 30)
    assert out.ok and "exif_orientation_invalid" in out.conversions and (out.width, out.height) == (30, 40)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (b"<html>not an image</html>", "not_an_image"),
        (_encode(_image())[:400], "truncated"),
    ],
)
def test_unrecoverable_inputs_are_quarantined_with_a_reason(data, reason):
    out = formats.normalize_image(data, 32)
    assert not out.ok and out.reason == reason


def test_pixel_stats_mean_std_and_pca():
    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.0, 0.0], [0.8, 0.3, 0.0], [0.5, 0.2, 0.4]])
    pixels = np.clip(120 + rng.normal(0, 30, (50_000, 3)) @ mix.T, 0, 255)
    stats = formats.PixelStats()
    for chunk in np.array_split(pixels, 5):
        stats.add(chunk.sum(axis=0), (chunk.T @ chunk).reshape(-1), len(chunk))
    summary = stats.summary()
    assert np.allclose(summary["mean"], pixels.mean(axis=0)) and np.allclose(summary["std"], pixels.std(axis=0))
    cov01 = np.cov(pixels.T, bias=True) / 255.0**2
    eigval, eigvec = np.array(summary["eigval"]), np.array(summary["eigvec"])
    assert np.all(np.diff(eigval) <= 0)
    assert np.allclose(eigvec @ np.diag(eigval) @ eigvec.T, cov01, atol=1e-10)
