"""What the dashboard calls (retinagen/dashboard_api/), on a tiny smoke run with factor map, scorer and report."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from retinagen import dashboard_api as api
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.uploads import UploadError
from retinagen.errors import BadInputError, RetinagenError
from retinagen.generation import generate_images, load_model
from retinagen.latent import CodeValueError
from retinagen.metrics.registry import METRICS
from tests.retinagen.data import dicom_fixtures as dfx


def build_dashboard_run(data: Path, out: Path) -> Path:
    """A run folder as the dashboard expects one, in about two seconds: a smoke-preset InfoStyleGAN (16 px,
    DR-grade conditional) trained on ``data``, its factor map (RUN/factors.json), an anomaly scorer
    (RUN/anomaly/scorer.*) and an evaluation report with MIG and ACM (RUN/eval/REPORT.json)."""
    from clinical.anomaly import fit_scorer
    from retinagen.config import load_run_config, parse_overrides
    from retinagen.metrics.discovery import discover_factors, save_factor_map
    from retinagen.metrics.evaluate import evaluate_checkpoint
    from retinagen.training.loop import train

    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={data}"]))
    train(cfg, out, progress=False)
    model = load_model(out, with_discriminator=True)
    save_factor_map(discover_factors(model, n=4, steps=3, progress=False), out / "factors.json")
    fit_scorer(model, data).save(out / "anomaly" / "scorer")
    evaluate_checkpoint(out, data, out / "eval" / "REPORT.json", metrics=["mig", "acm"], factor_map=out / "factors.json",
                        acm_n=8, acm_steps=3, top_factors=1, progress=False, stats_cache=False)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 16 px models: more threads only add synchronisation on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dashboard_run(synth_zip_16, tmp_path_factory.mktemp("dash") / "run")


@pytest.fixture(scope="module")
def run(run_dir: Path) -> api.DashboardRun:
    return api.load_run(run_dir, environ={})


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- arguments, command


def test_app_arguments_come_from_the_command_line_or_the_environment() -> None:
    args = api.parse_app_args(["--run", "/r", "--data", "a.zip", "--data", "b.zip", "-q", "--unknown"], environ={})
    assert args == api.AppArgs(Path("/r"), (Path("a.zip"), Path("b.zip")))
    env = {api.RUN_ENV: "/from/env", api.DATA_ENV: f"x.zip{os.pathsep}y.zip"}
    assert api.parse_app_args([], environ=env) == api.AppArgs(Path("/from/env"), (Path("x.zip"), Path("y.zip")))
    assert api.parse_app_args(["--run", "/cli"], environ=env).run == Path("/cli")
    assert api.parse_app_args([], environ={}) == api.AppArgs(None, ())


def test_the_streamlit_command_is_headless_local_and_offline() -> None:
    cmd = api.streamlit_command(Path("/runs/x"), port=8765, data=[Path("d.zip")])
    assert cmd[:4] == [cmd[0], "-m", "streamlit", "run"] and cmd[4] == str(api.app_path())
    opts = dict(zip(cmd[5:cmd.index("--"):2], cmd[6:cmd.index("--"):2], strict=True))
    assert opts == {"--server.headless": "true", "--server.address": "127.0.0.1", "--server.port": "8765",
                    "--server.maxUploadSize": "20", "--server.fileWatcherType": "none",
                    "--browser.gatherUsageStats": "false", "--client.toolbarMode": "viewer",
                    "--runner.postScriptGC": "false"}
    assert cmd[cmd.index("--") + 1:] == ["--run", "/runs/x", "--data", "d.zip"]
    assert "--run" not in api.streamlit_command(None)
    assert api.app_path().name == "dashboard.py" and api.app_path().parent.name == "apps"
    for bad in (0, 70000, True, "80"):
        with pytest.raises(RetinagenError, match="--port"):
            api.streamlit_command(None, port=bad)


def test_the_dashboard_command_checks_the_run_then_starts_streamlit(run_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    from retinagen.cli import main

    assert main(["dashboard", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["dashboard", "--run", str(run_dir), "--data", str(tmp_path / "missing.zip")]) == 2
    assert "dataset ZIP not found" in capsys.readouterr().err
    calls: list[list[str]] = []

    def start(path: str, cmd: list[str]) -> None:  # stands in for the server, which would replace the process
        assert path == cmd[0]
        calls.append(cmd)
        raise SystemExit(3)

    monkeypatch.setattr(os, "execv", start)
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 3)  # the non-POSIX path
    assert main(["dashboard", "--run", str(run_dir), "--port", "8612"]) == 3  # the server's exit code
    out = capsys.readouterr()
    assert "on http://127.0.0.1:8612" in out.out and "warning" not in out.err
    assert calls[-1] == api.streamlit_command(run_dir.resolve(), port=8612)
    assert main(["dashboard", "--run", str(run_dir), "--host", "0.0.0.0"]) == 3
    assert "anyone who can reach it" in capsys.readouterr().err
    assert calls[-1][calls[-1].index("--server.address") + 1] == "0.0.0.0"


# ------------------------------------------------------------------------------------------------ loading


def test_run_folders_are_resolved_and_bad_ones_refused(run_dir: Path, tmp_path: Path) -> None:
    assert api.resolve_run_dir(run_dir) == run_dir
    ck = sorted((run_dir / "checkpoints").glob("*.safetensors"))[0]
    assert api.resolve_run_dir(ck) == run_dir
    with pytest.raises(BadInputError, match="run folder not found"):
        api.resolve_run_dir(tmp_path / "nope")
    with pytest.raises(BadInputError, match="no checkpoint"):
        api.resolve_run_dir(tmp_path)
    # An explicit checkpoint file is loaded as given (not the newest of its folder).
    assert api.load_run(ck, environ={}).model.path == ck
    assert api.checkpoint_key(run_dir) == json.loads(sorted((run_dir / "checkpoints").glob("*.json"))[-1]
                                                     .read_text())["tensors_sha256"]


def test_a_run_loads_with_factor_names_scorer_and_dataset(run: api.DashboardRun, run_dir: Path,
                                                          synth_zip_16: Path) -> None:
    assert run.folder == run_dir and run.conditional and run.model.D is not None
    assert run.factor_map is not None and run.factor_map_error is None
    assert run.scorer is not None and run.scorer_error is None and run.scorer_path == run_dir / "anomaly" / "scorer.json"
    assert run.datasets == [synth_zip_16.resolve()]
    assert run.state_dir == run_dir  # writable run folder
    controls = api.code_controls(run)
    spec = run.model.spec
    assert [c.name for c in controls] == list(spec.code_names)
    assert [c.kind for c in controls] == list(spec.code_kinds)
    assigned = {code: e["attribute"] for code, e in run.factor_map["codes"].items() if e["attribute"]}
    assert assigned  # the smoke run's discovery assigns at least one code
    for c in controls:
        if c.name in assigned:
            assert c.attribute == assigned[c.name] and c.label == f"{c.name} · {api.attribute_label(c.attribute)}"
        else:
            assert c.attribute is None and c.label == c.name
    assert controls[0].classes == spec.categorical[0]
    assert api.attribute_label("pigmentation") == "pigmentation (melanin)"


def test_a_scorer_of_another_checkpoint_or_a_foreign_factor_map_is_reported(run_dir: Path, tmp_path: Path) -> None:
    from clinical.anomaly import fit_scorer

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    older = sorted((copy / "checkpoints").glob("*.safetensors"))[0]
    fit_scorer(load_model(older), load_model(copy).cfg.data.path).save(copy / "anomaly" / "scorer")
    fmap = json.loads((copy / "factors.json").read_text())
    fmap["checkpoint_sha256"] = "0" * 64
    (copy / "factors.json").write_text(json.dumps(fmap))
    loaded = api.load_run(copy, environ={})
    assert loaded.scorer is None and "refit it" in (loaded.scorer_error or "")
    assert loaded.factor_map is not None and "another checkpoint" in (loaded.factor_map_error or "")


def test_the_state_folder_is_the_run_folder_unless_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "f" * 64
    assert api.state_dir_for(tmp_path, sha, {}) == tmp_path
    assert api.state_dir_for(tmp_path, sha, {api.STATE_ENV: "/srv/state"}) == Path("/srv/state") / sha[:16]
    ro = tmp_path / "ro"
    ro.mkdir()
    # A package installed system-wide: its run folder is not writable for the user (simulated, as tests may
    # run as root, for whom permission bits do not stop writes).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    assert api.state_dir_for(ro, sha, {"XDG_STATE_HOME": "/x"}) == Path("/x/retinagen/dashboard") / sha[:16]
    assert api.state_dir_for(ro, sha, {}) == Path.home() / ".local/state/retinagen/dashboard" / sha[:16]
    # The shipped model's folder is inside the package: never written, even when writable (editable install).
    assert api.state_dir_for(tmp_path, sha, {"XDG_STATE_HOME": "/x"}, in_run_folder=False) == \
        Path("/x/retinagen/dashboard") / sha[:16]


def test_the_shipped_model_is_opened_without_run_and_never_written_into(run_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import retinagen.assets

    monkeypatch.setattr(retinagen.assets, "shipped_run_dir", lambda: run_dir)
    shipped = api.load_run(None, environ={"XDG_STATE_HOME": "/somewhere"})
    assert shipped.folder == run_dir and shipped.scorer is not None
    assert shipped.state_dir == Path("/somewhere/retinagen/dashboard") / shipped.model.sha256[:16]


# ------------------------------------------------------------------------------------------------ controls


def test_render_image_is_image_zero_of_generate(run: api.DashboardRun) -> None:
    m = run.model
    codes = {1: 1.0, 0: 2.0, m.spec.n_codes - 1: -0.4}
    img = api.render_image(m, 5, 3, codes)
    ref, info = generate_images(m, 1, 5, grade=3, codes=codes)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and np.array_equal(img, ref[0])
    assert np.array_equal(img, api.render_image(m, 5, 3, codes))  # deterministic
    assert not np.array_equal(img, api.render_image(m, 5, 3, {**codes, m.spec.n_codes - 1: 0.9}))
    start = api.seed_code_values(m, 5, 3)
    assert np.allclose([start[i] for i in range(m.spec.n_codes)], generate_images(m, 1, 5, grade=3)[1]["values"][0])
    assert info["values"][0][0] == 2.0
    with pytest.raises(CodeValueError):
        api.render_image(m, 5, 3, {0: 7.0})  # categorical(3): class 7 does not exist
    with pytest.raises(RetinagenError, match="seed"):
        api.render_image(m, -1, 3)


def test_traversal_sheet_rows_are_images_of_the_seed_and_columns_the_code_values(run: api.DashboardRun) -> None:
    m = run.model
    u = m.spec.code_kinds.index("uniform")
    codes = {u: 0.3, 0: 1.0}
    sheet, values = api.traversal_sheet(m, 2, 1, codes, u, steps=5, samples=3)
    assert values == [-1.0, -0.5, 0.0, 0.5, 1.0] and sheet.shape == (3 * 16, 5 * 16, 3)

    def same(a: np.ndarray, b: np.ndarray) -> bool:  # one batch of 15 vs single images: float rounding only
        return int(np.abs(a.astype(int) - b).max()) <= 2

    for v_i, v in enumerate(values):  # row 0 is the Controls image with the traversed code set to v
        cell = sheet[0:16, v_i * 16:(v_i + 1) * 16]
        assert same(cell, api.render_image(m, 2, 1, {**codes, u: v}))
    assert not same(sheet[0:16, 0:16], sheet[0:16, 64:80])  # the code moves the image
    # row 2 is image 2 of the seed (its own codes), at value 0.5
    ref = generate_images(m, 3, 2, grade=1, codes={u: 0.5})[0][2]
    assert same(sheet[32:48, 48:64], ref) and not same(sheet[32:48, 48:64], sheet[0:16, 48:64])
    bern = m.spec.code_kinds.index("bernoulli")
    sheet_b, values_b = api.traversal_sheet(m, 2, 1, {}, bern, samples=1)
    assert values_b == [0.0, 1.0] and sheet_b.shape == (16, 32, 3)
    with pytest.raises(RetinagenError, match="samples"):
        api.traversal_sheet(m, 2, 1, {}, u, samples=0)


def test_upscaling_keeps_pixels_visible() -> None:
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    big = api.upscale(img, 16, "nearest")
    assert big.shape == (16, 16, 3) and np.array_equal(big[::4, ::4], img) and np.array_equal(big[3::4, 3::4], img)
    assert api.upscale(img, 16, "bicubic").shape == (16, 16, 3)
    assert api.upscale(np.zeros((4, 8, 3), np.uint8), 32).shape == (16, 32, 3)
    with pytest.raises(ValueError, match="method"):
        api.upscale(img, 16, "lanczos")
    with pytest.raises(ValueError, match="uint8"):
        api.upscale(img.astype(np.float32), 16)


def test_dicom_download_is_marked_synthetic_with_provenance_and_no_phi(run: api.DashboardRun, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m = run.model
    img = api.render_image(m, 4, 2, {0: 1.0})
    ds = pydicom.dcmread(io.BytesIO(api.dicom_bytes(m, img, 4, 2, {0: 1.0})))
    assert ds.SyntheticData == "YES" and ds.PatientName == "SYNTHETIC" and ds.Modality == "OT"
    assert np.array_equal(ds.pixel_array, img)
    prov = json.loads(ds.ImageComments)
    assert prov["checkpoint_sha256"] == m.sha256 and prov["grade"] == 2 and prov["synthetic"] is True
    assert prov["codes"]["c0"] == 1.0 and len(prov["codes"]) == m.spec.n_codes
    assert list(tmp_path.iterdir()) == []  # the temporary DICOM folder is gone


def test_render_latency_is_far_below_300_ms(run: api.DashboardRun) -> None:
    lat = api.measure_latency(run.model, n=20)
    assert lat["resolution"] == 16 and lat["median_ms"] < 300 and lat["p95_ms"] < 300


# -------------------------------------------------------------------------------------------------- review


def test_a_review_set_has_its_strips_and_takes_marks(run: api.DashboardRun) -> None:
    u = run.model.spec.code_kinds.index("uniform")
    with pytest.raises(RetinagenError, match="reviewer name"):
        api.start_review_set(run, u, n=3, steps=5, seed=0, grade=None, reviewer=" ")
    rs = api.start_review_set(run, u, n=3, steps=5, seed=1, grade=2, reviewer="Ann")
    assert (rs.code, rs.n, rs.steps, rs.grade, rs.created_by) == (f"c{u}", 3, 5, 2, "Ann")
    store = api.review_store(run)
    strips = api.review_strip_paths(store, rs)
    assert [p.name for p in strips] == ["strip_000.png", "strip_001.png", "strip_002.png"]
    assert api.read_png(strips[0]).shape == (16, 5 * 16, 3)
    assert store.folder / rs.folder == strips[0].parent and strips[0].parent.parent.name == "reviews"
    store.add_mark(rs.id, 0, True, "Ann")
    store.add_mark(rs.id, 2, False, "Ann")
    acm = store.acm(rs.id, "Ann")
    assert acm is not None and acm.percent == 50.0
    with pytest.raises(RetinagenError, match="N must be"):
        api.start_review_set(run, u, n=0, steps=5, seed=0, grade=None, reviewer="Ann")


# ----------------------------------------------------------------------------------------------- rebalance


def test_the_grade_histogram_counts_the_training_split(run: api.DashboardRun, synth_zip_16: Path) -> None:
    counts, split = api.grade_histogram(synth_zip_16)
    ds = ZipImageDataset(synth_zip_16, split="train")
    assert split == "train" and counts == np.bincount(ds.labels, minlength=5).tolist()
    assert api.rebalance_target("uniform") == "uniform"
    assert api.rebalance_target("ratio", ratio=0.5) == "ratio:0.5"
    assert api.rebalance_target("counts", counts={3: 2, 1: 1}) == "counts:1=1,3=2"
    assert api.rebalance_plan([10, 2, 5, 1, 0], "ratio:0.5") == [0, 3, 0, 4, 5]
    with pytest.raises(RetinagenError, match="ratio"):
        api.rebalance_target("ratio", ratio=1.5)
    with pytest.raises(RetinagenError, match="unknown target kind"):
        api.rebalance_target("bogus")


def test_a_rebalance_job_runs_in_the_background_into_the_state_folder(run: api.DashboardRun,
                                                                        synth_zip_16: Path) -> None:
    job = api.RebalanceJob.start(run, synth_zip_16, "counts:3=3,4=2", seed=1)
    assert job.wait(120) and job.error is None, job.error
    assert job.out.parent == run.state_dir / api.REBALANCE_DIR and job.progress() == (5, 5)
    with open(job.out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["level"]) for r in rows) == [3, 3, 3, 4, 4] and {r["synthetic"] for r in rows} == {"1"}
    assert {r["checkpoint_sha256"] for r in rows} == {run.model.sha256}
    report = job.report()
    assert report is not None and report["target_met"]
    table = api.gate_table(report)
    assert [r["generated"] for r in table] == [0, 0, 0, 3, 2] and all(r["rejected"] == 0 for r in table)


def test_a_rebalance_request_is_checked_before_it_starts(run: api.DashboardRun, tmp_path: Path,
                                                          synth_zip_16: Path) -> None:
    other = tmp_path / "other.zip"
    shutil.copy(synth_zip_16, other)
    with pytest.raises(RetinagenError, match="not one of this run's datasets"):
        api.RebalanceJob.start(run, other, "uniform")
    with pytest.raises(RetinagenError, match="not one of this run's graders"):
        api.RebalanceJob.start(run, synth_zip_16, "uniform", grader=tmp_path / "g.safetensors")
    with pytest.raises(RetinagenError, match="at most 5,000"):
        api.RebalanceJob.start(run, synth_zip_16, "counts:0=6000")
    assert not (run.state_dir / api.REBALANCE_DIR / "x").exists()


# ------------------------------------------------------------------------------------------------- anomaly


def test_a_fundus_upload_is_preprocessed_scored_and_mapped(run: api.DashboardRun) -> None:
    res = api.analyse_upload(run, _jpeg(dfx.retina_rgb(256)), heatmap_grid=4)
    assert res.status == "ok" and res.kind == "JPEG"
    assert res.prepared is not None and res.prepared.shape == (16, 16, 3)
    assert res.fov is not None and abs(res.fov.cx - 127.5) < 20 and res.preview.shape == (256, 256, 3)
    assert res.score is not None and np.isfinite(res.score) and 0 <= res.percentile <= 100
    assert res.flagged == (res.score > run.scorer.threshold) and len(res.top_features) == 3
    assert res.heatmap is not None and res.heatmap.shape == (4, 4) and (res.heatmap >= 0).all()
    assert res.overlay is not None and res.overlay.shape == (16, 16, 3)
    dcm = api.analyse_upload(run, dfx.op8_rgb(Path(tempfile.mkdtemp()) / "a.dcm").read_bytes(), heatmap_grid=None)
    assert dcm.kind == "DICOM" and dcm.status == "ok" and dcm.heatmap is None and dcm.score is not None


def test_the_heat_map_points_at_an_anomalous_region(run: api.DashboardRun, synth_zip_16: Path) -> None:
    ds = ZipImageDataset(synth_zip_16)
    for k, (r, c) in enumerate([(1, 2), (2, 1)]):
        img = ds.read_uint8(int(np.flatnonzero(ds.labels == 0)[k])).copy()
        img[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = (255, 255, 0)  # a saturated yellow patch in one cell
        heat = api.occlusion_heatmap(run, img, 4)
        assert np.unravel_index(int(heat.argmax()), heat.shape) == (r, c)
    with pytest.raises(ValueError, match="grid"):
        api.occlusion_heatmap(run, img, 1)


def test_no_fundus_and_unreadable_uploads_are_told_apart(run: api.DashboardRun) -> None:
    from skimage import data

    res = api.analyse_upload(run, _jpeg(np.ascontiguousarray(data.astronaut())))
    assert res.status == "no_fundus" and res.reason.startswith("no fundus found") and res.score is None
    with pytest.raises(UploadError, match="only PNG, JPEG and DICOM"):
        api.analyse_upload(run, b"GIF89a" + b"\0" * 100)


# --------------------------------------------------------------------------------------- training, metrics


def test_metrics_samples_and_reports_are_read(run: api.DashboardRun, run_dir: Path, tmp_path: Path) -> None:
    rows, bad = api.read_metrics(run_dir)
    assert rows and bad == 0 and {"kimg", "loss/D", "loss/G", "info/L_info_discrete", "info/H_discrete"} <= set(rows[-1])
    copy = tmp_path / "run"
    copy.mkdir()
    text = (run_dir / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(text + '{"step": 9, "loss/D": 1.0, "kimg": NaN, "x": true}\n[1]\n{"step": 1')
    rows2, bad2 = api.read_metrics(copy)
    assert len(rows2) == len(rows) + 1 and bad2 == 2 and rows2[-1] == {"step": 9.0, "loss/D": 1.0}
    assert api.read_metrics(tmp_path) == ([], 0)
    grids = api.sample_grids(run_dir)
    assert [s for s, _ in grids] == sorted(s for s, _ in grids) and grids[-1][1].name == f"fakes-{grids[-1][0]:06d}.png"
    (run_dir / "junk").mkdir(exist_ok=True)
    (run_dir / "junk" / "REPORT.json").write_text('{"schema": "other"}')
    try:
        reports, notes = api.find_reports(run_dir)
    finally:
        shutil.rmtree(run_dir / "junk")
    assert [p for p, _ in reports] == [run_dir / "eval" / "REPORT.json"]
    assert len(notes) == 1 and "not a retinagen evaluation report" in notes[0]
    tables = api.report_tables(reports[0][1])
    assert tables["quality"][0]["FID"] == "not run" and tables["mig"] and tables["acm"]
    assert all(0 <= r["ACM %"] <= 100 and r["n"] == 8 for r in tables["acm"])
    # Every metric of the registry that did not run is listed, with what it measures.
    ran_ok = {k for k, v in reports[0][1]["metrics"].items() if v.get("status") == "ok"}
    assert {n["metric"] for n in tables["notes"]} == set(METRICS) - ran_ok
    assert all(n["measures"] == METRICS[n["metric"]].description for n in tables["notes"])
