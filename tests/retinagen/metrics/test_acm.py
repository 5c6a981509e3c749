"""Attribute Control Metric: curves -> consistency, margins, marks, model traversals and review strips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retinagen.metrics.acm import (
    REVIEW_INDEX_NAME,
    acm_for_code,
    acm_from_curves,
    acm_from_marks,
    attribute_curves,
    margin95,
    write_review_set,
)

STEPS = 7


def _ramp(n: int, slope: float = 1.0) -> np.ndarray:
    return np.tile(np.linspace(0, 1, STEPS) * slope, (n, 1))


def _zigzag(n: int) -> np.ndarray:
    return np.tile(np.array([0.0, 1.0, 0.2, 1.2, 0.4, 1.4, 0.6]), (n, 1))  # net up, never monotone


# ========================================================================================= curves
def test_monotone_increasing_curves_are_all_consistent() -> None:
    rng = np.random.default_rng(0)
    curves = np.cumsum(rng.uniform(0.05, 1.0, size=(100, STEPS)), axis=1)  # different but all increasing
    r = acm_from_curves(curves, min_effect=0.1)
    assert r.percent == 100.0 and r.direction == 1 and r.n == 100
    assert r.margin95 == 0.0 and r.consistent.all()


def test_decreasing_curves_are_consistent_in_the_falling_direction() -> None:
    r = acm_from_curves(-_ramp(50), min_effect=0.5)
    assert r.percent == 100.0 and r.direction == -1


def test_random_curves_score_low() -> None:
    curves = np.random.default_rng(1).normal(size=(200, STEPS))
    assert acm_from_curves(curves, min_effect=0.0).percent < 5.0


def test_mixed_curves_give_the_exact_fraction() -> None:
    curves = np.concatenate([_ramp(63), _zigzag(37)])
    r = acm_from_curves(curves, min_effect=0.5)
    assert r.percent == pytest.approx(63.0)
    assert r.consistent.tolist() == [True] * 63 + [False] * 37
    assert r.to_json()["n_consistent"] == 63


def test_direction_follows_the_majority() -> None:
    up, down = _ramp(70), -_ramp(30)
    r = acm_from_curves(np.concatenate([up, down]), min_effect=0.5)
    assert r.direction == 1 and r.percent == pytest.approx(70.0)
    r = acm_from_curves(np.concatenate([up[:30], down, -_ramp(40)]), min_effect=0.5)
    assert r.direction == -1 and r.percent == pytest.approx(70.0)


def test_min_effect_filters_small_changes_and_flat_curves_never_count() -> None:
    curves = np.concatenate([_ramp(10, slope=2.0), _ramp(10, slope=0.5)])
    assert acm_from_curves(curves, min_effect=1.0).percent == pytest.approx(50.0)
    assert acm_from_curves(curves, min_effect=0.25).percent == pytest.approx(100.0)
    assert acm_from_curves(np.zeros((5, STEPS)), min_effect=0.0).percent == 0.0


def test_ties_within_tolerance_are_allowed() -> None:
    flat_step = np.array([[0.0, 1.0, 1.0, 2.0]])
    assert acm_from_curves(flat_step, min_effect=1.0).percent == 100.0
    small_dip = np.array([[0.0, 1.0, 0.99, 2.0]])
    assert acm_from_curves(small_dip, min_effect=1.0).percent == 0.0
    assert acm_from_curves(small_dip, min_effect=1.0, tolerance=0.02).percent == 100.0


def test_curves_input_checks() -> None:
    with pytest.raises(ValueError, match="V >= 2"):
        acm_from_curves(np.zeros((3, 1)), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        acm_from_curves(np.array([[0.0, np.nan]]), 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        acm_from_curves(_ramp(2), -1.0)


# ======================================================================================== margins
@pytest.mark.parametrize(
    "percent,expected,paper",
    [
        (97, 3.34, 3.4),  # 1.96 sqrt(.97 .03 / 100) = 3.344 %: the paper prints 3.4 (3.3 when rounded)
        (96, 3.84, 3.8),
        (71, 8.89, 8.9),
    ],
)
def test_margin_matches_the_papers_table3(percent: int, expected: float, paper: float) -> None:
    marks = [True] * percent + [False] * (100 - percent)
    r = acm_from_marks(marks)
    assert r.percent == pytest.approx(percent)
    assert r.margin95 == pytest.approx(expected, abs=0.005)
    assert r.margin95 == pytest.approx(100 * 1.96 * np.sqrt(percent / 100 * (1 - percent / 100) / 100))
    assert abs(r.margin95 - paper) < 0.06
    curves = np.concatenate([_ramp(percent), _zigzag(100 - percent)])
    assert acm_from_curves(curves, 0.5).margin95 == pytest.approx(r.margin95)


def test_margin95_checks() -> None:
    assert margin95(0.5, 100) == pytest.approx(0.098)
    with pytest.raises(ValueError):
        margin95(1.5, 10)
    with pytest.raises(ValueError):
        margin95(0.5, 0)


# ========================================================================================== marks
def test_acm_from_marks_list_and_dict() -> None:
    r = acm_from_marks([True, False, True, True])
    assert r.percent == 75.0 and r.n == 4 and r.direction == 0
    r = acm_from_marks({3: True, 0: False, 10: True})  # only the marked samples count
    assert r.n == 3 and r.consistent.tolist() == [False, True, True]
    assert acm_from_marks([1, 0]).percent == 50.0
    with pytest.raises(ValueError, match="no marks"):
        acm_from_marks([])
    with pytest.raises(ValueError, match="True/False"):
        acm_from_marks(["yes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="integer sample"):
        acm_from_marks({"a": True})  # type: ignore[dict-item]


# ================================================================================ model traversals
class CodeToBrightness(nn.Module):
    """A stand-in generator: image brightness = sign * code value (+ a per-sample offset from z').

    With ``mixed`` the sign is the sign of z'[0], so about half the samples move the other way.
    """

    def __init__(self, column: int, resolution: int, mixed: bool = False) -> None:
        super().__init__()
        self.column, self.resolution, self.mixed = column, resolution, mixed

    def forward(
        self, z: torch.Tensor, code: torch.Tensor, grade: torch.Tensor | None = None, **_: object
    ) -> torch.Tensor:
        sign = torch.sign(z[:, 0]) if self.mixed else torch.ones(z.shape[0])
        level = 0.5 * sign * code[:, self.column] + 0.1 * torch.tanh(z[:, 1])
        return level.view(-1, 1, 1, 1).expand(-1, 3, self.resolution, self.resolution).clone()


def _model(tmp_path: Path, mixed: bool = False, real_generator: bool = False):
    from retinagen.config import load_run_config
    from retinagen.generation import LoadedModel
    from retinagen.networks.build import build_g, latent_spec

    cfg = load_run_config("synthfundus", preset="smoke")
    spec = latent_spec(cfg.latent)
    col = sum(spec.categorical) + spec.n_bernoulli  # first uniform code's column in the code vector
    torch.manual_seed(0)
    g = build_g(cfg).eval() if real_generator else CodeToBrightness(col, cfg.model.resolution, mixed)
    model = LoadedModel(
        cfg=cfg,
        spec=spec,
        G=g.requires_grad_(False),
        D=None,
        meta={},
        path=tmp_path / "ck",
        sha256="ab" * 32,
        device=torch.device("cpu"),
    )
    return model, spec.code_names[spec.n_discrete]


def _brightness(imgs: np.ndarray) -> np.ndarray:
    assert imgs.dtype == np.uint8 and imgs.ndim == 4 and imgs.shape[-1] == 3
    return imgs.reshape(len(imgs), -1).mean(axis=1)


def test_acm_for_code_on_a_generator_with_known_control(tmp_path: Path) -> None:
    model, code = _model(tmp_path)
    r = acm_for_code(model, code, _brightness, n=20, steps=STEPS, seed=0, min_effect=50.0, progress=False)
    assert r.percent == 100.0 and r.direction == 1 and r.n == 20
    # Half the samples (sign of z'[0]) respond the other way: the ACM is the majority fraction.
    mixed, _ = _model(tmp_path, mixed=True)
    curves, values = attribute_curves(mixed, code, _brightness, n=40, steps=STEPS, seed=0, progress=False)
    assert values == pytest.approx(list(np.linspace(-1, 1, STEPS)))
    rising = int((curves[:, -1] > curves[:, 0]).sum())
    rm = acm_for_code(
        mixed, code, _brightness, n=40, steps=STEPS, seed=0, min_effect=50.0, batch_size=7, progress=False
    )
    assert rm.percent == pytest.approx(100.0 * max(rising, 40 - rising) / 40)
    assert 0 < rising < 40


def test_acm_traversals_are_seeded_and_batch_independent_on_a_real_tiny_generator(tmp_path: Path) -> None:
    model, _ = _model(tmp_path, real_generator=True)
    a, vals = attribute_curves(
        model, "c4", _brightness, n=6, steps=STEPS, seed=3, batch_size=4, progress=False
    )
    b, _ = attribute_curves(model, "c4", _brightness, n=6, steps=STEPS, seed=3, batch_size=6, progress=False)
    assert a.shape == (6, 2) and vals == [0.0, 1.0]  # c4 is Bernoulli: two values
    np.testing.assert_allclose(a, b, atol=1e-9)
    cat, cat_vals = attribute_curves(model, "c0", _brightness, n=3, seed=3, progress=False)
    assert cat.shape == (3, 3) and cat_vals == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="attribute_fn returned"):
        attribute_curves(model, "c10", lambda im: np.zeros(1), n=3, progress=False)


def test_write_review_set_strips_index_and_marks(tmp_path: Path) -> None:
    model, code = _model(tmp_path)
    out = tmp_path / "review"
    index_path = write_review_set(model, code, out, n=5, steps=STEPS, seed=0, batch_size=2, progress=False)
    assert index_path == out / REVIEW_INDEX_NAME
    index = json.loads(index_path.read_text())
    assert index["code"] == code and index["n"] == 5 and len(index["samples"]) == 5
    assert index["values"] == pytest.approx(list(np.linspace(-1, 1, STEPS)))
    r = model.resolution
    curves, _ = attribute_curves(model, code, _brightness, n=5, steps=STEPS, seed=0, progress=False)
    for j, sample in enumerate(index["samples"]):
        with Image.open(out / sample["file"]) as im:
            assert im.size == (STEPS * r, r) and im.mode == "RGB"
            assert not {"Comment", "Description", "Author"} & set(im.info)
            strip = np.asarray(im)
        blocks = strip.reshape(r, STEPS, r, 3).transpose(1, 0, 2, 3)
        # The strip shows exactly the traversal the automated ACM measured.
        np.testing.assert_allclose(_brightness(np.ascontiguousarray(blocks)), curves[j])
    marks = {s["index"]: s["index"] != 2 for s in index["samples"]}
    assert acm_from_marks(marks).percent == pytest.approx(80.0)
