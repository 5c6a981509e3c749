"""MONAI array and dictionary transforms of the fundus preprocessing (channel-first ``[C, H, W]``).

`FundusCrop`, `CircularMask`, `BenGraham` and `FundusPreprocess` (and their ``...d`` dict variants) run the
numpy steps of `retinagen.data.preprocess` inside a MONAI pipeline. The numpy steps live in
`retinagen.data.preprocess`, which the product imports, so that every worker of ``retinagen prepare``
and every training process starts without importing MONAI (seconds); this module re-exports them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Literal

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type

from retinagen.checks import check, int_in
from retinagen.data.fov import FOV, detect_fov
from retinagen.data.pixels import as_hwc, rgb_float, to_rgb_float, value_scale
from retinagen.data.preprocess import (
    MASK_MARGIN,
    _ben_graham_255,
    _ben_graham_sigma,
    _square_crop,
    circular_mask,
    preprocess_fundus,
    to_model_range,
)

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
        self.resolution = check(int_in(8), resolution, "resolution")
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
