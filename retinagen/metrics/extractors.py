"""Feature extractors for Fréchet distances: the uint8-image -> feature contract, its registry, Inception-v3.

`FeatureExtractor` maps uint8 [B, 3, H, W] to float [B, D]; extractors are registered by name
(`register_extractor` / `create_extractor`), the way scorers and metrics are. ``"inception-v3"`` is built in
and reads its weights from a local file only (`resolve_inception_weights`, checked by
`verify_inception_weights` before anything unpickles it); ``fd_fundus`` and test extractors register
themselves. Every registered extractor can also run inside torch-fidelity (`torch_fidelity_extractor_name`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinagen.errors import RetinagenError
from retinagen.fileio import sha256_file

__all__ = [
    "INCEPTION_ENV_VAR",
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_WEIGHTS_FILENAME",
    "ExtractorFactory",
    "FeatureExtractor",
    "InceptionV3Extractor",
    "MetricUnavailable",
    "create_extractor",
    "register_extractor",
    "registered_extractors",
    "resolve_inception_weights",
    "state_dict_sha256",
    "torch_fidelity_extractor_name",
    "verify_inception_weights",
]

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch-hub naming convention: the hex in the file name is a prefix of the file's SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_ENV_VAR = "RETINAGEN_INCEPTION_WEIGHTS"


class MetricUnavailable(RetinagenError):
    """A metric cannot run here (e.g. FID without the Inception weights file); the rest of a report can."""



# ================================================================================= feature extractors
class FeatureExtractor(nn.Module):
    """Maps images uint8 [B, 3, H, W] (0..255, RGB) to features float32 [B, feature_dim].

    Subclasses implement `extract`; ``forward`` checks shapes and types on both sides. ``weights_id`` names the
    weights (e.g. their SHA-256), so that cached real-data statistics are never reused across different weights.
    Extractors must be per-image (a row's features may not depend on the rest of the batch) so that statistics
    do not depend on the batch size.
    """

    def __init__(self, name: str, feature_dim: int, weights_id: str) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        self.name = name
        self.feature_dim = feature_dim
        self.weights_id = weights_id

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for t in [*self.parameters(), *self.buffers()]:
            return t.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError(f"{self.name}: images must be a uint8 tensor [B, 3, H, W]")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B, 3, H, W], got {tuple(images.shape)}")
        out = self.extract(images)
        if out.ndim != 2 or out.shape != (images.shape[0], self.feature_dim):
            raise RuntimeError(
                f"{self.name}: extractor returned {tuple(out.shape)}, expected [{images.shape[0]}, {self.feature_dim}]"
            )
        return out.float()


ExtractorFactory = Callable[[str | Path | None], FeatureExtractor]
_EXTRACTORS: dict[str, ExtractorFactory] = {}


def register_extractor(name: str, factory: ExtractorFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(weights_path_or_None) -> FeatureExtractor`` under ``name`` (e.g. ``"fd_fundus"``)."""
    if not name or name.strip() != name or "/" in name or os.sep in name:
        raise ValueError(f"bad extractor name {name!r}")
    if not callable(factory):
        raise TypeError("factory must be callable")
    if name in _EXTRACTORS and not overwrite:
        raise ValueError(f"feature extractor {name!r} is already registered")
    _EXTRACTORS[name] = factory


def registered_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def create_extractor(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """Build a registered extractor in eval mode without gradients, on ``device``.

    Raises `MetricUnavailable` when the extractor cannot be built here (e.g. missing Inception weights).
    """
    if name not in _EXTRACTORS:
        known = ", ".join(registered_extractors()) or "none"
        raise MetricUnavailable(f"no feature extractor named {name!r} is registered (known: {known})")
    extractor = _EXTRACTORS[name](weights)
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"factory for {name!r} returned {type(extractor).__name__}, not a FeatureExtractor")
    return extractor.to(torch.device(device)).eval().requires_grad_(False)


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in key order): a weights id."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- Inception weights
def _hub_checkpoints_dir() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME (default ~/.cache/torch) and torch.hub.set_dir().
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_weights_message(problem: str) -> str:
    return (
        f"FID/KID unavailable: {problem}. The Inception-v3 weights file {INCEPTION_WEIGHTS_FILENAME} "
        f"(torch-fidelity's FID weights) cannot be downloaded here; provide it in one of three ways: "
        f"(1) pass --inception-weights PATH; "
        f"(2) set the environment variable {INCEPTION_ENV_VAR}=PATH; "
        f"(3) copy it into the torch hub cache $TORCH_HOME/hub/checkpoints/ (here: {_hub_checkpoints_dir()})"
    )


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$RETINAGEN_INCEPTION_WEIGHTS``, else the torch hub cache.

    Never downloads. Raises `MetricUnavailable`, naming all three ways, when the chosen file does not exist.
    A path given explicitly (argument or variable) that does not exist is an error, not a fall-through, so a
    typo is reported rather than silently replaced by another file.
    """
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.is_file():
            raise MetricUnavailable(_missing_weights_message(f"--inception-weights {p} is not a file"))
        return p
    env = os.environ.get(INCEPTION_ENV_VAR, "")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise MetricUnavailable(_missing_weights_message(f"{INCEPTION_ENV_VAR}={p} is not a file"))
        return p
    p = _hub_checkpoints_dir() / INCEPTION_WEIGHTS_FILENAME
    if not p.is_file():
        raise MetricUnavailable(_missing_weights_message(f"no {INCEPTION_WEIGHTS_FILENAME} found"))
    return p


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_inception_weights(path: str | Path) -> str:
    """Check a user-supplied Inception weights file before anything unpickles it; returns its SHA-256.

    torch-fidelity loads this file with ``torch.load(path, weights_only=False)``, i.e. a full unpickler. The
    file is not ours: the user supplies it. So first (1) its SHA-256 must start with 6726825d, the hash in the
    official file name (torch-hub convention), and (2) it must load with ``torch.load(weights_only=True)`` (the
    restricted unpickler that only rebuilds tensors and plain containers) as a dict of tensors. Only then is the
    path handed to torch-fidelity. Results are remembered per (path, size, mtime) for this process.
    """
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo in _VERIFIED:
        return _VERIFIED[memo]
    digest = sha256_file(p)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise MetricUnavailable(
            _missing_weights_message(
                f"{p} is not the expected weights file (SHA-256 {digest[:16]}... does not start with "
                f"{INCEPTION_SHA256_PREFIX}, the hash in its official name)"
            )
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means "not a plain tensor file"
        raise MetricUnavailable(
            _missing_weights_message(f"{p} does not load as plain tensors ({type(exc).__name__})")
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricUnavailable(_missing_weights_message(f"{p} is not a state dict of tensors"))
    _VERIFIED[memo] = digest
    return digest


class InceptionV3Extractor(FeatureExtractor):
    """torch-fidelity's TF-compatible Inception-v3, 2048-d pool features (the standard FID features)."""

    def __init__(self, weights: str | Path | None = None) -> None:
        path = resolve_inception_weights(weights)
        digest = verify_inception_weights(path)
        super().__init__("inception-v3", 2048, digest)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = path
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


register_extractor("inception-v3", InceptionV3Extractor, overwrite=True)


# ------------------------------------------------------------------------- torch-fidelity adapters
_TF_PREFIX = "retinagen-"


@lru_cache(maxsize=1)
def _torch_fidelity_adapter_class() -> type:
    # Built lazily: importing torch_fidelity costs seconds (torchvision, CLIP, ...).
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class RetinagenFeatureExtractor(FeatureExtractorBase):
        """A retinagen `FeatureExtractor` seen by torch-fidelity: one feature layer named ``"features"``."""

        def __init__(
            self,
            name: str,
            features_list: Sequence[str],
            feature_extractor_weights_path: str | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(name, list(features_list))
            if not name.startswith(_TF_PREFIX):
                raise ValueError(f"torch-fidelity extractor name {name!r} lacks the {_TF_PREFIX!r} prefix")
            self.inner = create_extractor(name[len(_TF_PREFIX) :], weights=feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "features"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.inner(x),)

    return RetinagenFeatureExtractor


def torch_fidelity_extractor_name(name: str) -> str:
    """Register retinagen extractor ``name`` with torch-fidelity (once) and return its name there.

    ``"inception-v3"`` maps to torch-fidelity's own ``"inception-v3-compat"``; any other registered extractor
    (``fd_fundus``, test extractors) runs through an adapter registered as ``"retinagen-<name>"``, with the
    weights path passed as torch-fidelity's ``feature_extractor_weights_path``.
    """
    if name == "inception-v3":
        return "inception-v3-compat"
    if name not in _EXTRACTORS:
        raise MetricUnavailable(f"no feature extractor named {name!r} is registered")
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    tf_name = _TF_PREFIX + name
    if tf_name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(tf_name, _torch_fidelity_adapter_class())
    return tf_name
