"""Fundus photograph preprocessing (numpy; the same steps as MONAI transforms are in `retinagen.data.fundus`): field-of-view (FOV) detection (`retinagen.data.fov`), square crop, resize, circular mask,
optional Ben Graham local-contrast normalisation, and scaling to the model's [-1, 1] range.

Layout conventions (read these before calling anything):

- The numpy functions (`detect_fov`, `to_rgb_float`, `preprocess_fundus`) take CHANNEL-LAST images,
  ``[H, W]`` or ``[H, W, C]`` with C in (1, 3, 4), RGB(A) order (not OpenCV's BGR), as decoded from
  a file by PIL / imageio. MONAI's `PILReader` returns ``(W, H, C)`` unless told otherwise:
  transpose such arrays before calling these functions.
- The MONAI transforms (`retinagen.data.fundus`: `FundusCrop`, `CircularMask`, `BenGraham`, `FundusPreprocess` and their
  ``...d`` dict variants) take CHANNEL-FIRST ``[C, H, W]`` numpy arrays or torch tensors, like the
  rest of MONAI.
- Accepted dtypes: uint8, uint16, float16/32/64 in [0, 1]. uint16 is divided by 65535, except when
  every value fits in 12 bits (max <= 4095): then it is taken as 12-bit data (common for fundus
  cameras and DICOM with BitsStored = 12) and divided by 4095. The only image this misreads is a
  true 16-bit image that is 16x underexposed, which is useless anyway.
- Coordinates: x = column, y = row, pixel centres at integer indices.

Why not MONAI's `CropForeground`: its default ``> 0`` keeps JPEG noise in the black surround and it
cannot recover a circle that the frame cuts off (EyePACS). Why no flips anywhere here: flipping a
fundus swaps left/right eye laterality, which is a label. Everything here is deterministic.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
import torch

from retinagen.checks import check, int_in
from retinagen.data.fov import FOV, detect_fov
from retinagen.data.pixels import as_hwc, resize, rgb_float, to_rgb_float, value_scale

__all__ = [
    "FOV",
    "MASK_MARGIN",
    "circular_mask",
    "detect_fov",
    "preprocess_fundus",
    "to_model_range",
    "to_rgb_float",
]

# Fraction of the radius by which the circular mask is pulled in, to hide the soft (resampled) rim.
MASK_MARGIN = 0.02


# ---------------------------------------------------------------------------------------------------
# Crop, mask, Ben Graham, full chain (numpy, channel-last)
# ---------------------------------------------------------------------------------------------------


def _check_fov(fov: FOV) -> None:
    if not isinstance(fov, FOV):
        raise ValueError(f"fov must be a FOV, got {type(fov).__name__}")
    if not all(math.isfinite(v) for v in (fov.cx, fov.cy, fov.radius)) or fov.radius <= 0:
        raise ValueError(f"fov must have a finite centre and a positive radius, got {fov}")


def _square_crop(img: np.ndarray, fov: FOV) -> np.ndarray:
    """[H, W, C] -> [S, S, C] in the same dtype, S = round(2 * radius), centred on the FOV.

    Where the square leaves the image (frame-cut FOVs), it is padded with zeros (black).
    """
    h, w, c = img.shape
    side = max(1, round(2 * fov.radius))
    # In edge coordinates (pixel i spans [i, i + 1)) the circle's centre is at cx + 0.5.
    x0 = round(fov.cx + 0.5 - side / 2)
    y0 = round(fov.cy + 0.5 - side / 2)
    x1, y1 = x0 + side, y0 + side
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return img[y0:y1, x0:x1]
    out = np.zeros((side, side, c), dtype=img.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


@lru_cache(maxsize=32)
def _circular_mask_cached(height: int, width: int, margin: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    rad = 0.5 * min(height, width) * (1.0 - margin)
    m = (xx - cx) ** 2 + (yy - cy) ** 2 <= rad * rad
    m.flags.writeable = False
    return m


def circular_mask(height: int, width: int, margin: float = MASK_MARGIN) -> np.ndarray:
    """bool [height, width]: True inside the centred circle of radius min(H, W) / 2 * (1 - margin)."""
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    return _circular_mask_cached(int(height), int(width), float(margin))


def _ben_graham_255(f: np.ndarray, sigma: float) -> np.ndarray:
    """Ben Graham (Kaggle DR 2015): 4 * img - 4 * GaussianBlur(img, sigma) + 128, on float32 in
    0..255 units, clipped to [0, 255]. f: [H, W, C] float32 (C <= 4)."""
    blur = cv2.GaussianBlur(f, (0, 0), sigmaX=sigma)
    if blur.ndim == 2:
        blur = blur[:, :, None]
    return np.clip(4.0 * f - 4.0 * blur + 128.0, 0.0, 255.0)


def _ben_graham_sigma(resolution: int) -> int:
    # Python-3 integer division as in the original (resolution / 30 under Python 2); at least 1 so
    # tiny images still get a blur.
    return max(1, resolution // 30)


def preprocess_fundus(
    img: np.ndarray,
    resolution: int,
    *,
    ben_graham: bool = False,
    mask: bool = True,
    fov: FOV | None = None,
) -> np.ndarray:
    """Fundus photograph -> uint8 [resolution, resolution, 3] RGB (channel-last), what `prepare` stores.

    img: channel-last [H, W] or [H, W, C], C in (1, 3, 4), uint8 / uint16 / float in [0, 1].
    Steps: detect the FOV (unless `fov` is given); crop a square of side 2 * radius centred on it,
    black where the square leaves the image; resize (INTER_AREA when shrinking); optionally Ben
    Graham normalisation with sigma = resolution // 30; zero outside the circle of radius
    resolution / 2 * (1 - MASK_MARGIN) if `mask`. Deterministic. Raises NoFundusError from
    detection, ValueError on bad shapes/dtypes.
    """
    resolution = check(int_in(8), resolution, "resolution")
    arr = as_hwc(img)
    if fov is None:
        fov = detect_fov(arr)
    _check_fov(fov)
    crop = _square_crop(arr, fov)
    if arr.dtype == np.uint8 and arr.shape[2] == 3:
        # Fast path for the common case: resample uint8 directly (cv2's uint8 INTER_AREA is exact
        # fixed-point box filtering), no float copy of the full-resolution image.
        out = resize(crop, resolution, resolution)
    else:
        rgb = resize(rgb_float(crop, value_scale(arr)), resolution, resolution)
        out = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if ben_graham:
        out = (_ben_graham_255(out.astype(np.float32), _ben_graham_sigma(resolution)) + 0.5).astype(np.uint8)
    if mask:
        out = out * circular_mask(resolution, resolution)[:, :, None].astype(np.uint8)
    return np.ascontiguousarray(out)


def to_model_range(img_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] (channel-last) or [3, H, W] (channel-first) -> float32 [3, H, W] in [-1, 1].

    Layout: a numpy array whose last axis is 3 is read as channel-last, otherwise channel-first; a
    torch tensor whose first axis is 3 is read as channel-first, otherwise channel-last (the
    conventions of each library, which only matter for the ambiguous [3, H, 3] shape).
    """
    is_torch = isinstance(img_u8, torch.Tensor)
    t = img_u8.detach().cpu() if is_torch else torch.from_numpy(np.ascontiguousarray(img_u8))
    if t.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8, got {t.dtype}")
    if t.ndim != 3 or (t.shape[0] != 3 and t.shape[-1] != 3):
        raise ValueError(f"to_model_range expects [H, W, 3] or [3, H, W], got shape {tuple(t.shape)}")
    channel_first = t.shape[0] == 3 if is_torch else t.shape[-1] != 3
    if not channel_first:
        t = t.permute(2, 0, 1)
    return t.to(torch.float32).div(127.5).sub(1.0).contiguous()

