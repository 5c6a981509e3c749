"""``retinagen evaluate``: the report on a smoke-trained model, FID/KID skipped offline, Markdown, comparisons."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retinagen.data.dataset import ZipImageDataset
from retinagen.errors import BadInputError, RetinagenError
from retinagen.metrics import evaluate as evalmod
from retinagen.metrics.evaluate import (
    REPORT_SCHEMA,
    compare_reports,
    discretise_factor,
    evaluate_checkpoint,
    load_report,
    real_attribute_labels,
)
from retinagen.metrics.fid import INCEPTION_ENV_VAR, FeatureExtractor, default_stats_cache_dir
from tests.conftest import REAL_HOME_VARIABLE

FAST = {
    "n_samples": 16,
    "repeats": 2,
    "acm_n": 8,
    "acm_steps": 3,
    "discovery_n": 4,
    "discovery_steps": 3,
    "encoder_epochs": 2,
    "encoder_min_steps": 0,
    "top_factors": 2,
    "progress": False,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """16 px models: intra-op threads only add synchronisation (badly so on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def no_inception(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No Inception weights anywhere: the variable unset, TORCH_HOME an empty folder (a developer's cache stays out)."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(INCEPTION_ENV_VAR, raising=False)
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def smoke_run(smoke_run_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's copy of the session's smoke run (the report goes beside it, in RUN/../report)."""
    return Path(shutil.copytree(smoke_run_master, tmp_path_factory.mktemp("eval") / "run"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stats_cache")


@pytest.fixture(scope="module")
def report(smoke_run: Path, synth_zip_16: Path, cache_dir: Path, no_inception: Path) -> dict[str, Any]:
    out = smoke_run.parent / "report" / "REPORT.json"
    return evaluate_checkpoint(smoke_run, synth_zip_16, out, stats_cache=cache_dir, **FAST)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_report_holds_every_offline_metric_with_finite_numbers(
    report: dict[str, Any], smoke_run: Path
) -> None:
    assert report["schema"] == REPORT_SCHEMA
    assert report["model"]["msi"] == "MSI(S=1, β=1, d=0)"
    assert report["model"]["step"] == 8
    sec = report["metrics"]
    assert set(sec) == {"fid", "kid", "mig", "acm", "fd_fundus"}

    fdf = sec["fd_fundus"]
    assert fdf["status"] == "ok"
    for part in (fdf["fd"], fdf["kid"]):
        assert part["repeats"] == 2 and len(part["values"]) == 2 and part["n_samples"] == 16
        assert all(_finite(v) for v in [part["mean"], part["std"], *part["values"]])
        assert part["mean"] == pytest.approx(float(np.mean(part["values"])))
    assert fdf["fd"]["mean"] > 0 and fdf["fd"]["n_real"] == len(ZipImageDataset(report["data"]["path"]))
    assert fdf["encoder"]["source"] == "trained for this report" and fdf["encoder"]["trained_on_this_data"]
    assert fdf["fd"]["weights_sha256"] == fdf["encoder"]["weights_sha256"]

    mig = sec["mig"]
    assert mig["status"] == "ok"
    assert _finite(mig["mig"]) and _finite(mig["max_mi"]) and _finite(mig["mig_normalized"])
    assert mig["attributes"][0] == "dr_grade" and "pigmentation" in mig["attributes"]
    assert not any("seed" in a for a in mig["attributes"])
    mi = np.asarray(mig["mi_paper"])
    assert mi.shape == (len(mig["attributes"]), 18) and np.isfinite(mi).all()
    assert mig["max_mi"] == pytest.approx(mi.max())
    assert mig["discretisation"]["pigmentation"]["kind"] == "quantile"

    acm = sec["acm"]
    assert acm["status"] == "ok" and acm["rows"] and acm["factor_map"]["discovered_now"]
    for r in acm["rows"]:
        p = r["percent"] / 100
        assert 0 <= p <= 1 and r["n"] == 8 and r["code"] in report["model"]["codes"]
        assert r["margin95"] == pytest.approx(100 * 1.96 * math.sqrt(p * (1 - p) / 8))
    assert {r["attribute"] for r in acm["rows"]} >= {"pigmentation", "glare", "brightness"}

    lin = report["linfo"]
    assert lin["status"] == "ok" and lin["n_points"] == 8
    assert lin["H_discrete"] == pytest.approx(math.log(3) + 7 * math.log(2))
    assert _finite(lin["L_info_discrete_last"])
    assert len(report["traversals"]["grids"]) == 2
    # What was written is what was returned.
    assert json.loads((smoke_run.parent / "report" / "REPORT.json").read_text()) == report


def test_fid_and_kid_are_skipped_with_the_three_ways_named(
    report: dict[str, Any], no_inception: Path
) -> None:
    for key in ("fid", "kid"):
        sec = report["metrics"][key]
        assert sec["status"] == "skipped"
        reason = sec["reason"]
        assert "--inception-weights" in reason and INCEPTION_ENV_VAR in reason
        assert str(no_inception / "hub" / "checkpoints") in reason


def test_markdown_links_pngs_that_exist(report: dict[str, Any], smoke_run: Path) -> None:
    folder = smoke_run.parent / "report"
    md = (folder / "REPORT.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # MI heat map, ACM bars, the L_info curve and two traversal grids.
    assert len(links) == 5
    for link in links:
        assert not Path(link).is_absolute()
        assert (folder / link).read_bytes()[:8] == PNG_MAGIC
    assert "MSI(S=1, β=1, d=0)" in md and "skipped" in md and "--inception-weights" in md
    for title in ("Table 1", "Table 2", "Table 3", "Figure 10"):
        assert title in md
    assert f"{report['metrics']['fd_fundus']['fd']['mean']:.4g}" in md
    assert (folder / "REPORT_FACTORS.json").is_file()


@pytest.fixture(scope="module")
def second_report(
    report: dict[str, Any], smoke_run: Path, synth_zip_16: Path, cache_dir: Path, no_inception: Path
) -> dict[str, Any]:
    ckpt = Path(report["model"]["checkpoint"])  # a checkpoint file this time, not the run folder
    fmap = smoke_run.parent / "report" / "REPORT_FACTORS.json"
    out = smoke_run.parent / "again" / "R2.json"
    return evaluate_checkpoint(
        ckpt, synth_zip_16, out, metrics=("fd_fundus", "acm"), factor_map=fmap, stats_cache=cache_dir, **FAST
    )


def test_same_settings_same_numbers_and_the_encoder_comes_from_the_cache(
    report: dict[str, Any], second_report: dict[str, Any]
) -> None:
    a, b = report["metrics"], second_report["metrics"]
    assert set(b) == {"fd_fundus", "acm"}
    assert b["fd_fundus"]["encoder"]["source"] == "read from the cache"
    assert b["fd_fundus"]["encoder"]["weights_sha256"] == a["fd_fundus"]["encoder"]["weights_sha256"]
    assert b["fd_fundus"]["fd"]["real_stats_cached"]
    np.testing.assert_allclose(b["fd_fundus"]["fd"]["values"], a["fd_fundus"]["fd"]["values"], rtol=1e-9)
    assert not b["acm"]["factor_map"]["discovered_now"]
    strip = [{k: r[k] for k in ("attribute", "code", "percent", "margin95")} for r in b["acm"]["rows"]]
    assert strip == [
        {k: r[k] for k in ("attribute", "code", "percent", "margin95")} for r in a["acm"]["rows"]
    ]
    assert (Path(second_report["data"]["path"]).name) == Path(report["data"]["path"]).name
    assert (
        Path(second_report["model"]["checkpoint"]).parent.parent / "metrics.jsonl"
    ).is_file() and second_report["linfo"]["status"] == "ok"


def test_compare_reports_renders_one_row_per_report(
    report: dict[str, Any], second_report: dict[str, Any]
) -> None:
    table = compare_reports([report, second_report, report])
    rows = [ln for ln in table.splitlines() if ln.startswith("| MSI")]
    assert len(rows) == 3
    assert table.splitlines()[0].startswith("| Model |") and "MIG" in table and "fd_fundus" in table
    fd = report["metrics"]["fd_fundus"]["fd"]
    assert f"{fd['mean']:.4g} ± {fd['std']:.2g}" in rows[0]
    assert f"{report['metrics']['mig']['mig']:.4f}" in rows[0]
    assert "n/a" in rows[1]  # the second report has no MIG
    assert "FID skipped" in table
    with pytest.raises(ValueError, match="at least one"):
        compare_reports([])
    with pytest.raises(ValueError, match="not a retinagen evaluation report"):
        compare_reports([{"schema": "other"}])


def test_load_report_round_trip_and_refusals(report: dict[str, Any], smoke_run: Path, tmp_path: Path) -> None:
    assert load_report(smoke_run.parent / "report" / "REPORT.json") == report
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "x"}))
    with pytest.raises(BadInputError, match="not a retinagen evaluation report"):
        load_report(bad)


class _FakeInception(FeatureExtractor):
    """Stands in for Inception-v3 (whose weights are not available offline): colour statistics, 6-d."""

    def __init__(self) -> None:
        super().__init__("inception-v3", 6, "fake-inception")

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_and_kid_rows_are_measured_when_the_extractor_is_available(
    smoke_run: Path, synth_zip_16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_create(name: str, weights: Any = None, device: Any = "cpu") -> FeatureExtractor:
        calls.append((name, weights))
        return _FakeInception()

    monkeypatch.setattr(evalmod, "create_extractor", fake_create)
    rep = evaluate_checkpoint(
        smoke_run,
        synth_zip_16,
        tmp_path / "REPORT.json",
        metrics=("fid", "kid"),
        inception_weights=tmp_path / "weights.pth",
        stats_cache=False,
        **{**FAST, "top_factors": 0},
    )
    assert calls == [("inception-v3", tmp_path / "weights.pth")]
    fid, kid = rep["metrics"]["fid"], rep["metrics"]["kid"]
    assert fid["status"] == kid["status"] == "ok"
    assert len(fid["values"]) == 2 and all(_finite(v) and v > 0 for v in fid["values"])
    assert _finite(kid["mean"]) and kid["subset_size"] == 16
    md = (tmp_path / "REPORT.md").read_text()
    assert f"{fid['mean']:.4g} ± {fid['std']:.2g}" in md and "skipped" not in md.split("## Disent")[0]


def test_linfo_curve_stops_at_the_evaluated_checkpoint(
    smoke_run: Path, synth_zip_16: Path, tmp_path: Path, no_inception: Path
) -> None:
    early = smoke_run / "checkpoints" / "ckpt-000004.safetensors"
    rep = evaluate_checkpoint(
        early, synth_zip_16, tmp_path / "R.json", metrics=("kid",), **{**FAST, "top_factors": 0}
    )
    # No stats_cache given: the default ~/.cache/retinagen/stats, inside the temporary home the whole
    # session runs with (tests/conftest.py), never the developer's own.
    cache, real_home = default_stats_cache_dir(), Path(os.environ[REAL_HOME_VARIABLE])
    assert cache.is_dir() and cache.is_relative_to(os.environ["HOME"]) and not cache.is_relative_to(real_home)
    assert rep["model"]["step"] == 4 and rep["metrics"]["kid"]["status"] == "skipped"
    lin = rep["linfo"]
    assert (
        lin["n_points"] == 4
        and lin["later_points_left_out"] == 4
        and lin["kimg_last"] == pytest.approx(0.016)
    )
    assert (tmp_path / "R_files" / "linfo.png").read_bytes()[:8] == PNG_MAGIC
    assert rep["traversals"]["status"] == "skipped" and "factor_map" in rep


def test_bad_arguments_are_clear_errors(smoke_run: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    with pytest.raises(RetinagenError, match="unknown metric"):
        evaluate_checkpoint(smoke_run, synth_zip_16, tmp_path / "R.json", metrics=("fid", "beauty"))
    with pytest.raises(BadInputError, match="not found"):
        evaluate_checkpoint(smoke_run, tmp_path / "none.zip", tmp_path / "R.json")
    with pytest.raises(BadInputError, match=".json"):
        evaluate_checkpoint(smoke_run, synth_zip_16, tmp_path / "R.md")


# ================================================================================ labels for MIG
def test_discretise_factor_quantile_bins_and_point_masses() -> None:
    v = np.arange(100, dtype=float)
    classes, how = discretise_factor(v, 4)
    assert how["kind"] == "quantile" and np.bincount(classes).tolist() == [25, 25, 25, 25]
    assert (np.diff(classes) >= 0).all()  # monotone in the value
    # Half zeros (no lesions): class 0 is exactly the zeros, the rest split above.
    counts = np.r_[np.zeros(50), np.arange(1, 51)]
    c, _ = discretise_factor(counts, 4)
    assert set(c[:50]) == {0} and 0 not in set(c[50:]) and len(set(c[50:])) >= 2
    few, how_few = discretise_factor(np.array([1.0, 0.0, 1.0, 0.0]), 4)
    assert how_few == {"kind": "values", "values": [0.0, 1.0]} and few.tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError):
        discretise_factor(np.array([1.0, np.nan]), 4)


def test_real_attribute_labels_of_the_synthetic_set(synth_zip_16: Path) -> None:
    ds = ZipImageDataset(synth_zip_16)
    rows, labels, names, how = real_attribute_labels(ds, factor_bins=3)
    assert labels.dtype == np.int64 and labels.shape == (len(rows), len(names)) and len(rows) == len(ds)
    assert names[0] == "dr_grade" and (labels[:, 0] == ds.labels[rows]).all()
    assert "grade" not in names and not any("seed" in n for n in names)
    for k, name in enumerate(names):
        assert len(np.unique(labels[:, k])) >= 2, name  # constant columns are left out
        if how[name]["kind"] == "quantile":
            assert labels[:, k].max() <= 2


def test_every_registered_metric_has_a_runner_and_the_cli_lists_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from typer.testing import CliRunner

    from retinagen.cli import app
    from retinagen.metrics import registry

    assert set(evalmod.KNOWN_METRICS) == set(registry.METRICS)
    assert {m.group for m in registry.METRICS.values()} <= set(evalmod._GROUP_RUNNERS)
    out = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "300"}).output
    assert all(name in out for name in registry.KNOWN_METRICS)
    # A metric added to the registry without a runner: the evaluation module refuses to load.
    monkeypatch.setitem(registry.METRICS, "lpips", registry.MetricInfo("lpips", "perceptual distance", "lpips"))
    with pytest.raises(ImportError, match="lpips"):
        importlib.reload(evalmod)
    monkeypatch.delitem(registry.METRICS, "lpips")
    importlib.reload(evalmod)
