"""Fundus photograph preprocessing: field-of-view (FOV) detection (`retinagen.data.fov`), square crop, resize, circular mask,
optional Ben Graham local-contrast normalisation, and scaling to the model's [-1, 1] range.

Layout conventions (read these before calling anything):

- The numpy functions (`detect_fov`, `to_rgb_float`, `preprocess_fundus`) take CHANNEL-LAST images,
  ``[H, W]`` or ``[H, W, C]`` with C in (1, 3, 4), RGB(A) order (not OpenCV's BGR), as decoded from
  a file by PIL / imageio. MONAI's `PILReader` returns ``(W, H, C)`` unless told otherwise:
  transpose such arrays before calling these functions.
- The MONAI transforms (`FundusCrop`, `CircularMask`, `BenGraham`, `FundusPreprocess` and their
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
from collections.abc import Hashable, Mapping
from functools import lru_cache
from typing import Any, Literal

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type

from retinagen.data.fov import FOV, detect_fov
from retinagen.data.pixels import as_hwc, resize, rgb_float, to_rgb_float, value_scale

__all__ = [
    "FOV",
    "MASK_MARGIN",
    "BenGraham",
    "BenGrahamd",
    "CircularMask",
    "CircularMaskd",
    "FundusCrop",
    "FundusCropd",
    "FundusPreprocess",
    "FundusPreprocessd",
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
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
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


# ---------------------------------------------------------------------------------------------------
# MONAI transforms (channel-first)
# ---------------------------------------------------------------------------------------------------


def _chw_numpy(img: Any, who: str) -> np.ndarray:
    """Channel-first numpy/torch [C, H, W] -> contiguous numpy [H, W, C] (validated like `as_hwc`)."""
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{who}: expected a numpy array or torch tensor [C, H, W], got {type(img).__name__}")
    if img.ndim != 3 or img.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"{who}: expected a channel-first image [C, H, W] with C in (1, 3, 4), got shape "
            f"{tuple(img.shape)} (channel-last [H, W, C] arrays go to the numpy functions instead)"
        )
    arr, *_ = convert_data_type(img, output_type=np.ndarray)
    # One contiguous copy here, not one per cv2 call on a strided view; cv2.merge interleaves planes
    # ~30x faster than numpy's transpose copy.
    if arr.shape[0] > 1 and arr.dtype in (np.uint8, np.uint16, np.float32, np.float64):
        hwc = cv2.merge([np.ascontiguousarray(plane) for plane in arr])
    else:
        hwc = np.ascontiguousarray(np.moveaxis(arr, 0, -1))
    return as_hwc(hwc, who)


def _like_input(out: np.ndarray, img: Any) -> np.ndarray | torch.Tensor:
    """numpy stays numpy; a tensor (MetaTensor too) becomes a plain tensor on the input's device.

    Plain, because a crop/resize invalidates a MetaTensor's affine and we do not track geometry.
    """
    if isinstance(img, torch.Tensor):
        return torch.as_tensor(np.ascontiguousarray(out)).to(img.device)
    return np.ascontiguousarray(out)


class FundusCrop(Transform):
    """Detect the FOV and crop a square of side round(2 * radius) around it (black padding where the
    square leaves the image).

    In: channel-first [C, H, W], C in (1, 3, 4), uint8 / uint16 / float in [0, 1], numpy or torch.
    Out: float32 [3, S, S] in [0, 1] (gray replicated, RGBA composited on black), same container
    type as the input. Raises NoFundusError if there is no fundus.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __call__(self, img: Any) -> np.ndarray | torch.Tensor:
        hwc = _chw_numpy(img, "FundusCrop")
        crop = _square_crop(hwc, detect_fov(hwc))
        return _like_input(rgb_float(crop, value_scale(hwc)).transpose(2, 0, 1), img)


class CircularMask(Transform):
    """Zero everything outside the centred circle of radius min(H, W) / 2 * (1 - margin).

    In/out: channel-first [C, H, W], any dtype, numpy or torch; dtype, device and type are kept.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, margin: float = MASK_MARGIN) -> None:
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.margin = margin

    def __call__(self, img: Any) -> np.ndarray | torch.Tensor:
        if not isinstance(img, (np.ndarray, torch.Tensor)) or img.ndim != 3:
            raise ValueError(
                f"CircularMask: expected a channel-first [C, H, W] array/tensor, got "
                f"{tuple(getattr(img, 'shape', ()))}"
            )
        m = circular_mask(int(img.shape[1]), int(img.shape[2]), self.margin)
        if isinstance(img, torch.Tensor):
            keep = torch.from_numpy(m.copy()).to(img.device)
            return torch.where(keep[None], img, torch.zeros((), dtype=img.dtype, device=img.device))
        return np.where(m[None], img, np.zeros((), dtype=img.dtype))


class BenGraham(Transform):
    """Ben Graham local-contrast normalisation: 4 * img - 4 * GaussianBlur(img, sigma) + 128 (in 0..255
    units), clipped. sigma defaults to min(H, W) // 30 (at least 1).

    In: channel-first [C, H, W], C in (1, 3), numpy or torch. uint8 in -> uint8 out (rounded); any
    other accepted dtype (uint16, float in [0, 1]) -> float32 in [0, 1] (offset 128/255). Same
    container type as the input. No mask: follow with CircularMask to blank the surround.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, sigma: float | None = None) -> None:
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma

    def __call__(self, img: Any) -> np.ndarray | torch.Tensor:
        hwc = _chw_numpy(img, "BenGraham")
        if hwc.shape[2] not in (1, 3):
            raise ValueError(f"BenGraham: expected 1 or 3 channels, got {hwc.shape[2]}")
        sigma = self.sigma if self.sigma is not None else _ben_graham_sigma(min(hwc.shape[:2]))
        f = hwc.astype(np.float32) * np.float32(255.0 / value_scale(hwc))
        out = _ben_graham_255(np.ascontiguousarray(f), sigma)
        res = (out + 0.5).astype(np.uint8) if hwc.dtype == np.uint8 else (out / 255.0).astype(np.float32)
        return _like_input(res.transpose(2, 0, 1), img)


class FundusPreprocess(Transform):
    """The whole chain, `preprocess_fundus`, as a MONAI transform.

    In: channel-first [C, H, W], C in (1, 3, 4), uint8 / uint16 / float in [0, 1], numpy or torch.
    Out (always a torch tensor): output="float" -> float32 [3, R, R] in [-1, 1] (model input);
    output="uint8" -> uint8 [3, R, R]. Raises NoFundusError if there is no fundus.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(
        self,
        resolution: int,
        ben_graham: bool = False,
        mask: bool = True,
        output: Literal["float", "uint8"] = "float",
    ) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f'output must be "float" or "uint8", got {output!r}')
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8:
            raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
        self.resolution = resolution
        self.ben_graham = ben_graham
        self.mask = mask
        self.output = output

    def __call__(self, img: Any) -> torch.Tensor:
        hwc = _chw_numpy(img, "FundusPreprocess")
        u8 = preprocess_fundus(hwc, self.resolution, ben_graham=self.ben_graham, mask=self.mask)
        if self.output == "uint8":
            return torch.from_numpy(np.ascontiguousarray(u8.transpose(2, 0, 1)))
        return to_model_range(u8)


class _ArrayToDict(MapTransform):
    """Apply `self.transform` (an array transform) to each key of a dict; other keys pass through."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class FundusCropd(_ArrayToDict):
    """Dict version of `FundusCrop` (channel-first [C, H, W] under each key)."""

    backend = FundusCrop.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = FundusCrop()


class CircularMaskd(_ArrayToDict):
    """Dict version of `CircularMask` (channel-first [C, H, W] under each key)."""

    backend = CircularMask.backend

    def __init__(
        self, keys: KeysCollection, margin: float = MASK_MARGIN, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CircularMask(margin)


class BenGrahamd(_ArrayToDict):
    """Dict version of `BenGraham` (channel-first [C, H, W] under each key)."""

    backend = BenGraham.backend

    def __init__(
        self, keys: KeysCollection, sigma: float | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = BenGraham(sigma)


class FundusPreprocessd(_ArrayToDict):
    """Dict version of `FundusPreprocess` (channel-first [C, H, W] under each key)."""

    backend = FundusPreprocess.backend

    def __init__(
        self,
        keys: KeysCollection,
        resolution: int,
        ben_graham: bool = False,
        mask: bool = True,
        output: Literal["float", "uint8"] = "float",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = FundusPreprocess(resolution, ben_graham=ben_graham, mask=mask, output=output)
