"""Factor discovery: a generator with known controls is mapped correctly; the factor map round-trips."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from retinagen.data.synthetic import render_fundus, sample_factors
from retinagen.errors import BadInputError
from retinagen.latent import LatentSpec
from retinagen.metrics.attributes import ATTRIBUTES, fov_area, glare
from retinagen.metrics.discovery import (
    DR_GRADE,
    FACTOR_MAP_SCHEMA,
    DiscoveryResult,
    attribute_codes,
    discover_factors,
    factor_aliases,
    format_table,
    load_factor_map,
    save_factor_map,
)

FOV_RADIUS_BY_CLASS = (1.0, 0.8, 0.9)  # class order by FOV area: 1 (0.8), 2 (0.9), 0 (1.0)


class SynthFundusG(nn.Module):
    """A stand-in generator that renders synthetic fundus photographs from its codes (ground truth known).

    Spec: c0 categorical(3) -> FOV radius; c1 Bernoulli -> nothing; c2 uniform -> pigmentation;
    c3 uniform -> glare; c4 uniform -> nothing. Everything else about the eye comes from z' (fixed per sample).
    """

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution

    def forward(
        self, z: torch.Tensor, code: torch.Tensor, grade: torch.Tensor | None = None, **_: Any
    ) -> torch.Tensor:
        assert code.shape[1] == 3 + 1 + 3
        out = []
        for zi, ci in zip(z, code, strict=True):
            eye_seed = int(abs(float(zi[0])) * 1e6) % (2**31)
            f = sample_factors(np.random.default_rng(eye_seed), grade=0)
            f = replace(
                f,
                fov_radius=FOV_RADIUS_BY_CLASS[int(ci[:3].argmax())],
                fov_cut=0.0,
                pigmentation=float(ci[4] + 1) / 2,
                glare=float(ci[5] + 1) / 2,
            )
            img = torch.from_numpy(render_fundus(f, self.resolution)).permute(2, 0, 1).float()
            out.append(img / 127.5 - 1.0)
        return torch.stack(out)


@dataclass
class FakeModel:
    """The attributes of `retinagen.generation.LoadedModel` that discovery uses."""

    G: nn.Module
    spec: LatentSpec = field(
        default_factory=lambda: LatentSpec(z_dim=16, categorical=(3,), n_bernoulli=1, n_uniform=3)
    )
    resolution: int = 64
    num_classes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    sha256: str = "cd" * 32


@pytest.fixture(scope="module")
def fake_result() -> DiscoveryResult:
    return discover_factors(FakeModel(SynthFundusG(64)), n=12, steps=4, seed=0, progress=False)


# ================================================================================= known ground truth
def test_discovery_maps_each_controlled_attribute_to_its_code(fake_result: DiscoveryResult) -> None:
    r = fake_result
    assert r.code_names == ["c0", "c1", "c2", "c3", "c4"]
    assert r.code_kinds == ["categorical", "bernoulli", "uniform", "uniform", "uniform"]
    assert r.attributes == list(ATTRIBUTES)
    assert r.assignment == {"c0": "fov_area", "c1": None, "c2": "pigmentation", "c3": "glare", "c4": None}
    j = {a: r.attributes.index(a) for a in r.attributes}
    for code, attr in (("c0", "fov_area"), ("c2", "pigmentation"), ("c3", "glare")):
        i = r.code_names.index(code)
        assert r.consistency[i, j[attr]] == 1.0, (code, attr)
        assert r.effect[i, j[attr]] > 2.0 and r.direction[i, j[attr]] == 1, (code, attr, r.effect[i, j[attr]])
    # Categorical classes are ordered by the attribute: radius 0.8 (class 1) < 0.9 (class 2) < 1.0 (class 0).
    assert r.class_order["c0"]["fov_area"] == [1, 2, 0]
    assert r.values["c0"] == [0.0, 1.0, 2.0] and r.values["c1"] == [0.0, 1.0]
    assert r.values["c2"] == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])
    # Codes that the generator ignores give identical images: no effect, no consistency, nothing assigned.
    for dead in ("c1", "c4"):
        i = r.code_names.index(dead)
        assert np.all(r.effect[i] == 0.0) and np.all(r.consistency[i] == 0.0)
        for attr in r.attributes:
            assert np.ptp(r.curves[dead][attr], axis=1).max() == 0.0


def test_curves_follow_the_traversal(fake_result: DiscoveryResult) -> None:
    pig = fake_result.curves["c2"]["pigmentation"]
    assert pig.shape == (12, 4)
    assert np.all(np.diff(pig, axis=1) > 0)  # every sample gets more pigmented as c2 rises


def test_ranked_table_and_text(fake_result: DiscoveryResult) -> None:
    rows = fake_result.table()
    assert len(rows) == 5 * len(ATTRIBUTES)
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert {(r["code"], r["attribute"]) for r in rows if r["assigned"]} == {
        ("c0", "fov_area"),
        ("c2", "pigmentation"),
        ("c3", "glare"),
    }
    for row in rows:
        assert row["score"] == pytest.approx(abs(row["effect"]) * row["consistency"])
    text = format_table(fake_result, top=5)
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].split()[:3] == ["code", "kind", "attribute"]
    assert lines[1].endswith("*")  # the best pair is assigned
    assert len(format_table(fake_result, top=None, assigned_only=True).splitlines()) == 4


def test_same_seed_same_result_and_batch_size_does_not_matter(fake_result: DiscoveryResult) -> None:
    again = discover_factors(FakeModel(SynthFundusG(64)), n=12, steps=4, seed=0, progress=True, batch_size=5)
    np.testing.assert_array_equal(again.effect, fake_result.effect)
    np.testing.assert_array_equal(again.consistency, fake_result.consistency)
    other = discover_factors(
        FakeModel(SynthFundusG(64)), n=12, steps=4, seed=1, probes=["melanin"], progress=False
    )
    assert other.attributes == ["pigmentation"]
    assert other.assignment["c2"] == "pigmentation"
    assert not np.array_equal(other.curves["c2"]["pigmentation"], fake_result.curves["c2"]["pigmentation"])


def test_grader_and_custom_probes_are_extra_attributes() -> None:
    def grader(imgs: torch.Tensor) -> np.ndarray:
        # A stand-in "DR grader" whose expected grade rises with glare (the fake c3).
        assert imgs.ndim == 4 and imgs.shape[1] == 3 and imgs.min() >= -1.0 and imgs.max() <= 1.0
        return np.clip(40.0 * glare(imgs), 0.0, 4.0)

    r = discover_factors(
        FakeModel(SynthFundusG(32)),
        n=8,
        steps=3,
        probes={"frame_fill": lambda x: fov_area(x)},
        grader=grader,
        progress=False,
    )
    assert r.attributes == ["frame_fill", DR_GRADE]
    assert r.assignment == {"c0": "frame_fill", "c1": None, "c2": None, "c3": DR_GRADE, "c4": None}
    assert r.to_json()["attributes"] == {"frame_fill": "c0", DR_GRADE: "c3"}
    with pytest.raises(ValueError, match="returned 1 values"):
        discover_factors(
            FakeModel(SynthFundusG(32)), n=4, steps=2, probes={"bad": lambda x: np.zeros(1)}, progress=False
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 1}, ValueError, "n must be"),
        ({"steps": 1}, ValueError, "steps must be"),
        ({"probes": ["sharpness"]}, KeyError, "unknown attribute"),
        ({"probes": []}, ValueError, "at least one"),
        ({"grader": "not a function"}, TypeError, "grader"),
        ({"min_score": -1.0}, ValueError, ">= 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        discover_factors(FakeModel(SynthFundusG(32)), **{"n": 4, "steps": 2, "progress": False, **kwargs})


# ========================================================================================= the factor map
def test_factor_map_round_trip_and_aliases(fake_result: DiscoveryResult, tmp_path: Path) -> None:
    from retinagen.generation import parse_code_settings

    path = save_factor_map(fake_result, tmp_path / "sub" / "FACTORS.json")
    data = load_factor_map(path)
    assert data == json.loads(path.read_text())
    assert data["schema"] == FACTOR_MAP_SCHEMA and data["checkpoint_sha256"] == "cd" * 32
    assert data["attributes"] == {"fov_area": "c0", "pigmentation": "c2", "glare": "c3"}
    c2 = data["codes"]["c2"]
    assert c2["attribute"] == "pigmentation" and c2["kind"] == "uniform" and c2["direction"] == 1
    assert c2["consistency"] == 1.0 and c2["effect"] > 2.0 and set(c2["all"]) == set(ATTRIBUTES)
    assert data["codes"]["c0"]["all"]["fov_area"]["class_order"] == [1, 2, 0]
    assert data["codes"]["c4"]["attribute"] is None and data["codes"]["c4"]["best"] is None
    assert factor_aliases(data) == {"c0": "fov_area", "c2": "pigmentation", "c3": "glare"}
    assert factor_aliases(fake_result) == factor_aliases(data)
    names = attribute_codes(data)
    assert names["melanin"] == names["pigmentation"] == "c2" and names["fov"] == "c0"
    # `generate --set pigmentation=0.8` through the generation module's alias handling.
    assert parse_code_settings(
        FakeModel(SynthFundusG(16)).spec, ["pigmentation=0.8"], factor_aliases(data)
    ) == {2: 0.8}


def _broken(data: dict[str, Any], how: str) -> dict[str, Any]:
    d = json.loads(json.dumps(data))
    if how == "schema":
        d["schema"] = "something/2"
    elif how == "attributes":
        d["attributes"]["glare"] = "c4"
    elif how == "consistency":
        d["codes"]["c2"]["consistency"] = 1.5
    elif how == "kind":
        d["codes"]["c1"]["kind"] = "gaussian"
    elif how == "effect":
        d["codes"]["c2"]["effect"] = "big"
    elif how == "unknown code":
        d["attributes"]["brightness"] = "c99"
    return d


@pytest.mark.parametrize("how", ["schema", "attributes", "consistency", "kind", "effect", "unknown code"])
def test_load_factor_map_rejects_invalid_maps(fake_result: DiscoveryResult, tmp_path: Path, how: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(fake_result.to_json(), how)))
    with pytest.raises(BadInputError, match="invalid factor map"):
        load_factor_map(path)
    with pytest.raises(BadInputError):
        save_factor_map(_broken(fake_result.to_json(), how), tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_load_factor_map_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="cannot read"):
        load_factor_map(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not a JSON factor map"):
        load_factor_map(tmp_path / "x.json")


# ============================================================================ a real (random) tiny model
def test_discovery_runs_end_to_end_on_a_random_tiny_msi_model(tmp_path: Path) -> None:
    from retinagen.config import load_run_config
    from retinagen.generation import LoadedModel
    from retinagen.networks.build import build_g, latent_spec

    cfg = load_run_config("synthfundus", preset="smoke")
    torch.manual_seed(0)
    model = LoadedModel(
        cfg=cfg,
        spec=latent_spec(cfg.latent),
        G=build_g(cfg).eval().requires_grad_(False),
        D=None,
        meta={},
        path=tmp_path / "ck",
        sha256="ef" * 32,
        device=torch.device("cpu"),
    )
    r = discover_factors(model, n=6, steps=3, seed=0, progress=False)
    n_codes = model.spec.n_codes
    assert r.effect.shape == r.consistency.shape == (n_codes, len(ATTRIBUTES))
    assert np.isfinite(r.effect).all() and ((r.consistency >= 0) & (r.consistency <= 1)).all()
    path = save_factor_map(r, tmp_path / "FACTORS.json")
    data = load_factor_map(path)
    assert list(data["codes"]) == list(model.spec.code_names)
    assert [e["kind"] for e in data["codes"].values()] == list(model.spec.code_kinds)
    assert data["n"] == 6 and data["steps"] == 3 and data["seed"] == 0
    # Assignments (if any) are one-to-one and above the threshold.
    assigned = [e for e in data["codes"].values() if e["attribute"] is not None]
    assert len({e["attribute"] for e in assigned}) == len(assigned)
    assert all(e["score"] >= data["min_score"] for e in assigned)
