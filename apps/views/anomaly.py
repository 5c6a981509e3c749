"""Anomaly: upload a fundus photograph (PNG / JPEG / DICOM), see its FOV and the preprocessed image, the anomaly
score, its percentile among normal eyes, the flag and a per-region heat map (`clinical.anomaly`)."""

from __future__ import annotations

import streamlit as st

from apps import common
from retinagen import dashboard_api as api
from retinagen.data.uploads import MAX_UPLOAD_BYTES, UploadError
from retinagen.errors import RetinagenError

run = common.get_run()
model = run.model
scorer = run.scorer

st.title("Anomaly scoring")
st.caption(
    "The upload goes through the training preprocessing (field-of-view detection, crop, resize, mask) and is "
    "scored on the discriminator's and Q head's features against reference normal eyes. Uploads stay in your "
    "session only; nothing is saved, and DICOM header values are never read into the result."
)
if scorer is None:
    st.warning((run.scorer_error or "This run has no anomaly scorer (anomaly/scorer.json).")
               + " Fit one with `retinagen anomaly fit --checkpoint RUN --data DS.zip --out RUN/anomaly/scorer`. "
               "Uploads are still preprocessed and shown.")
else:
    st.caption(f"Scorer: {scorer.method.name}, threshold {scorer.threshold:.4g} (calibrated to "
               f"{100 * scorer.fpr:.0f} % false positives on held-out normals).")

upload = st.file_uploader(
    f"Fundus photograph or DICOM file (PNG, JPEG or DICOM, at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB). "
    "The file's content decides its type, not its name.",
    accept_multiple_files=False, key="ano_upload", max_upload_size=MAX_UPLOAD_BYTES // (1024 * 1024),
)
grid = st.select_slider("Heat-map regions per side", [2, 4, 8], value=4, key="ano_grid")

if upload is None:
    st.session_state.pop("ano_result", None)
    st.info("Upload an image to score it.")
    st.stop()

# Per session: the result is kept in this session's state, keyed by the upload's id, never in a shared cache.
cache_key = (upload.file_id, grid, model.sha256)
cached = st.session_state.get("ano_result")
if cached is None or cached[0] != cache_key:
    try:
        with st.spinner("Scoring ..."):
            result = api.analyse_upload(run, upload.getvalue(), heatmap_grid=max(2, min(grid, model.resolution // 4)))
    except UploadError as exc:
        # Never the file's name (it may hold a patient's name): only what is wrong with it.
        st.session_state.pop("ano_result", None)
        st.error(f"This file cannot be used: {exc.reason}.")
        st.stop()
    except RetinagenError as exc:  # e.g. the scorer does not fit this model; says nothing about the upload
        st.session_state.pop("ano_result", None)
        st.error(f"The image could not be scored: {exc}")
        st.stop()
    st.session_state["ano_result"] = (cache_key, result)
else:
    result = cached[1]

if result.status == "no_fundus":
    st.warning(f"No fundus found in this {result.kind} image ({result.reason}). Upload a colour fundus "
               "photograph with a visible circular field of view.")
    if result.preview is not None:
        st.image(result.preview, caption="The uploaded image")
    st.stop()

c1, c2, c3 = st.columns(3)
c1.image(result.preview, caption=f"{result.kind} upload with the detected field of view (green)")
c2.image(api.upscale(result.prepared, 256, "nearest"), caption=f"Preprocessed: what the scorer sees ({model.resolution} px)")
if result.overlay is not None:
    c3.image(api.upscale(result.overlay, 256, "nearest"),
             caption="Heat map: how much of the score each region explains (red = most)")
elif result.heatmap_note:
    c3.caption(result.heatmap_note)

if result.score is None:
    st.info(result.reason)
    st.stop()
m1, m2, m3 = st.columns(3)
m1.metric("Anomaly score", f"{result.score:.4g}", help=f"flagged above {result.threshold:.4g}")
m2.metric("Percentile among normal eyes", f"{result.percentile:.1f}")
if result.flagged:
    m3.error("Flagged: outside the normal range")
else:
    m3.success("Within the normal range")
st.subheader("What drove the score")
st.dataframe([{"feature group": name, "RMS deviation (sd)": round(v, 2)} for name, v in result.top_features],
             hide_index=True)
