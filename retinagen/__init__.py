"""retinagen: InfoStyleGAN (StyleGAN + InfoGAN mutual information) for retinal fundus images."""

from retinagen.errors import (
    BadInputError,
    CheckpointError,
    ConfigError,
    DicomError,
    ImageDecodeError,
    NoFundusError,
    RetinagenError,
    UnsafePathError,
)

__version__ = "0.1.0"

__all__ = [
    "BadInputError",
    "CheckpointError",
    "ConfigError",
    "DicomError",
    "ImageDecodeError",
    "NoFundusError",
    "RetinagenError",
    "UnsafePathError",
    "__version__",
]
