"""End to end: `streamlit run` on localhost, opened in headless Chromium through Playwright; a screenshot is saved.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package (its own browser download
is not used). Marked ``browser``; part of the default run, skipped with its reason where Chromium is absent.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from retinagen import dashboard_api as api
from retinagen.errors import RetinagenError
from tests.retinagen.data import dicom_fixtures as dfx

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "tests" / "artifacts" / "dashboard.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120  # server start + first model load on a busy 2-core machine
UI_TIMEOUT_MS = 90_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium); Playwright's own browser download is not used"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            if r.read().strip() == b"ok":
                return
        time.sleep(0.5)
    pytest.fail(f"streamlit did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model when the package has one, else a smoke run built here."""
    try:
        return api.resolve_run_dir(None)
    except RetinagenError:
        from tests.retinagen.test_dashboard_api import build_dashboard_run

        data = request.getfixturevalue("synth_zip_16")
        return build_dashboard_run(data, tmp_path_factory.mktemp("browser") / "run")


@pytest.fixture(scope="module")
def server(browser_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`streamlit run apps/dashboard.py` headless on 127.0.0.1, as `retinagen dashboard` starts it."""
    port = _free_port()
    state = tmp_path_factory.mktemp("state")
    log = state / "streamlit.log"
    env = {**os.environ, api.STATE_ENV: str(state), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(api.streamlit_command(browser_run, port=port), cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(browser: object, url: str) -> object:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(url)
    return page


def _images_loaded(page: object) -> None:
    # Streamlit first paints a skeleton: wait for a real, decoded image.
    page.wait_for_selector("img")  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
        ".some(i => i.complete && i.naturalWidth > 0)"
    )


def _no_exception(page: object) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0  # type: ignore[attr-defined]


def test_the_dashboard_renders_a_generated_image_in_chromium(browser: object, server: str) -> None:
    page = _open(browser, server)
    _images_loaded(page)
    page.get_by_role("heading", name="Controls").wait_for()  # type: ignore[attr-defined]
    _no_exception(page)
    first = page.locator('[data-testid="stImage"] img').first.get_attribute("src")  # type: ignore[attr-defined]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)  # type: ignore[attr-defined]
    assert Image.open(SCREENSHOT).size[0] >= 1000
    # Moving a slider (keyboard on its thumb) re-renders the image.
    slider = page.get_by_role("slider").first  # type: ignore[attr-defined]
    slider.focus()
    for _ in range(10):
        slider.press("ArrowRight")
    page.wait_for_function(  # type: ignore[attr-defined]
        "(old) => { const i = document.querySelector('[data-testid=\"stImage\"] img');"
        " return i && i.getAttribute('src') !== old && i.complete && i.naturalWidth > 0; }",
        arg=first,
    )
    _no_exception(page)
    # The DICOM download is generated when clicked: a synthetic-marked Secondary Capture of the image shown.
    with page.expect_download() as info:  # type: ignore[attr-defined]
        page.get_by_role("button", name="Download DICOM").click()  # type: ignore[attr-defined]
    ds = pydicom.dcmread(info.value.path())
    assert ds.SyntheticData == "YES" and ds.PatientName == "SYNTHETIC" and ds.pixel_array.ndim == 3
    assert info.value.suggested_filename.endswith(".dcm")
    page.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("path", "title"), [("review", "Review: attribute control (ACM)"),
                                             ("rebalance", "Rebalance DR grades"),
                                             ("anomaly", "Anomaly scoring"),
                                             ("training", "Training & metrics")])
def test_every_page_opens_without_an_error(browser: object, server: str, path: str, title: str) -> None:
    page = _open(browser, f"{server}/{path}")  # a direct link, as a bookmark would open it
    page.get_by_role("heading", name=title).wait_for()  # type: ignore[attr-defined]
    # The main script ran too (its run summary and the five-page menu), not the page file alone.
    page.get_by_text("Synthetic images are always marked").wait_for()  # type: ignore[attr-defined]
    assert page.get_by_role("link", name="Training & metrics").count() == 1  # type: ignore[attr-defined]
    page.wait_for_load_state("networkidle")  # type: ignore[attr-defined]
    _no_exception(page)
    page.close()  # type: ignore[attr-defined]


def test_an_upload_is_scored_and_stays_in_its_own_session(browser: object, server: str, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(dfx.retina_rgb(256))).save(buf, format="JPEG", quality=95)
    photo = tmp_path / "fundus.jpg"
    photo.write_bytes(buf.getvalue())
    pages = [_open(browser, f"{server}/anomaly") for _ in range(5)]  # five sessions at once
    for p in pages:
        p.get_by_role("heading", name="Anomaly scoring").wait_for()  # type: ignore[attr-defined]
    pages[0].locator('input[type="file"]').set_input_files(str(photo))  # type: ignore[attr-defined]
    pages[0].get_by_text("Anomaly score").wait_for()  # type: ignore[attr-defined]
    _images_loaded(pages[0])
    for p in pages[1:]:
        p.reload()  # type: ignore[attr-defined]
        p.get_by_text("Upload an image to score it.").wait_for()  # type: ignore[attr-defined]
        assert p.get_by_text("Anomaly score").count() == 0  # type: ignore[attr-defined]
        assert p.locator('[data-testid="stImage"] img').count() == 0  # type: ignore[attr-defined]
    for p in pages:
        _no_exception(p)
        p.close()  # type: ignore[attr-defined]
