"""Controls: one widget per latent code, DR grade and seed -> the generated image, live; traversal; downloads."""

from __future__ import annotations

import time

import streamlit as st

from apps import common
from retinagen import dashboard_api as api
from retinagen.errors import RetinagenError
from retinagen.generation import png_bytes

run = common.get_run()
model = run.model
controls = api.code_controls(run)

st.title("Controls")
st.caption(
    "Each code of the latent space has a widget, named by the attribute discovery found it to control. "
    "The seed picks the noise and the starting code values; the image updates on every change."
)

with st.sidebar:
    method = st.radio("Upscaling", ["nearest", "bicubic"], horizontal=True, key="ctl_method")
    size = st.select_slider("Display size (px)", [128, 256, 384, 512], value=384, key="ctl_size")

top = st.columns([1, 1, 2])
seed = int(top[0].number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="ctl_seed"))
grade = None
if run.conditional:
    grade = top[1].selectbox("DR grade", common.grade_options(run), format_func=api.grade_label, key="ctl_grade")

# A new seed starts from that seed's own code values; the widgets then hold the user's edits.
if st.session_state.get("ctl_codes_seed") != seed:
    start = api.seed_code_values(model, seed, grade)
    for c in controls:
        v = start[c.index]
        st.session_state[f"ctl_code_{c.index}"] = (
            round(v, 2) if c.kind == "uniform" else (bool(v >= 0.5) if c.kind == "bernoulli" else int(v))
        )
    st.session_state["ctl_codes_seed"] = seed

left, right = st.columns([3, 2])
codes: dict[int, float] = {}
with left:
    cols = st.columns(3)
    for j, c in enumerate(controls):
        key = f"ctl_code_{c.index}"
        with cols[j % 3]:
            if c.kind == "uniform":
                codes[c.index] = float(st.slider(c.label, -1.0, 1.0, step=0.01, key=key))
            elif c.kind == "bernoulli":
                codes[c.index] = 1.0 if st.toggle(c.label, key=key) else 0.0
            else:
                codes[c.index] = float(st.selectbox(c.label, list(range(c.classes)), key=key))

with right:
    t0 = time.perf_counter()
    try:
        img = api.render_image(model, seed, grade, codes)
    except RetinagenError as exc:
        st.error(str(exc))
        st.stop()
    ms = 1000 * (time.perf_counter() - t0)
    st.session_state["ctl_render_ms"] = ms
    common.show_image(img, f"{model.resolution} px, shown at {size} px ({method}); rendered in {ms:.0f} ms",
                      size=size, method=method)
    stem = f"retinagen_seed{seed}" + ("" if grade is None else f"_grade{grade}")
    d1, d2 = st.columns(2)
    d1.download_button("Download PNG", png_bytes(img), file_name=f"{stem}.png", mime="image/png",
                       on_click="ignore", key="ctl_png")
    frozen = dict(codes)  # the callable runs at download time: it must not see later edits
    d2.download_button("Download DICOM", lambda: api.dicom_bytes(model, img, seed, grade, frozen),
                       file_name=f"{stem}.dcm", mime="application/dicom", on_click="ignore", key="ctl_dicom",
                       help="Secondary Capture, SyntheticData=YES, provenance in the header, no patient data")

st.subheader("Traversal")
t1, t2, t3, t4 = st.columns([3, 2, 2, 2], vertical_alignment="bottom")
factor = t1.selectbox("Code to traverse", [c.index for c in controls],
                      format_func=lambda i: controls[i].label, key="ctl_trav_code")
steps = 7
if controls[factor].kind == "uniform":
    steps = int(t2.slider("Values", 3, 11, 7, step=2, key="ctl_trav_steps"))
samples = int(t3.slider("Rows", 1, 8, 4, key="ctl_trav_rows"))
redraw = t4.button("Redraw", key="ctl_trav_redraw", help="Redraw the traversal with the current codes")
# The sheet renders S x V images (28 at the defaults): redrawn when the traversal's own settings, the seed or the
# grade change, or on request, but not on every code edit, so a slider move costs one image, not 29.
inputs = (model.sha256, seed, grade, factor, steps, samples)
codes_now = tuple(sorted(codes.items()))
trav = st.session_state.get("ctl_trav")
if trav is None or trav["inputs"] != inputs or redraw:
    sheet, values = api.traversal_sheet(model, seed, grade, codes, factor, steps=steps, samples=samples)
    scale = max(1, min(8, 900 // sheet.shape[1]))
    # Encoded once: reruns send the same bytes (same media URL, cached by the browser) instead of re-encoding.
    shown = png_bytes(api.upscale(sheet, max(sheet.shape[:2]) * scale, "nearest"))
    trav = {"inputs": inputs, "codes": codes_now, "png": shown, "values": values}
    st.session_state["ctl_trav"] = trav
st.image(trav["png"],
         caption=f"Left to right: {controls[factor].name} = " + ", ".join(f"{v:g}" for v in trav["values"])
         + ". Top row: the image above; other rows: images 1.. of the same seed.")
if trav["codes"] != codes_now:
    st.caption("The codes changed since this traversal was drawn: its top row shows the earlier settings.")
