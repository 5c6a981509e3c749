"""The Streamlit dashboard (apps/), driven page by page with Streamlit's AppTest on a tiny smoke run."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from retinagen import dashboard_api as api
from retinagen.metrics.review_store import DB_NAME, ReviewStore
from tests.retinagen.data import dicom_fixtures as dfx
from tests.retinagen.test_dashboard_api import build_dashboard_run

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest

APP = str(Path(__file__).resolve().parents[2] / "apps" / "dashboard.py")
TIMEOUT = 120  # the first run of a session may load the model (a second or two; much more on a busy machine)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The smoke run, opened by the app through the environment (as `retinagen dashboard --run` would)."""
    run = build_dashboard_run(synth_zip_16, tmp_path_factory.mktemp("dashapp") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(api.RUN_ENV, str(run))
        mp.delenv(api.STATE_ENV, raising=False)
        yield run


def _app(page: str | None = None) -> Any:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _images(at: Any) -> list[str]:
    return [url for img in at.get("image") for url in img.value]


def _all_text(node: Any) -> str:
    """Every protobuf field of every element rendered (labels, values, captions, table contents)."""
    parts = [str(node.proto)] if getattr(node, "proto", None) is not None else []
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        parts += [_all_text(c) for c in children.values()]
    return "\n".join(parts)


def _only_verdicts(errors: Any) -> bool:
    """True when the only red boxes are the scorer's own verdict (a smoke-run scorer fitted on synthetic eyes may
    flag a real photograph; that is a result, not a failure of the page)."""
    return all(e.value == "Flagged: outside the normal range" for e in errors)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ controls


def test_controls_have_one_widget_per_code_named_by_the_factor_map(run_dir: Path) -> None:
    at = _app()
    run = api.load_run(run_dir, environ={})
    assert at.title[0].value == "Controls"
    for c in api.code_controls(run):
        kind = {"uniform": "slider", "bernoulli": "toggle", "categorical": "selectbox"}[c.kind]
        widget = getattr(at, kind)(key=f"ctl_code_{c.index}")
        assert widget.label == c.label
    named = [c for c in api.code_controls(run) if c.attribute]
    assert named and all("·" in c.label for c in named)
    assert at.selectbox(key="ctl_grade").options == [api.grade_label(g) for g in range(5)]
    assert at.session_state["ctl_render_ms"] < 300
    assert {b.key for b in at.get("download_button")} == {"ctl_png", "ctl_dicom"}
    assert len(_images(at)) == 2  # the image and the traversal sheet


def test_every_control_changes_the_image_and_the_seed_resets_the_codes(run_dir: Path) -> None:
    at = _app()
    model = api.load_run(run_dir, environ={}).model
    first = _images(at)[0]
    u = model.spec.code_kinds.index("uniform")
    b = model.spec.code_kinds.index("bernoulli")
    old = at.slider(key=f"ctl_code_{u}").value
    at.slider(key=f"ctl_code_{u}").set_value(0.95 if old < 0 else -0.95).run()
    moved = _images(at)[0]
    assert moved != first
    at.slider(key=f"ctl_code_{u}").set_value(old).run()
    assert _images(at)[0] == first  # same settings, same image (media URLs are content hashes)
    at.toggle(key=f"ctl_code_{b}").set_value(not at.toggle(key=f"ctl_code_{b}").value).run()
    assert _images(at)[0] not in (first, moved)
    at.selectbox(key="ctl_grade").set_value(4).run()
    graded = _images(at)[0]
    at.selectbox(key="ctl_code_0").set_value((at.selectbox(key="ctl_code_0").value + 1) % 3).run()
    assert _images(at)[0] != graded
    at.number_input(key="ctl_seed").set_value(17).run()
    start = api.seed_code_values(model, 17, 4)
    assert at.slider(key=f"ctl_code_{u}").value == pytest.approx(round(start[u], 2))
    assert at.toggle(key=f"ctl_code_{b}").value == bool(start[b])
    assert not at.exception


def test_the_traversal_follows_the_chosen_code(run_dir: Path) -> None:
    at = _app()
    model = api.load_run(run_dir, environ={}).model
    u = model.spec.code_kinds.index("uniform")
    sheet = _images(at)[1]
    at.selectbox(key="ctl_trav_code").set_value(u).run()
    assert at.slider(key="ctl_trav_steps").value == 7  # uniform codes get a "values" slider
    uniform_sheet = _images(at)[1]
    assert uniform_sheet != sheet
    at.slider(key="ctl_trav_rows").set_value(2).run()
    two_rows = _images(at)[1]
    assert two_rows != uniform_sheet
    assert "c" + str(u) in at.get("image")[1].captions[0]
    # A code edit redraws the image at once, the sheet only on request (it costs S x V images).
    other = (u + 1) if model.spec.code_kinds[u + 1] == "uniform" else u
    at.slider(key=f"ctl_code_{other}").set_value(-0.77).run()
    assert _images(at)[1] == two_rows and any("codes changed" in c.value for c in at.caption)
    at.button(key="ctl_trav_redraw").click().run()
    assert _images(at)[1] != two_rows and not any("codes changed" in c.value for c in at.caption)


# -------------------------------------------------------------------------------------------------- review


def test_the_review_flow_stores_marks_and_updates_the_acm(run_dir: Path) -> None:
    at = _app("review")
    submit = next(b for b in at.button if b.label == "Create review set")
    assert submit.disabled  # no reviewer name yet
    at.text_input(key="rev_reviewer").set_value("Ann").run()
    u = api.load_run(run_dir, environ={}).model.spec.code_kinds.index("uniform")
    at.selectbox(key="rev_new_code").set_value(u)
    at.number_input(key="rev_new_n").set_value(4)
    at.number_input(key="rev_new_steps").set_value(5)
    next(b for b in at.button if b.label == "Create review set").click().run()
    assert not at.exception
    store = ReviewStore(run_dir / DB_NAME)
    rs = store.list_sets()[0]
    assert (rs.n, rs.code, rs.created_by, len(rs.values)) == (4, f"c{u}", "Ann", 5)
    assert len(_images(at)) == 4
    at.radio(key=f"rev_mark_{rs.id}_0").set_value("consistent").run()
    at.radio(key=f"rev_mark_{rs.id}_1").set_value("consistent").run()
    at.radio(key=f"rev_mark_{rs.id}_2").set_value("not consistent").run()
    assert store.latest_marks(rs.id, "Ann") == {0: True, 1: True, 2: False}
    acm = at.metric[0]
    assert acm.value == "66.7 %" and "± 53.3" in acm.delta  # 1.96 sqrt(2/3 * 1/3 / 3) = 53.3 points
    assert at.metric[1].value == "3 / 4"
    at.radio(key=f"rev_mark_{rs.id}_2").set_value("consistent").run()  # changed her mind
    assert at.metric[0].value == "100.0 %" and len(store.marks(rs.id, history=True)) == 4
    assert {b.key for b in at.get("download_button")} >= {"rev_csv_set", "rev_csv_all"}
    # Another reviewer, another session: his radios start unmarked; Ann's marks are not his.
    bob = _app("review")
    bob.text_input(key="rev_reviewer").set_value("Bob").run()
    assert bob.radio(key=f"rev_mark_{rs.id}_0").value is None and bob.metric[0].value == "–"
    bob.radio(key=f"rev_mark_{rs.id}_3").set_value("not consistent").run()
    assert {s.reviewer: s.n_marked for s in store.summary(rs.id)} == {"Ann": 3, "Bob": 1}


def test_marks_are_refused_without_a_reviewer_name(run_dir: Path) -> None:
    at = _app("review")
    at.text_input(key="rev_reviewer").set_value("Ann\x07").run()
    assert any("control characters" in e.value for e in at.error)
    radios = [r for r in at.radio if r.key and r.key.startswith("rev_mark_")]
    assert radios and all(r.disabled for r in radios)


# ----------------------------------------------------------------------------------------------- rebalance


def test_the_rebalance_page_generates_with_progress_and_gate_statistics(run_dir: Path, synth_zip_16: Path) -> None:
    at = _app("rebalance")
    assert at.selectbox(key="reb_dataset").value == synth_zip_16.resolve()
    at.radio(key="reb_kind").set_value("counts").run()
    at.number_input(key="reb_count_3").set_value(3).run()
    at.number_input(key="reb_count_4").set_value(1).run()
    assert "adds 4 synthetic images" in " ".join(c.value for c in at.caption)
    at.button(key="reb_go").click().run()
    assert not at.exception and not at.error
    assert at.success and str(run_dir / api.REBALANCE_DIR) in at.success[0].value
    assert at.get("progress")  # the progress bar was drawn
    table = at.dataframe[0].value
    assert list(table["generated"]) == [0, 0, 0, 3, 1] and list(table["rejected"]) == [0] * 5
    assert {b.key for b in at.get("download_button")} == {"reb_manifest", "reb_report"}
    outs = sorted((run_dir / api.REBALANCE_DIR).iterdir())
    manifest = (outs[-1] / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 4 and all(",1," in row for row in manifest[1:])  # synthetic=1 on every row


def test_a_rebalance_beyond_the_dashboard_limit_is_refused(run_dir: Path) -> None:
    at = _app("rebalance")
    at.radio(key="reb_kind").set_value("counts").run()
    at.number_input(key="reb_count_0").set_value(api.MAX_DASHBOARD_REBALANCE).run()
    at.number_input(key="reb_count_1").set_value(10).run()
    at.button(key="reb_go").click().run()
    assert any("retinagen rebalance" in e.value for e in at.error)
    assert not at.get("progress")


# ------------------------------------------------------------------------------------------------- anomaly


def test_an_uploaded_fundus_is_scored_with_its_fov_and_heat_map(run_dir: Path) -> None:
    at = _app("anomaly")
    assert any("Upload an image" in i.value for i in at.info)
    at.file_uploader(key="ano_upload").set_value(("Doe_Jane_1970.jpg", _jpeg(dfx.retina_rgb(256)), "image/jpeg")).run()
    assert not at.exception and _only_verdicts(at.error), [e.value for e in at.error]
    labels = {m.label: m.value for m in at.metric}
    assert float(labels["Anomaly score"]) > 0 and 0 <= float(labels["Percentile among normal eyes"]) <= 100
    assert len(_images(at)) == 3  # upload with FOV, preprocessed image, heat map
    assert at.success or any("Flagged" in e.value for e in at.error)
    assert len(at.dataframe[0].value) == 3  # the top feature groups
    assert "Doe" not in _all_text(at.main)  # the upload's name is never shown


def test_no_fundus_unreadable_and_dicom_uploads_get_clear_messages_without_phi(run_dir: Path, tmp_path: Path) -> None:
    from skimage import data

    at = _app("anomaly")
    uploader = at.file_uploader(key="ano_upload")
    uploader.set_value(("face.jpg", _jpeg(data.astronaut()), "image/jpeg")).run()
    assert any("No fundus found" in w.value for w in at.warning) and not at.metric
    at.file_uploader(key="ano_upload").set_value(("Doe^Jane.dcm", b"GIF89a" + b"\0" * 300, "application/dicom")).run()
    assert any("cannot be used" in e.value and "only PNG, JPEG and DICOM" in e.value for e in at.error)
    ct = dfx.ct_image(tmp_path / "ct.dcm").read_bytes()
    at.file_uploader(key="ano_upload").set_value(("Doe^Jane.dcm", ct, "application/dicom")).run()
    assert any("not a fundus photograph" in e.value for e in at.error)
    assert not any(s in _all_text(at.main) for s in dfx.PHI_STRINGS)
    op = dfx.op8_rgb(tmp_path / "op.dcm").read_bytes()
    at.file_uploader(key="ano_upload").set_value(("Doe^Jane.dcm", op, "application/dicom")).run()
    assert _only_verdicts(at.error) and any(m.label == "Anomaly score" for m in at.metric), [e.value for e in at.error]
    assert not any(s in _all_text(at.main) for s in dfx.PHI_STRINGS)


_FREE_TEXT = ("text_input", "text_area", "chat_input")  # widgets where the browser could type a path


def test_the_browser_supplies_no_path(run_dir: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    """UP-6: no page takes a path from the browser. The only free text is the reviewer's name; query
    parameters naming another run, dataset or state folder (all real) are ignored; a name or an upload
    file name holding a path writes nothing there."""
    import shutil

    decoy = tmp_path / "decoy"
    shutil.copytree(run_dir, decoy / "decoyrun", ignore=shutil.ignore_patterns(DB_NAME + "*"))
    shutil.copy(synth_zip_16, decoy / "decoydata.zip")
    (decoy / "decoystate").mkdir()
    params = {"run": decoy / "decoyrun", "data": decoy / "decoydata.zip", "state": decoy / "decoystate",
              "checkpoint": decoy / "decoyrun", "path": decoy, "file": decoy / "decoydata.zip"}

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(decoy.rglob("*"))}

    before = tree()
    free_text: dict[str, list[str]] = {}
    for path, _title, _icon in api_pages():
        page = path.split("/")[-1][:-3]
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        for key, value in params.items():
            at.query_params[key] = str(value)
        at.run()
        at.switch_page(path).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        free_text[page] = sorted(w.key or w.label for kind in _FREE_TEXT for w in at.get(kind))
        assert run_dir.name in _all_text(at.sidebar), page  # still the command line's run
        shown = _all_text(at.main) + _all_text(at.sidebar)
        assert "decoy" not in shown, page  # neither the decoy run, its dataset nor its folder
    assert free_text == {"controls": [], "review": ["rev_reviewer"], "rebalance": [], "anomaly": [],
                         "training": []}
    # The one free-text field and an upload's file name are data, never a place to write.
    at = _app("review")
    name = "../../decoy/evil"  # the field holds 64 characters
    at.text_input(key="rev_reviewer").set_value(name).run()
    at.selectbox(key="rev_new_code").set_value(0)
    at.number_input(key="rev_new_n").set_value(2)
    next(b for b in at.button if b.label == "Create review set").click().run()
    assert not at.exception
    assert any(rs.created_by == name for rs in ReviewStore(run_dir / DB_NAME).list_sets())
    assert not [p for root in (run_dir, tmp_path) for p in root.rglob("evil*")]
    at = _app("anomaly")
    at.file_uploader(key="ano_upload").set_value((f"{decoy}/../decoy/up.jpg", _jpeg(dfx.retina_rgb(128)),
                                                  "image/jpeg")).run()
    assert not at.exception
    assert tree() == before  # nothing in the decoy folders was read into the app or written


def api_pages() -> tuple[tuple[str, str, str], ...]:
    from apps import common

    return common.PAGES


def test_a_21_mb_upload_is_refused_before_it_is_decoded(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """UP-1 through the app: 21 MB of a valid JPEG header and padding is refused by size, nothing is decoded."""
    import retinagen.data.uploads as uploads

    decoded: list[int] = []
    real = uploads.decode_image
    monkeypatch.setattr(uploads, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    at = _app("anomaly")
    at.file_uploader(key="ano_upload").set_value(("ok.jpg", _jpeg(dfx.retina_rgb(64)), "image/jpeg")).run()
    assert decoded == [1]  # the premise: an upload the app takes is decoded through the patched reader
    big = _jpeg(dfx.retina_rgb(256)) + b"\0" * (21 * 1024 * 1024)
    at.file_uploader(key="ano_upload").set_value(("big.jpg", big, "image/jpeg")).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["This file cannot be used: too large: more than the 20.0 MB limit."]
    assert not at.metric and not _images(at) and decoded == [1]


def test_the_app_refuses_a_server_that_accepts_larger_uploads(run_dir: Path) -> None:
    """Started without the dashboard's settings (Streamlit's default accepts 200 MB), the app serves nothing."""
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    before = config.get_option("server.maxUploadSize")
    assert before == 20  # the repository's .streamlit/config.toml, read from this folder as `streamlit run` does
    config.set_option("server.maxUploadSize", 200)
    try:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    finally:
        config.set_option("server.maxUploadSize", before)
    assert not at.exception
    (err,) = at.error
    assert "accepts uploads of up to 200 MB" in err.value and "--server.maxUploadSize 20" in err.value
    assert not at.sidebar.markdown  # no page, no run summary
    assert "--server.maxUploadSize" in (cmd := api.streamlit_command(run_dir))
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == "20"


# --------------------------------------------------------------------------------------- training, metrics


def test_the_training_page_shows_curves_samples_and_report_tables(run_dir: Path) -> None:
    at = _app("training")
    assert [s.value for s in at.subheader][:3] == ["Losses", "L_info against its bound H(C)", "Sample grids"]
    text = _all_text(at.main)
    assert "info/H_discrete" in text and "loss/G" in text  # both charts carry their series
    assert len(_images(at)) >= 1
    steps = at.select_slider(key="trn_step")
    first = _images(at)[0]
    steps.set_value(steps.options[0] if isinstance(steps.options[0], int) else int(steps.options[0])).run()
    assert _images(at)[0] != first
    assert at.selectbox(key="trn_report").options == ["eval/REPORT.json"]
    frames = [d.value for d in at.dataframe]
    assert len(frames) == 4  # factor map, quality, MIG, ACM
    assert "ACM %" in frames[3].columns and (frames[3]["ACM %"].between(0, 100)).all()
    assert "MIG" in frames[2].columns


def test_the_training_page_plots_the_snapshot_quality(run_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        for step, fd in ((4, 9.5), (8, 7.25), (12, 8.0)):
            fh.write(json.dumps({"step": step, "kimg": step * 0.004, "quality/fd_fundus": fd, "quality/recall": 0.3,
                                 "quality/precision": 0.6, "quality/fidelity/2": 0.1, "quality/judge": "abc"}) + "\n")
    monkeypatch.setenv(api.RUN_ENV, str(run))
    at = _app("training")
    assert "Quality at each snapshot (fixed judges)" in [s.value for s in at.subheader]
    text = _all_text(at.main)
    assert "quality/recall" in text and "quality/fidelity/2" in text
    assert "lowest fd_fundus 7.25 at kimg 0.032" in text and "3 snapshots" in text
    # The smoke run of the other tests logs no quality lines and shows no such chart.
    monkeypatch.setenv(api.RUN_ENV, str(run_dir))
    assert "Quality at each snapshot (fixed judges)" not in [s.value for s in _app("training").subheader]


# --------------------------------------------------------------------------------------------- concurrency


@pytest.fixture()
def one_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let AppTests run in threads at once, as the sessions of one server do.

    Three things AppTest does per run that a server does once, and that break when runs overlap (the app is not
    changed by this fixture):

    * it installs a mock Streamlit Runtime for the length of each run and removes it afterwards, a process-wide
      singleton: one run's cleanup pulls the runtime from under the others ("Runtime hasn't been created!"). A
      server has one Runtime for all sessions: the last one installed stays available to every thread;
    * it compiles the scripts with a fresh ScriptCache per run; a server has one, which compiles each script
      once under a lock. Overlapping compiles trip a CPython 3.11 race in the AST constructor ("SystemError:
      AST constructor recursion depth mismatch"): one shared cache, as in a server;
    * it patches Streamlit's process-wide ``config.get_option`` for the length of each run (``global.appTest``,
      which makes widgets record their values for the test to read); overlapping patches undo each other. The
      option is set once for the whole test instead.
    """
    import contextlib

    from streamlit.runtime.runtime import Runtime
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner
    from streamlit.testing.v1.util import patch_config_options

    shared_cache = ScriptCache()
    monkeypatch.setattr(app_test, "ScriptCache", lambda: shared_cache)
    monkeypatch.setattr(local_script_runner, "ScriptCache", lambda: shared_cache)

    last: dict[str, Any] = {}

    def instance(cls: type[Runtime]) -> Runtime:
        if cls._instance is not None:
            last["runtime"] = cls._instance
            return cls._instance
        if "runtime" in last:
            return last["runtime"]
        raise RuntimeError("Runtime hasn't been created!")

    monkeypatch.setattr(Runtime, "instance", classmethod(instance))
    monkeypatch.setattr(Runtime, "exists", classmethod(lambda cls: cls._instance is not None or "runtime" in last))
    monkeypatch.setattr(app_test, "patch_config_options", lambda overrides: contextlib.nullcontext())
    with patch_config_options({"global.appTest": True}):
        yield


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_five_concurrent_sessions_do_not_interfere_or_leak_uploads(run_dir: Path, one_runtime: None) -> None:
    model = api.load_run(run_dir, environ={}).model
    u = model.spec.code_kinds.index("uniform")
    settings = [(seed, 0.9 - 0.4 * seed) for seed in range(5)]
    # What each session must show, computed one session at a time.
    expected = []
    for seed, value in settings:
        at = _app()
        at.number_input(key="ctl_seed").set_value(seed).run()
        at.slider(key=f"ctl_code_{u}").set_value(value).run()
        expected.append(_images(at)[0])
    assert len(set(expected)) == 5
    upload = _jpeg(dfx.retina_rgb(256))
    sessions = [AppTest.from_file(APP, default_timeout=TIMEOUT) for _ in range(5)]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(5)

    def session(k: int) -> None:
        try:
            at = sessions[k].run()
            barrier.wait(60)
            seed, value = settings[k]
            at.number_input(key="ctl_seed").set_value(seed).run()
            at.slider(key=f"ctl_code_{u}").set_value(value).run()
            results[k] = _images(at)[0]
            at.switch_page("views/anomaly.py").run()
            if k == 0:  # only session 0 uploads
                at.file_uploader(key="ano_upload").set_value(("mine.jpg", upload, "image/jpeg")).run()
            barrier.wait(60)
            at.run()  # every session reruns after the upload happened
            results[10 + k] = at
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    assert [results[k] for k in range(5)] == expected
    owner = results[10]
    assert "ano_result" in owner.session_state and any(m.label == "Anomaly score" for m in owner.metric)
    for k in range(1, 5):
        other = results[10 + k]
        assert "ano_result" not in other.session_state and not other.metric and not _images(other)
        assert any("Upload an image" in i.value for i in other.info)
