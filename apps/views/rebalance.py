"""Rebalance: the dataset's DR-grade histogram, a target, synthetic images per grade with a progress bar, the
gate statistics and the manifest (`clinical.rebalance`)."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from apps import common
from retinagen import dashboard_api as api
from retinagen.errors import RetinagenError

run = common.get_run()
model = run.model

st.title("Rebalance DR grades")
st.caption(
    "Synthetic images of the rare grades, from this grade-conditional model, raise the training split to a "
    "target. Every image is marked synthetic in manifest.csv with its provenance (checkpoint sha256, seed, "
    "codes, grade). Output goes to a new folder under the run's state folder."
)
if not run.conditional:
    st.warning(f"{model.path.name} is not DR-grade conditional, so it cannot generate images of a chosen grade.")
    st.stop()
if not run.datasets:
    st.info(
        "No prepared dataset found for this run (looked in RUN/data/*.zip and the run's config). Start the "
        "dashboard with `retinagen dashboard --run RUN --data DS.zip`."
    )
    st.stop()

dataset = st.selectbox("Dataset", run.datasets, format_func=lambda p: p.name, key="reb_dataset")
try:
    real, split = api.grade_histogram(dataset)
except RetinagenError as exc:
    st.error(str(exc))
    st.stop()
k = len(real)

kind = st.radio("Target", ["uniform", "ratio", "counts"], horizontal=True, key="reb_kind",
                captions=["every grade up to the largest", "every grade up to R x the largest",
                          "exact synthetic counts per grade"])
counts: dict[int, int] = {}
ratio = None
if kind == "ratio":
    ratio = float(st.slider("R", 0.05, 1.0, 0.5, step=0.05, key="reb_ratio"))
elif kind == "counts":
    cols = st.columns(k)
    for g in range(k):
        counts[g] = int(cols[g].number_input(api.grade_label(g), min_value=0, max_value=api.MAX_DASHBOARD_REBALANCE,
                                             value=0, step=10, key=f"reb_count_{g}"))
try:
    target = api.rebalance_target(kind, counts=counts, ratio=ratio, num_classes=k)
    need = api.rebalance_plan(real, target)
except RetinagenError as exc:
    st.error(str(exc))
    st.stop()

chart = pd.DataFrame({"real": real, "synthetic": need}, index=[api.grade_label(g) for g in range(k)])
st.bar_chart(chart, stack=True, x_label="DR grade", y_label="images")
st.caption(f"{dataset.name}, {split} split: {sum(real):,} real images; target `{target}` adds "
           f"{sum(need):,} synthetic images.")

c1, c2, c3 = st.columns(3)
seed = int(c1.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="reb_seed"))
grader = None
threshold = 0.5
if run.graders:
    grader = c2.selectbox("Quality gate (DR grader)", [None, *run.graders],
                          format_func=lambda p: "none" if p is None else p.name, key="reb_grader")
    if grader is not None:
        threshold = float(c3.slider("Keep if P(grade) ≥", 0.0, 1.0, 0.5, step=0.05, key="reb_threshold"))
else:
    c2.caption("No DR grader in this run folder (grader*.safetensors): images are not gated.")
copy_real = st.checkbox("Also copy the real training images (a merged set ready for `retinagen prepare`)",
                        key="reb_copy_real")

if st.button("Generate", type="primary", disabled=sum(need) == 0, key="reb_go"):
    try:
        st.session_state["reb_job"] = api.RebalanceJob.start(run, dataset, target, seed=seed, grader=grader,
                                                             gate_threshold=threshold, copy_real=copy_real)
    except RetinagenError as exc:
        st.error(str(exc))

job: api.RebalanceJob | None = st.session_state.get("reb_job")
if job is not None:
    bar = st.progress(0.0, text="starting ...")
    while True:
        done_n, total = job.progress()
        finished = job.done
        bar.progress(1.0 if finished else done_n / max(total, 1), text=f"{done_n:,} / {total:,} synthetic images")
        if finished:
            break
        time.sleep(0.25)
    if job.error:
        st.error(f"Rebalancing failed: {job.error}")
    else:
        report = job.report() or {}
        st.success(f"Done in {report.get('timing', {}).get('elapsed_s', 0):.1f} s: {job.out}")
        st.subheader("Gate statistics per grade")
        st.dataframe(api.gate_table(report), hide_index=True)
        gate = report.get("gate")
        if gate:
            st.caption(f"Gate: {gate['rejected']} of {gate['tries']} tries rejected "
                       f"(threshold {gate['threshold']:g}).")
        else:
            st.caption("No quality gate: every generated image was kept.")
        for w in report.get("warnings", []):
            st.warning(w)
        after = [int(v) for v in report.get("after_counts", {}).values()]
        if after:
            st.bar_chart(pd.DataFrame({"after": after}, index=[api.grade_label(g) for g in range(len(after))]),
                         x_label="DR grade", y_label="images")
        d1, d2 = st.columns(2)
        d1.download_button("Download manifest.csv", (job.out / "manifest.csv").read_bytes(), file_name="manifest.csv",
                           mime="text/csv", on_click="ignore", key="reb_manifest")
        d2.download_button("Download rebalance_report.json", (job.out / "rebalance_report.json").read_bytes(),
                           file_name="rebalance_report.json", mime="application/json", on_click="ignore",
                           key="reb_report")
