"""The helpers every report writer shares."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from retinagen.reporting import figure_png, jsonable


def test_jsonable_gives_strict_json() -> None:
    raw = {1: np.float32(0.5), "nan": float("nan"), "inf": np.float64(math.inf), "i": np.int64(3),
           "b": np.bool_(True), "arr": np.arange(3), "t": torch.tensor([1.5, float("nan")]),
           "p": Path("/x/y"), "nested": ({"k": np.int8(-1)}, [np.float16(2.0)])}
    out = jsonable(raw)
    assert out == {"1": 0.5, "nan": None, "inf": None, "i": 3, "b": True, "arr": [0, 1, 2], "t": [1.5, None],
                   "p": "/x/y", "nested": [{"k": -1}, [2.0]]}
    json.dumps(out, allow_nan=False)  # strict: would raise on a NaN left in
    assert type(out["i"]) is int and type(out["b"]) is bool


def test_figure_png_is_a_png() -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    png = figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 500
