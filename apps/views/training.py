"""Training & metrics: loss and L_info-vs-H(C) curves from metrics.jsonl, sample grids, evaluation reports."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from apps import common
from retinagen import dashboard_api as api

run = common.get_run()

st.title("Training & metrics")
rows, bad = api.read_metrics(run.folder)
if not rows:
    st.info("No metrics.jsonl in this run folder.")
else:
    df = pd.DataFrame(rows)
    x = "kimg" if "kimg" in df else "step"
    df = df.sort_values(x).set_index(x)
    st.subheader("Losses")
    loss_cols = [c for c in api.LOSS_KEYS if c in df]
    if loss_cols:
        st.line_chart(df[loss_cols], x_label=x, y_label="loss")
    st.subheader("L_info against its bound H(C)")
    info_cols = [c for c in api.INFO_KEYS if c in df]
    if info_cols:
        st.line_chart(df[info_cols], x_label=x, y_label="nats")
        st.caption("info/L_info_discrete rises towards info/H_discrete (its upper bound, the entropy of the "
                   "discrete codes) as Q learns to recover them (paper, Figure 10). info/L_info adds the uniform "
                   "codes' Gaussian log-likelihood, which has no such bound.")
    if api.QUALITY_FD_KEY in df:
        q = df[df[api.QUALITY_FD_KEY].notna()]
        st.subheader("Quality at each snapshot (fixed judges)")
        st.line_chart(q[[api.QUALITY_FD_KEY]], x_label=x, y_label="fd_fundus (lower is better)")
        share_cols = [c for c in api.QUALITY_SHARE_KEYS if c in q]
        share_cols += sorted(c for c in q if c.startswith("quality/fidelity/"))
        if share_cols:
            st.line_chart(q[share_cols], x_label=x, y_label="share")
        best = q[api.QUALITY_FD_KEY].idxmin()
        st.caption(f"fd_fundus, precision / recall and grade fidelity of {len(q)} snapshots, scored by the fixed "
                   "judges on generated images (z_share: the share of the images' variety the noise latent z' "
                   "makes; when it falls towards 0 the codes alone vary the images and recall falls with it); lowest"
                   f" fd_fundus {q[api.QUALITY_FD_KEY].min():.2f} at {x} "
                   f"{best:g} (kept as checkpoints/best-*.safetensors).")
    st.caption(f"{len(rows):,} logged steps" + (f"; {bad} unreadable line(s) skipped" if bad else ""))

st.subheader("Sample grids")
grids = api.sample_grids(run.folder)
if grids:
    steps = [s for s, _ in grids]
    step = st.select_slider("Training step", steps, value=steps[-1], key="trn_step") if len(steps) > 1 else steps[0]
    path = dict(grids)[step]
    st.image(api.upscale(api.read_png(path), 768, "nearest"), caption=f"{path.name}: fixed latents (same seeds "
             "at every snapshot)")
    reals = run.folder / "samples" / "reals.png"
    if reals.is_file():
        with st.expander("Real training images"):
            st.image(api.upscale(api.read_png(reals), 768, "nearest"), caption="reals.png")
else:
    st.info("No samples/fakes-*.png in this run folder.")

if run.factor_map is not None:
    st.subheader("Factor map")
    fm_rows = []
    for code, e in run.factor_map.get("codes", {}).items():
        fm_rows.append({"code": code, "kind": e.get("kind"), "attribute": e.get("attribute") or "",
                        "best match": e.get("best") or "", "effect (sd)": e.get("effect"),
                        "consistency": e.get("consistency"), "score": e.get("score")})
    st.dataframe(fm_rows, hide_index=True)

st.subheader("Evaluation reports")
reports, notes = api.find_reports(run.folder)
for note in notes:
    st.caption(f"Skipped {note}")
if not reports:
    st.info("No evaluation report (REPORT.json) in this run folder. Make one with `retinagen evaluate "
            "--checkpoint RUN --data DS.zip --out RUN/eval/REPORT.json`.")
    st.stop()
labels = [str(p.relative_to(run.folder)) for p, _ in reports]
choice = st.selectbox("Report", range(len(reports)), format_func=lambda i: labels[i], key="trn_report")
path, report = reports[choice]
tables = api.report_tables(report)
st.caption(f"{labels[choice]}: created {report.get('created', '?')}, checkpoint sha256 "
           f"{str(report.get('model', {}).get('checkpoint_sha256', ''))[:12]}…")
st.markdown("**Image quality (FID / KID; lower is better)**")
st.dataframe(tables["quality"], hide_index=True)
st.markdown("**Disentanglement (MIG)**")
if tables["mig"]:
    st.dataframe(tables["mig"], hide_index=True)
else:
    st.caption("not in this report")
st.markdown("**Attribute control (ACM, with 95 % margin)**")
if tables["acm"]:
    st.dataframe(tables["acm"], hide_index=True)
else:
    st.caption("not in this report")
for n in tables["notes"]:
    st.caption(f"{n['metric']} skipped: {n['reason']}")
