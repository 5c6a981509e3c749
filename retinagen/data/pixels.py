"""Pixel formats of fundus photographs: the channel-last arrays `retinagen.data.preprocess` accepts, and conversions.

Accepted: ``[H, W]`` or ``[H, W, C]`` with C in (1, 3, 4), RGB(A) order; uint8, uint16, or float16/32/64 in
[0, 1]. uint16 is divided by 65535, except when every value fits in 12 bits (max <= 4095): then it is taken as
12-bit data (fundus cameras, DICOM with BitsStored = 12) and divided by 4095.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

__all__ = ["FLOAT_DTYPES", "as_hwc", "cv2_ready", "resize", "rgb_float", "to_rgb_float", "value_scale"]

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def as_hwc(img: np.ndarray, name: str = "img") -> np.ndarray:
    """Validate a channel-last image and return it as [H, W, C] (a view where possible)."""
    if isinstance(img, torch.Tensor):
        raise ValueError(
            f"{name}: expected a channel-last numpy array [H, W] or [H, W, C]; got a torch tensor "
            "(use the MONAI transforms for channel-first tensors)"
        )
    if not isinstance(img, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected a channel-last image [H, W] or [H, W, C] with C in (1, 3, 4), "
            f"got shape {tuple(img.shape)}"
        )
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {tuple(img.shape)}")
    if img.dtype not in (np.uint8, np.uint16) and img.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype must be uint8, uint16 or float in [0, 1], got {img.dtype}")
    if img.dtype in FLOAT_DTYPES:
        lo, hi = float(np.min(img)), float(np.max(img))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{name}: float images must be finite and in [0, 1], got range [{lo}, {hi}]")
    return img


def value_scale(img: np.ndarray) -> float:
    """The number that maps `img`'s integer values to [0, 1] (1.0 for floats). See module docstring."""
    if img.dtype == np.uint8:
        return 255.0
    if img.dtype == np.uint16:
        return 4095.0 if int(img.max()) <= 4095 else 65535.0
    return 1.0


def rgb_float(img: np.ndarray, scale: float) -> np.ndarray:
    """[H, W, C] any accepted dtype -> float32 [H, W, 3] in [0, 1]; `scale` from `value_scale`."""
    f = img.astype(np.float32)
    if scale != 1.0:
        f *= np.float32(1.0 / scale)
    else:
        np.clip(f, 0.0, 1.0, out=f)  # floats may carry tiny rounding excursions
    c = f.shape[2]
    if c == 1:
        f = np.repeat(f, 3, axis=2)
    elif c == 4:
        f = f[:, :, :3] * f[:, :, 3:4]  # composite on black (the fundus surround colour)
    return np.ascontiguousarray(f)


def to_rgb_float(img: np.ndarray) -> np.ndarray:
    """Any accepted image -> float32 [H, W, 3] RGB in [0, 1] (channel-last in and out).

    img: [H, W] or [H, W, C], C in (1, 3, 4); uint8 (/255), uint16 (/65535, or /4095 when every value
        fits in 12 bits), or float in [0, 1]. Gray is replicated to 3 channels; RGBA is composited on
        black (rgb * alpha).
    """
    arr = as_hwc(img)
    return rgb_float(arr, value_scale(arr))


def cv2_ready(img: np.ndarray) -> np.ndarray:
    """OpenCV wants contiguous arrays and has no float16 resize."""
    if img.dtype == np.float16:
        img = img.astype(np.float32)
    return np.ascontiguousarray(img)


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize that keeps the channel axis ([H, W, 1] stays 3-D).

    INTER_AREA when shrinking: it is an exact box filter for any ratio, so no aliasing of vessels
    and JPEG noise; bilinear when enlarging (INTER_AREA degenerates to it there anyway). cv2 rather
    than monai.transforms.Resize: it works on uint8 natively and is several times faster on CPU.
    """
    shrinking = width < img.shape[1] or height < img.shape[0]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(cv2_ready(img), (width, height), interpolation=interp)
    if out.ndim == 2:
        out = out[:, :, None]
    return out
