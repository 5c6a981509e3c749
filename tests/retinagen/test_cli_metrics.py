"""The metric commands: ``evaluate``, ``discover``, ``compare``, and attribute names in ``generate`` / ``traverse``.

A smoke-trained 16 px InfoStyleGAN (8 steps, well under a second) is evaluated with tiny sizes, so every
command runs in one or two seconds. Errors that a command reports itself (typer usage errors, ``typer.Exit``)
are checked through typer's CliRunner; errors raised as `RetinagenError` become exit code 2 in
`retinagen.cli.main`, so those are checked through ``main``.
"""

from __future__ import annotations

import csv
import inspect
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from retinagen import cli
from retinagen.metrics.discovery import discover_factors, load_factor_map
from retinagen.metrics.evaluate import KNOWN_METRICS, evaluate_checkpoint
from retinagen.metrics.fid import INCEPTION_ENV_VAR
from retinagen.training.checkpoint import sha256_file

# Tiny sizes: 2 FD/KID estimates of 16 images, ACM on 8 latents, discovery on 4, a one-epoch encoder.
FAST = [
    "--n-samples", "16", "--repeats", "2", "--acm-n", "8", "--acm-steps", "3", "--discovery-n", "4",
    "--discovery-steps", "3", "--encoder-epochs", "1", "--encoder-min-steps", "0", "--top-factors", "2",
    "--no-progress",
]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """16 px models: intra-op threads only add synchronisation on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def no_inception(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No Inception weights anywhere: the variable unset, TORCH_HOME an empty folder (a developer's cache stays out)."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(INCEPTION_ENV_VAR, raising=False)
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture
def run(smoke_run_master: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke run (tests write factors.json into it)."""
    return Path(shutil.copytree(smoke_run_master, tmp_path / "run"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stats_cache")


def invoke(*args: str) -> Result:
    return runner.invoke(cli.app, [str(a) for a in args])


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def newest_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("ckpt-*.safetensors"))[-1]


# ============================================================================================ evaluate
def test_evaluate_writes_the_report_and_skips_fid_with_the_three_ways(
    run: Path, synth_zip_16: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report" / "REPORT.json"
    res = invoke("evaluate", "--checkpoint", run, "--data", synth_zip_16, "--out", out,
                 "--metrics", "fid,kid,mig,acm,fd_fundus", "--stats-cache", cache, *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    sec = report["metrics"]
    assert set(sec) == {"fid", "kid", "mig", "acm", "fd_fundus"}
    assert sec["mig"]["status"] == "ok" and sec["acm"]["status"] == "ok" and sec["fd_fundus"]["status"] == "ok"
    assert sec["fd_fundus"]["fd"]["repeats"] == 2 and sec["fd_fundus"]["fd"]["n_samples"] == 16
    assert all(r["n"] == 8 for r in sec["acm"]["rows"])
    assert report["settings"]["discovery_n"] == 4 and report["settings"]["acm_steps"] == 3
    assert len(report["traversals"]["grids"]) == 2
    # FID/KID skipped, with the message naming the flag, the variable and the hub cache; the rest ran.
    for key in ("fid", "kid"):
        assert sec[key]["status"] == "skipped"
        reason = sec[key]["reason"]
        assert "--inception-weights" in reason and INCEPTION_ENV_VAR in reason and "hub/checkpoints" in reason
    assert "--inception-weights" in res.stderr and INCEPTION_ENV_VAR in res.stderr and "skipped" in res.stderr
    assert "## Disentanglement" in md and "## Attribute control" in md and "FID skipped" in md
    # The terminal names both files and shows the headline numbers.
    assert str(out) in res.stdout and str(out.with_suffix(".md")) in res.stdout
    assert f"{sec['mig']['mig']:.4f}" in res.stdout
    assert "fd_fundus FD" in res.stdout and "skipped: FID/KID unavailable" in res.stdout
    row = sec["acm"]["rows"][0]
    assert f"ACM {row['attribute']}" in res.stdout and f"{row['percent']:.1f} ± {row['margin95']:.1f} %" in res.stdout


def test_evaluate_runs_only_the_metrics_asked_for(run: Path, synth_zip_16: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "R.json"
    res = invoke("evaluate", "--checkpoint", newest_checkpoint(run), "--data", synth_zip_16, "--out", out,
                 "--metrics", " MIG ", "--stats-cache", cache, "--top-factors", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"mig"} and report["settings"]["metrics"] == ["mig"]
    assert "FID" not in res.stdout and "warning" not in res.stderr  # no Inception warning when FID is not asked for


@pytest.mark.parametrize("metrics", ["fid,bogus", "acm,MIGG", ","])
def test_unknown_metric_exits_2_listing_the_valid_ones(run: Path, synth_zip_16: Path, tmp_path: Path,
                                                       metrics: str) -> None:
    out = tmp_path / "R.json"
    res = invoke("evaluate", "--checkpoint", run, "--data", synth_zip_16, "--out", out, "--metrics", metrics)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --metrics") and "valid: " + ", ".join(KNOWN_METRICS) in res.stderr
    bad = [m for m in metrics.split(",") if m.strip()]
    assert all(m in res.stderr for m in bad) and ("(none given)" in res.stderr) == (not bad)
    assert not out.exists() and not (tmp_path / "R_files").exists()


def test_missing_files_given_to_evaluate_exit_2(run: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    out = tmp_path / "R.json"
    for flag in ("--inception-weights", "--data", "--factors", "--fundus-encoder"):
        args = ["evaluate", "--checkpoint", run, "--out", out, flag, tmp_path / "nope.bin"]
        if flag != "--data":
            args += ["--data", synth_zip_16]
        res = invoke(*args)
        assert res.exit_code == 2 and "nope.bin" in res.output, (flag, res.output)
    assert not out.exists()


def test_evaluate_without_data_uses_the_training_zip(run: Path, synth_zip_16: Path, cache: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "R.json"
    res = invoke("evaluate", "--checkpoint", run, "--out", out, "--metrics", "mig", "--top-factors", "0",
                 "--stats-cache", cache, "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"training data {synth_zip_16}" in res.stdout
    assert json.loads(out.read_text())["data"]["path"] == str(synth_zip_16)


def test_evaluate_without_data_exits_2_when_the_training_data_is_gone(run: Path, tmp_path: Path) -> None:
    # A lone checkpoint (no run folder) whose recorded training ZIP no longer exists.
    lone = tmp_path / "lone"
    lone.mkdir()
    ck = newest_checkpoint(run)
    shutil.copy(ck, lone / ck.name)
    meta = json.loads(ck.with_suffix(".json").read_text())
    meta["config"]["data"]["path"] = str(tmp_path / "gone.zip")
    (lone / ck.with_suffix(".json").name).write_text(json.dumps(meta))
    res = invoke("evaluate", "--checkpoint", lone / ck.name, "--out", tmp_path / "R.json", "--metrics", "mig")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --data DS.zip is needed") and ck.name in res.stderr


def test_evaluate_uses_the_runs_factor_map_only_when_it_fits_the_checkpoint(
    run: Path, synth_zip_16: Path, cache: Path, tmp_path: Path
) -> None:
    common = ["--data", synth_zip_16, "--metrics", "acm", "--stats-cache", cache, *FAST]
    # A map discovered on the older checkpoint (step 4) is not used for the newest one (step 8).
    old = sorted((run / "checkpoints").glob("ckpt-*.safetensors"))[0]
    assert invoke("discover", "--checkpoint", old, "--n", "2", "--steps", "2", "--no-progress").exit_code == 0
    assert load_factor_map(run / "factors.json")["checkpoint_sha256"] == sha256_file(old)
    res = invoke("evaluate", "--checkpoint", run, "--out", tmp_path / "a" / "R.json", *common)
    assert res.exit_code == 0, res.output
    assert "discovered on another checkpoint" in res.stdout
    rep = json.loads((tmp_path / "a" / "R.json").read_text())
    assert rep["factor_map"]["discovered_now"] and (tmp_path / "a" / "R_FACTORS.json").is_file()
    # Rediscovered on the newest checkpoint: the run's map is picked up without --factors.
    assert invoke("discover", "--checkpoint", run, "--n", "2", "--steps", "2", "--no-progress").exit_code == 0
    res = invoke("evaluate", "--checkpoint", run, "--out", tmp_path / "b" / "R.json", *common)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b" / "R.json").read_text())
    assert rep["factor_map"] == {"path": str(run / "factors.json"), "discovered_now": False}
    assert not (tmp_path / "b" / "R_FACTORS.json").exists()


def test_cli_defaults_are_the_library_defaults() -> None:
    """The flags of evaluate / discover default to what evaluate_checkpoint / discover_factors default to."""
    pairs = [(cli.evaluate, evaluate_checkpoint), (cli.discover, discover_factors)]
    for command, function in pairs:
        flags = inspect.signature(command).parameters
        lib = inspect.signature(function).parameters
        shared = [p for p in flags if p in lib and p not in ("checkpoint", "progress", "device", "metrics")]
        assert len(shared) >= 6
        for name in shared:
            assert flags[name].default == lib[name].default, name
    assert inspect.signature(cli.evaluate).parameters["metrics"].default == ",".join(KNOWN_METRICS)


# ============================================================================================ compare
def test_compare_prints_the_side_by_side_table(run: Path, synth_zip_16: Path, cache: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "R.json"
    res = invoke("evaluate", "--checkpoint", run, "--data", synth_zip_16, "--out", out, "--metrics", "mig",
                 "--top-factors", "0", "--stats-cache", cache, "--no-progress")
    assert res.exit_code == 0, res.output
    mig = json.loads(out.read_text())["metrics"]["mig"]["mig"]
    res = invoke("compare", out, out, "--out", tmp_path / "COMPARE.md")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.startswith("| MSI(S=1")]
    assert len(lines) == 2 and all(f"{mig:.4f}" in line for line in lines)
    assert (tmp_path / "COMPARE.md").read_text() in res.stdout
    code, _, err = run_main(capsys, "compare", str(synth_zip_16.parent / "nope.json"))
    assert code == 2 and err.startswith("error: ") and "nope.json" in err


# ============================================================================================ discover
def _value_for(kind: str) -> str:
    return "0.5" if kind == "uniform" else "1"


def _manifest_codes(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as fh:
        return [dict(kv.split("=") for kv in row["codes"].split()) for row in csv.DictReader(fh)]


def test_discover_writes_a_factor_map_that_generate_and_traverse_read(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --min-score 0: every attribute gets a code (18 codes, 6 attributes), so the test does not depend on what
    # an 8-step model happens to control.
    res = invoke("discover", "--checkpoint", run, "--n", "4", "--steps", "3", "--min-score", "0", "--top", "5",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    path = run / "factors.json"  # the default: next to the run's checkpoints
    fmap = load_factor_map(path)
    assert fmap["checkpoint_sha256"] == sha256_file(newest_checkpoint(run)) and fmap["n"] == 4
    assert set(fmap["attributes"]) == {"pigmentation", "glare", "fov_area", "brightness", "vessel_contrast",
                                       "lesion_load"}
    table = res.stdout.splitlines()
    assert table[0].split() == ["code", "kind", "attribute", "effect", "consist", "dir", "score"]
    scores = [float(line.split()[6]) for line in table[1:6]]
    assert scores == sorted(scores, reverse=True)
    assert f"wrote {path}" in res.stdout

    # generate --set melanin=v: the synonym of pigmentation resolves to its code, the same images as --set cX=v.
    code = fmap["attributes"]["pigmentation"]
    value = _value_for(fmap["codes"][code]["kind"])
    res = invoke("generate", "--checkpoint", run, "--n", "3", "--out", tmp_path / "by_name", "--seed", "5",
                 "--set", f"melanin={value}")
    assert res.exit_code == 0, res.output
    assert f"--set melanin: sets {fmap['codes'][code]['kind']} code {code} = {float(value):g}" in res.stdout
    assert all(float(row[code]) == float(value) for row in _manifest_codes(tmp_path / "by_name"))
    res = invoke("generate", "--checkpoint", run, "--n", "3", "--out", tmp_path / "by_code", "--seed", "5",
                 "--set", f"{code}={value}")
    assert res.exit_code == 0, res.output
    for i in range(3):
        name = f"seed5-{i:06d}.png"
        assert (tmp_path / "by_name" / name).read_bytes() == (tmp_path / "by_code" / name).read_bytes()

    # traverse --factor glare == traverse --factor <its code> == traverse --factor <its index>.
    glare = fmap["attributes"]["glare"]
    outs = []
    for i, factor in enumerate(["glare", glare, glare[1:]]):
        outs.append(tmp_path / f"t{i}.png")
        res = invoke("traverse", "--checkpoint", run, "--factor", factor, "--out", outs[-1], "--steps", "3",
                     "--samples", "2")
        assert res.exit_code == 0, res.output
    assert f"code {glare} = glare" in invoke("traverse", "--checkpoint", run, "--factor", "glare", "--out",
                                             outs[0], "--steps", "3", "--samples", "2").stdout
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()

    # An attribute the map does not know: exit 2, naming the valid names (codes and attributes).
    code_, _, err = run_main(capsys, "generate", "--checkpoint", str(run), "--n", "1", "--out",
                             str(tmp_path / "x"), "--set", "sparkle=1")
    assert code_ == 2 and err.startswith("error: --set sparkle: unknown code or attribute")
    assert "c0..c17" in err and f"melanin ({code})" in err and f"glare ({glare})" in err
    assert not (tmp_path / "x").exists()
    code_, _, err = run_main(capsys, "traverse", "--checkpoint", str(run), "--factor", "c99", "--out",
                             str(tmp_path / "y.png"))
    assert code_ == 2 and "--factor c99" in err and "pigmentation" in err
    # A value outside the code's range is refused before any image is written.
    code_, _, err = run_main(capsys, "generate", "--checkpoint", str(run), "--n", "1", "--out",
                             str(tmp_path / "z"), "--set", f"melanin={'5' if value == '0.5' else '7'}")
    assert code_ == 2 and "--set melanin" in err and not (tmp_path / "z").exists()


def test_attribute_names_without_a_factor_map_exit_2_saying_how_to_make_one(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not (run / "factors.json").exists()
    code, _, err = run_main(capsys, "generate", "--checkpoint", str(run), "--n", "1", "--out", str(tmp_path / "g"),
                            "--set", "melanin=0.5")
    assert code == 2 and "no factor map" in err and "retinagen discover" in err and "c0..c17" in err
    code, _, err = run_main(capsys, "traverse", "--checkpoint", str(run), "--factor", "glare", "--out",
                            str(tmp_path / "t.png"))
    assert code == 2 and "--factor glare" in err and "no factor map" in err
    # Code names and indices need no map.
    assert invoke("traverse", "--checkpoint", run, "--factor", "3", "--out", tmp_path / "t.png", "--steps", "2",
                  "--samples", "1").exit_code == 0
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_an_attribute_the_map_left_unassigned_and_a_map_of_another_model(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Default --min-score on 2 latents: assign what is found, then edit the map to be sure one is left out.
    assert invoke("discover", "--checkpoint", run, "--n", "2", "--steps", "2", "--no-progress").exit_code == 0
    fmap: dict[str, Any] = json.loads((run / "factors.json").read_text())
    for entry in fmap["codes"].values():
        if entry["attribute"] == "glare":
            entry["attribute"] = None
    fmap["attributes"].pop("glare", None)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(fmap))
    code, _, err = run_main(capsys, "generate", "--checkpoint", str(run), "--n", "1", "--out",
                            str(tmp_path / "g"), "--factors", str(edited), "--set", "glare=0.5")
    assert code == 2 and "assigns no code to 'glare'" in err and "Valid names: codes c0..c17" in err
    # A map naming a code this model lacks was discovered on another model: refused with the reason.
    fmap["codes"]["c99"] = dict(fmap["codes"]["c0"], attribute=None)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(fmap))
    code, _, err = run_main(capsys, "traverse", "--checkpoint", str(run), "--factors", str(foreign), "--factor",
                            "melanin", "--out", str(tmp_path / "t.png"))
    assert code == 2 and "c99" in err and "another model" in err
    # A broken map file: the loader's reason, exit 2.
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run_main(capsys, "generate", "--checkpoint", str(run), "--n", "1", "--out",
                            str(tmp_path / "g"), "--factors", str(broken), "--set", "c1=1")
    assert code == 2 and "broken.json" in err and "not a JSON factor map" in err


def test_discover_rejects_bad_arguments(run: Path, tmp_path: Path) -> None:
    res = invoke("discover", "--checkpoint", run, "--out", tmp_path / "F.json", "--n", "1", "--no-progress")
    assert res.exit_code == 2 and "n must be an integer >= 2" in res.stderr
    res = invoke("discover", "--checkpoint", run, "--out", tmp_path / "F.json", "--attributes", "melanin,sparkle")
    assert res.exit_code == 2 and "unknown attribute 'sparkle'" in res.stderr and "pigmentation" in res.stderr
    assert not (tmp_path / "F.json").exists()
    res = invoke("discover", "--checkpoint", run, "--out", tmp_path / "F.json", "--attributes", "melanin,glare",
                 "--n", "2", "--steps", "2", "--no-progress")
    assert res.exit_code == 0, res.output
    fmap = load_factor_map(tmp_path / "F.json")
    assert set(next(iter(fmap["codes"].values()))["all"]) == {"pigmentation", "glare"}
    assert not (run / "factors.json").exists()  # --out given: the run's default map is left alone


def test_a_lone_checkpoint_keeps_its_factor_map_beside_it(run: Path, tmp_path: Path) -> None:
    """Outside a run folder the map is ``<stem>.factors.json`` next to the file, and generate reads it there."""
    lone = tmp_path / "models"
    lone.mkdir()
    ck = newest_checkpoint(run)
    for suffix in (".safetensors", ".json"):
        shutil.copy(ck.with_suffix(suffix), lone / f"fundus{suffix}")
    res = invoke("discover", "--checkpoint", lone / "fundus.safetensors", "--n", "2", "--steps", "2",
                 "--min-score", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    fmap = load_factor_map(lone / "fundus.factors.json")
    assert not (run / "factors.json").exists()
    code = fmap["attributes"]["lesion_load"]
    value = _value_for(fmap["codes"][code]["kind"])
    res = invoke("generate", "--checkpoint", lone / "fundus.safetensors", "--n", "1", "--out", tmp_path / "g",
                 "--set", f"lesions={value}")
    assert res.exit_code == 0, res.output
    assert float(_manifest_codes(tmp_path / "g")[0][code]) == float(value)


def test_generate_dicom_twins_are_marked_synthetic_and_match_the_pngs(run: Path, tmp_path: Path) -> None:
    import numpy as np
    import pydicom
    from PIL import Image

    from retinagen.data.dicom import read_dicom

    out = tmp_path / "gen"
    res = invoke("generate", "--checkpoint", run, "--n", "3", "--out", out, "--seed", "2", "--dicom")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    series = set()
    for row in rows:
        dcm = out / Path(row["file"]).with_suffix(".dcm")
        png = np.asarray(Image.open(out / row["file"]).convert("RGB"))
        assert np.array_equal(read_dicom(dcm).pixels, png)
        ds = pydicom.dcmread(dcm)
        assert ds.SyntheticData == "YES" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert row["checkpoint_sha256"] in ds.DerivationDescription
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 1 and len(rows) == 3
