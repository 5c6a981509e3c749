"""Tests for retinagen.data.fundus on the real fundus photograph shipped with scikit-image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from monai.transforms import Compose

from retinagen.data.fundus import (
    FOV,
    MASK_MARGIN,
    BenGraham,
    BenGrahamd,
    CircularMask,
    CircularMaskd,
    FundusCrop,
    FundusCropd,
    FundusPreprocess,
    FundusPreprocessd,
    circular_mask,
    detect_fov,
    preprocess_fundus,
    to_model_range,
    to_rgb_float,
)
from retinagen.errors import BadInputError, NoFundusError

# Reference FOV of skimage.data.retina() (1411 x 1411 RGB), measured independently of the detector
# (and checked by eye on a saved PNG): the surround's red channel is <= ~20, the FOV's >= ~80.
# Threshold red > 40 and take the first/last rows and columns holding > 20 such pixels: rows
# 7..1399, columns 9..1399, i.e. pixel edges 6.5..1399.5 and 8.5..1399.5. Centre (704, 703),
# diameters 1393 (vertical) and 1391 (horizontal) -> radius 696. `test_reference_matches_image`
# re-measures this so the constants cannot drift from the image.
REF_CX, REF_CY, REF_R = 704.0, 703.0, 696.0
TOL = 0.03 * REF_R  # the brief: centre and radius within 3% of the radius


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    img = skimage.data.retina()
    assert img.shape == (1411, 1411, 3) and img.dtype == np.uint8
    return img


def _assert_fov(fov: FOV, cx: float, cy: float, r: float = REF_R) -> None:
    assert abs(fov.cx - cx) < TOL, (fov, cx)
    assert abs(fov.cy - cy) < TOL, (fov, cy)
    assert abs(fov.radius - r) < TOL, (fov, r)


def _jpeg_noisy(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """Surround filled with dark sensor noise (0..15), then JPEG at quality 30 (blocking, ringing)."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    surround = img.max(axis=2) < 15
    out[surround] = rng.integers(0, 16, size=(int(surround.sum()), 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()


# --------------------------------------------------------------------------------------------------
# FOV detection
# --------------------------------------------------------------------------------------------------


def test_reference_matches_image(retina: np.ndarray) -> None:
    bright = retina[:, :, 0] > 40
    rows = np.flatnonzero(bright.sum(axis=1) > 20)
    cols = np.flatnonzero(bright.sum(axis=0) > 20)
    assert (rows[0] + rows[-1]) / 2 == pytest.approx(REF_CY, abs=1)
    assert (cols[0] + cols[-1]) / 2 == pytest.approx(REF_CX, abs=1)
    assert (rows[-1] - rows[0] + 1) / 2 == pytest.approx(REF_R, abs=2)
    assert (cols[-1] - cols[0] + 1) / 2 == pytest.approx(REF_R, abs=2)


def test_detect_fov_on_real_retina(retina: np.ndarray) -> None:
    fov = detect_fov(retina)
    _assert_fov(fov, REF_CX, REF_CY)
    # Tighter than the brief's 3%: the radial-edge refinement should land within ~0.5%.
    assert abs(fov.radius - REF_R) < 0.005 * REF_R
    assert fov.frame_cut == 0.0
    assert fov.coverage > 0.97


def _variants(img: np.ndarray) -> dict[str, np.ndarray]:
    f = img.astype(np.float64)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return {
        "rgba": np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]),
        "rgba_alpha_surround": np.dstack([img, np.where(img.max(axis=2) > 20, 255, 0).astype(np.uint8)]),
        "gray_2d": gray,
        "gray_1ch": gray[:, :, None],
        "uint16": img.astype(np.uint16) * 257,
        "uint12": img.astype(np.uint16) * 16,
        "float32": (f / 255).astype(np.float32),
        "float64": f / 255,
        "dark_x0.15": (f * 0.15).astype(np.uint8),
        "overexposed_x3": np.clip(f * 3, 0, 255).astype(np.uint8),
        "jpeg_noise": _jpeg_noisy(img),
    }


@pytest.fixture(scope="module")
def variants(retina: np.ndarray) -> dict[str, np.ndarray]:
    return _variants(retina)


@pytest.mark.parametrize("name", list(_variants(np.zeros((2, 2, 3), np.uint8))))
def test_detect_fov_variants(variants: dict[str, np.ndarray], name: str) -> None:
    img = variants[name]
    fov = detect_fov(img)
    _assert_fov(fov, REF_CX, REF_CY)
    assert fov.frame_cut == 0.0


def test_jpeg_noise_defeats_greater_than_zero(retina: np.ndarray) -> None:
    # The premise of the robust threshold: with JPEG noise, `> 0` (MONAI CropForeground's default)
    # selects the whole frame, while detect_fov still finds the disc.
    noisy = _jpeg_noisy(retina)
    surround = retina.max(axis=2) < 15
    assert (noisy[surround].max(axis=1) > 0).mean() > 0.9
    fg = noisy.max(axis=2) > 0
    assert fg[0].any() and fg[-1].any() and fg[:, 0].any() and fg[:, -1].any()
    _assert_fov(detect_fov(noisy), REF_CX, REF_CY)


def test_frame_cut_top_bottom(retina: np.ndarray) -> None:
    # EyePACS-style: the top and bottom 15% of rows are cut away; the full circle must come back.
    c = int(0.15 * retina.shape[0])
    cut = retina[c:-c]
    fov = detect_fov(cut)
    _assert_fov(fov, REF_CX, REF_CY - c)
    expected_cut = ((REF_R - (REF_CY - c)) + (REF_CY - c + REF_R - cut.shape[0])) / (2 * REF_R)
    assert fov.frame_cut == pytest.approx(expected_cut, abs=0.02)
    assert fov.frame_cut > 0.2
    assert fov.coverage > 0.95  # coverage counts only the disc inside the frame


def test_frame_cut_all_sides_and_off_centre(retina: np.ndarray) -> None:
    c, cw = int(0.15 * retina.shape[0]), int(0.1 * retina.shape[1])
    _assert_fov(detect_fov(retina[c:-c, cw:-cw]), REF_CX - cw, REF_CY - c)
    wide = np.zeros((1411, 2100, 3), np.uint8)
    wide[:, 300:1711] = retina
    _assert_fov(detect_fov(wide), REF_CX + 300, REF_CY)


def test_vignetting_does_not_shrink_the_circle(retina: np.ndarray) -> None:
    # Periphery darkened to ~25% of the centre: a plain threshold outline shrinks by ~8%; the radial
    # edge refinement finds the true FOV edge.
    yy, xx = np.mgrid[0:1411, 0:1411]
    gain = np.clip(1.2 - 0.9 * ((xx - REF_CX) ** 2 + (yy - REF_CY) ** 2) / REF_R**2, 0, 1)
    dim = (retina * gain[:, :, None]).astype(np.uint8)
    fov = detect_fov(dim)
    _assert_fov(fov, REF_CX, REF_CY)
    assert abs(fov.radius - REF_R) < 0.01 * REF_R


def test_small_image(retina: np.ndarray) -> None:
    small = cv2.resize(retina, (100, 100), interpolation=cv2.INTER_AREA)
    s = 100 / 1411
    fov = detect_fov(small)
    assert abs(fov.cx - ((REF_CX + 0.5) * s - 0.5)) < 0.03 * REF_R * s
    assert abs(fov.cy - ((REF_CY + 0.5) * s - 0.5)) < 0.03 * REF_R * s
    assert abs(fov.radius - REF_R * s) < 0.03 * REF_R * s


def _no_fundus_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    canvas = np.zeros((1400, 1400, 3), np.uint8)
    canvas[650:750, 650:750] = cv2.resize(skimage.data.retina(), (100, 100), interpolation=cv2.INTER_AREA)
    return {
        "uniform_gray": np.full((480, 640, 3), 128, np.uint8),
        "uniform_white_float": np.ones((300, 300), np.float32),
        "all_black": np.zeros((480, 640, 3), np.uint8),
        "black_with_noise": rng.integers(0, 6, (480, 640, 3), dtype=np.uint8),
        "random_noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "random_noise_small": rng.integers(0, 256, (96, 96), dtype=np.uint8),
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "camera": skimage.data.camera(),
        "coins": skimage.data.coins(),
        # Documents and other pictures a clinician might upload by mistake.
        "text": skimage.data.text(),
        "page": skimage.data.page(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "moon": skimage.data.moon(),
        "hubble_deep_field": skimage.data.hubble_deep_field(),
        "immunohistochemistry": skimage.data.immunohistochemistry(),
        "typed_report": _document(),
        "typed_report_inverted": 255 - _document(),
        "slide_title": _slide(),
        "tiny_fov": canvas,
        "too_small": np.zeros((16, 16, 3), np.uint8),
    }


def _document() -> np.ndarray:
    """A typed report page: dark text lines on a light page."""
    doc = np.full((1100, 850, 3), 245, np.uint8)
    for i, y in enumerate(range(80, 1050, 28)):
        cv2.putText(doc, f"Report line {i}: findings within normal limits", (60, y), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6, (20, 20, 20), 1)
    return doc


def _slide() -> np.ndarray:
    """A presentation slide: large white title on black (a dark surround, but no round field)."""
    slide = np.zeros((720, 1280, 3), np.uint8)
    cv2.putText(slide, "Fundus imaging", (200, 360), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 6)
    return slide


@pytest.mark.parametrize("name", list(_no_fundus_images()))
def test_no_fundus(name: str) -> None:
    img = _no_fundus_images()[name]
    with pytest.raises(NoFundusError) as info:
        detect_fov(img)
    assert isinstance(info.value, BadInputError)
    assert "no fundus found" in str(info.value)
    with pytest.raises(NoFundusError):
        preprocess_fundus(img, 64)


def test_no_fundus_reasons_are_specific() -> None:
    imgs = _no_fundus_images()
    reasons = {
        "all_black": "black",
        "uniform_gray": "uniform",
        "tiny_fov": "too small",
        "astronaut": "not circular",
    }
    for name, word in reasons.items():
        with pytest.raises(NoFundusError, match=word):
            detect_fov(imgs[name])


def test_detect_fov_deterministic(retina: np.ndarray) -> None:
    assert detect_fov(retina) == detect_fov(retina.copy())


# --------------------------------------------------------------------------------------------------
# Conversion helpers
# --------------------------------------------------------------------------------------------------


def test_to_rgb_float() -> None:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 0
    out = to_rgb_float(rgba)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 200 / 255, rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)  # alpha 0 -> composited on black

    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    g = to_rgb_float(gray)
    assert g.shape == (4, 5, 3)
    np.testing.assert_array_equal(g[..., 0], g[..., 2])
    np.testing.assert_allclose(g[..., 1], gray / 255, rtol=1e-6)

    assert to_rgb_float(np.full((2, 2), 65535, np.uint16)).max() == pytest.approx(1.0)
    assert to_rgb_float(np.array([[4095, 0]], np.uint16)).max() == pytest.approx(1.0)  # 12-bit data
    assert to_rgb_float(np.array([[4096, 0]], np.uint16)).max() == pytest.approx(4096 / 65535)
    f = np.random.default_rng(0).random((3, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(to_rgb_float(f), f)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, 64, 64), np.uint8),  # channel-first given to a channel-last function
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((8,), np.uint8),
        np.zeros((2, 8, 8, 3), np.uint8),
        np.zeros((8, 8, 3), np.int32),
        np.full((8, 8, 3), 1.5, np.float32),
        np.full((8, 8, 3), np.nan, np.float32),
    ],
)
def test_bad_inputs_raise_value_error(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        to_rgb_float(bad)
    with pytest.raises(ValueError):
        detect_fov(bad)
    with pytest.raises(ValueError):
        preprocess_fundus(bad, 64)


def test_torch_tensor_to_numpy_api_raises(retina: np.ndarray) -> None:
    with pytest.raises(ValueError, match="channel-last"):
        detect_fov(torch.from_numpy(retina))


def test_to_model_range() -> None:
    hwc = np.zeros((6, 5, 3), np.uint8)
    hwc[0, 0] = 255
    out = to_model_range(hwc)
    assert out.shape == (3, 6, 5) and out.dtype == torch.float32
    assert out.min() == -1.0 and out.max() == 1.0
    assert torch.all(out[:, 0, 0] == 1.0) and torch.all(out[:, 1:, :] == -1.0)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    torch.testing.assert_close(to_model_range(chw), out)
    torch.testing.assert_close(to_model_range(np.ascontiguousarray(chw.numpy())), out)
    assert to_model_range(np.full((2, 2, 3), 128, np.uint8))[0, 0, 0].item() == pytest.approx(
        0.5 / 127.5, abs=1e-6
    )
    with pytest.raises(ValueError):
        to_model_range(hwc.astype(np.float32))
    with pytest.raises(ValueError):
        to_model_range(np.zeros((6, 5, 4), np.uint8))


# --------------------------------------------------------------------------------------------------
# preprocess_fundus
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [64, 101])
def test_preprocess_shape_mask_and_centring(retina: np.ndarray, resolution: int) -> None:
    out = preprocess_fundus(retina, resolution)
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8
    inside = circular_mask(resolution, resolution)
    assert np.all(out[~inside] == 0)
    # The FOV fills the square: almost every pixel well inside the circle is lit...
    core = circular_mask(resolution, resolution, margin=0.1)
    assert (out[core].max(axis=1) > 30).mean() > 0.99
    # ...and, unmasked, the lit disc is centred and touches all four sides within ~2 px.
    raw = preprocess_fundus(retina, resolution, mask=False)
    lit = raw[:, :, 0] > 40
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    assert rows[0] <= 2 and cols[0] <= 2 and rows[-1] >= resolution - 3 and cols[-1] >= resolution - 3
    yy, xx = np.nonzero(lit)
    assert abs(yy.mean() - (resolution - 1) / 2) < 1.0 and abs(xx.mean() - (resolution - 1) / 2) < 1.0
    # mask=True only zeroes what lies outside the mask circle.
    np.testing.assert_array_equal(out[inside], raw[inside])


def test_preprocess_deterministic(retina: np.ndarray) -> None:
    for bg in (False, True):
        a = preprocess_fundus(retina, 96, ben_graham=bg)
        b = preprocess_fundus(retina.copy(), 96, ben_graham=bg)
        np.testing.assert_array_equal(a, b)


def test_preprocess_given_fov_and_dtypes_agree(retina: np.ndarray) -> None:
    base = preprocess_fundus(retina, 64)
    np.testing.assert_array_equal(preprocess_fundus(retina, 64, fov=detect_fov(retina)), base)
    for img in (retina.astype(np.uint16) * 257, retina.astype(np.float32) / 255):
        other = preprocess_fundus(img, 64)
        assert np.abs(other.astype(int) - base.astype(int)).max() <= 1
    with pytest.raises(ValueError):
        preprocess_fundus(retina, 64, fov=FOV(cx=1.0, cy=1.0, radius=-3.0, frame_cut=0.0, coverage=1.0))
    for bad_res in (4, 64.0, True):
        with pytest.raises(ValueError):
            preprocess_fundus(retina, bad_res)  # type: ignore[arg-type]


def test_preprocess_frame_cut_pads_black(retina: np.ndarray) -> None:
    c = int(0.15 * retina.shape[0])
    full = preprocess_fundus(retina, 128, mask=False)
    cut = preprocess_fundus(retina[c:-c], 128, mask=False)
    # The cut-away bands come back as black padding (about 0.15 * 1411 / 1392 * 128 = 19 rows)...
    assert np.all(cut[:15] == 0) and np.all(cut[-15:] == 0)
    # ...and the middle band is the same picture as the uncut photo's.
    band = slice(25, 103)
    assert np.abs(cut[band].astype(int) - full[band].astype(int)).mean() < 3.0


def test_ben_graham(retina: np.ndarray) -> None:
    plain = preprocess_fundus(retina, 128)
    bg = preprocess_fundus(retina, 128, ben_graham=True)
    assert bg.shape == plain.shape and bg.dtype == np.uint8
    assert np.abs(bg.astype(int) - plain.astype(int)).mean() > 20
    core = circular_mask(128, 128, margin=0.1)
    # Local mean removed and 128 added: every channel averages ~128, although the fundus itself is
    # far from gray (red ~210, blue ~60).
    np.testing.assert_allclose(bg[core].mean(axis=0), 128, atol=8)
    plain_means = plain[core].mean(axis=0)
    assert plain_means[0] > 180 and plain_means[2] < 90
    assert np.all(bg[~circular_mask(128, 128)] == 0)
    # Same as the chain of MONAI pieces: unmasked crop, then BenGraham (sigma 128 // 30 = 4), then mask.
    chw = preprocess_fundus(retina, 128, mask=False).transpose(2, 0, 1)
    chained = CircularMask()(BenGraham()(chw)).transpose(1, 2, 0)
    np.testing.assert_array_equal(chained, bg)


def test_ben_graham_sigma_uses_integer_division() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    default = BenGraham()(x)
    np.testing.assert_array_equal(default, BenGraham(sigma=2)(x))  # 64 // 30 == 2
    assert not np.array_equal(default, BenGraham(sigma=64 / 30)(x))
    # float in [0, 1] follows the same formula with 128 -> 128/255.
    f = BenGraham()(x.astype(np.float32) / 255)
    assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 1.0
    assert np.abs(f * 255 - default.astype(np.float32)).max() <= 0.51


# --------------------------------------------------------------------------------------------------
# MONAI transforms (channel-first)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retina_chw(retina: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(retina.transpose(2, 0, 1))


def test_fundus_preprocess_matches_numpy_path(retina: np.ndarray, retina_chw: np.ndarray) -> None:
    expected = preprocess_fundus(retina, 64, ben_graham=True)
    as_float = FundusPreprocess(64, ben_graham=True)(retina_chw)
    assert isinstance(as_float, torch.Tensor) and as_float.dtype == torch.float32
    assert as_float.shape == (3, 64, 64) and as_float.min() >= -1 and as_float.max() <= 1
    torch.testing.assert_close(as_float, to_model_range(expected))
    as_u8 = FundusPreprocess(64, ben_graham=True, output="uint8")(torch.from_numpy(retina_chw))
    assert as_u8.dtype == torch.uint8 and as_u8.shape == (3, 64, 64)
    np.testing.assert_array_equal(as_u8.numpy(), expected.transpose(2, 0, 1))


def test_fundus_crop(retina_chw: np.ndarray) -> None:
    out = FundusCrop()(retina_chw)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape[0] == 3 and out.shape[1] == out.shape[2]
    assert abs(out.shape[1] - 2 * REF_R) < 2 * TOL
    assert out.min() >= 0.0 and out.max() <= 1.0
    t = FundusCrop()(torch.from_numpy(retina_chw))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), out)
    gray = FundusCrop()(retina_chw[:1])  # one channel in, three out
    # Same circle to a fraction of a pixel (0.02 px measured), so the crop's side may round one pixel apart.
    assert gray.shape[0] == 3 and gray.shape[1] == gray.shape[2] and abs(gray.shape[1] - out.shape[1]) <= 1
    np.testing.assert_array_equal(gray[0], gray[2])


def test_circular_mask_transform_keeps_type_and_dtype() -> None:
    x = torch.full((2, 10, 12), 7, dtype=torch.int16)
    y = CircularMask(margin=0.0)(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.int16 and y.shape == x.shape
    m = torch.from_numpy(circular_mask(10, 12, 0.0).copy())
    assert torch.all(y[:, m] == 7) and torch.all(y[:, ~m] == 0)
    assert y[0, 0, 0] == 0 and y[0, 5, 6] == 7
    z = CircularMask()(np.ones((1, 9, 9), np.float32))
    assert z.dtype == np.float32 and z[0, 4, 4] == 1 and z[0, 0, 0] == 0
    assert circular_mask(64, 64, MASK_MARGIN).sum() < circular_mask(64, 64, 0.0).sum()


def _pairs() -> list[tuple[object, object]]:
    return [
        (FundusCrop(), FundusCropd(keys="image")),
        (CircularMask(), CircularMaskd(keys="image")),
        (BenGraham(), BenGrahamd(keys="image")),
        (
            FundusPreprocess(48, ben_graham=True),
            FundusPreprocessd(keys="image", resolution=48, ben_graham=True),
        ),
        (
            FundusPreprocess(48, output="uint8"),
            FundusPreprocessd(keys="image", resolution=48, output="uint8"),
        ),
    ]


@pytest.mark.parametrize("index", range(len(_pairs())))
def test_array_and_dict_transforms_agree(retina: np.ndarray, index: int) -> None:
    array_t, dict_t = _pairs()[index]
    small = cv2.resize(retina, (300, 300), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    small_t = torch.from_numpy(np.ascontiguousarray(small))
    a = array_t(small_t)  # type: ignore[operator]
    d = dict_t({"image": small_t, "label": 3})  # type: ignore[operator]
    assert d["label"] == 3
    assert type(d["image"]) is type(a)
    torch.testing.assert_close(d["image"], a, rtol=0, atol=0)


def test_dict_transforms_in_compose_and_missing_keys(retina_chw: np.ndarray) -> None:
    pipe = Compose([FundusPreprocessd(keys="image", resolution=32)])
    out = pipe({"image": retina_chw, "grade": 2})
    assert out["image"].shape == (3, 32, 32) and out["grade"] == 2
    with pytest.raises(KeyError):
        FundusPreprocessd(keys="image", resolution=32)({"other": retina_chw})
    assert FundusPreprocessd(keys="image", resolution=32, allow_missing_keys=True)({"x": 1}) == {"x": 1}


@pytest.mark.parametrize(
    "transform", [FundusCrop(), BenGraham(), FundusPreprocess(32)], ids=lambda t: type(t).__name__
)
def test_transforms_reject_channel_last(retina: np.ndarray, transform: object) -> None:
    with pytest.raises(ValueError, match="channel-first"):
        transform(retina)  # type: ignore[operator]  # [H, W, 3]
    with pytest.raises(ValueError):
        transform(retina[:, :, 0])  # type: ignore[operator]  # [H, W]
    with pytest.raises(ValueError):
        transform(torch.zeros(1, 3, 8, 8))  # type: ignore[operator]  # batched


def test_transform_constructor_validation() -> None:
    with pytest.raises(ValueError):
        FundusPreprocess(64, output="png")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FundusPreprocess(0)
    with pytest.raises(ValueError):
        CircularMask(margin=1.5)
    with pytest.raises(ValueError):
        BenGraham(sigma=0)
    with pytest.raises(ValueError):
        CircularMask()(np.zeros((8, 8)))


def test_the_data_layer_and_training_start_without_importing_monai() -> None:
    """Importing MONAI takes seconds; every `retinagen prepare` worker and every training process imports the
    data layer, so only the MONAI transforms (retinagen.data.fundus) import it."""
    import subprocess
    import sys

    code = ("import sys, retinagen.data.prepare, retinagen.training.loop, retinagen.generation, clinical.anomaly; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
