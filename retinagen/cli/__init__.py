"""The ``retinagen`` command line.

Exit codes: 0 success, 2 bad usage or bad input (a `RetinagenError`), 1 internal error (a bug).
Heavy imports (torch, monai) happen inside the commands, so ``retinagen --help`` is instant. The app and
``main`` live in :mod:`retinagen.cli.app`; each ``*_commands`` module registers its commands on it (imported
here in the order ``retinagen --help`` lists them).
"""

from __future__ import annotations

# isort: off
# Registration order is the order `retinagen --help` lists the commands in.
from retinagen.cli import data_commands  # noqa: F401
from retinagen.cli import model_commands  # noqa: F401
from retinagen.cli import metric_commands  # noqa: F401
from retinagen.cli import clinical_commands  # noqa: F401
from retinagen.cli import dashboard_command  # noqa: F401
# isort: on
from retinagen.cli.app import app, main
from retinagen.cli.clinical_commands import (
    anomaly_benchmark,
    anomaly_evaluate,
    anomaly_fit,
    anomaly_score,
    downstream,
    rebalance,
)
from retinagen.cli.dashboard_command import dashboard
from retinagen.cli.data_commands import prepare, synth
from retinagen.cli.metric_commands import compare, discover, evaluate
from retinagen.cli.model_commands import generate, train, traverse

__all__ = [
    "anomaly_benchmark", "anomaly_evaluate", "anomaly_fit", "anomaly_score", "app", "compare", "dashboard",
    "discover", "downstream", "evaluate", "generate", "main", "prepare", "rebalance", "synth", "train", "traverse",
]
