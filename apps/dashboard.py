"""The retinagen dashboard: ``retinagen dashboard [--run RUN]`` (or ``streamlit run apps/dashboard.py -- --run RUN``).

Pages (``apps/views/``): Controls (latent codes -> live image, traversal, PNG/DICOM download), Review (human ACM
marks), Rebalance (DR-grade rebalancing), Anomaly (upload and score), Training & metrics. Every computation is a
`retinagen.dashboard_api` function; this file only lays out the navigation and the run's summary.
"""

from __future__ import annotations

import streamlit as st

from apps import common

st.set_page_config(page_title="retinagen", page_icon=":material/visibility:", layout="wide")
common.require_upload_limit()

run = common.get_run()
model = run.model

with st.sidebar:
    st.markdown(f"**{model.cfg.msi_name}** · {model.resolution} px")
    st.caption(
        f"Run `{run.folder.name}` · checkpoint `{model.path.name}` · sha256 `{model.sha256[:12]}…` · "
        f"{model.meta.get('kimg', '?')} kimg · {'DR-grade conditional' if run.conditional else 'unconditional'}"
    )
    if run.factor_map is not None:
        st.caption(f"Factor map: `{run.factor_map_path.name if run.factor_map_path else ''}`")
    else:
        st.caption("No factor map: codes are shown as c0, c1, ... (run `retinagen discover`).")
    if run.factor_map_error:
        st.warning(run.factor_map_error)
    if run.scorer is None:
        st.caption(run.scorer_error or "No anomaly scorer (anomaly/scorer.json).")
    st.caption(f"Writes (reviews, rebalanced sets) go to `{run.state_dir}`. Synthetic images are always marked.")

pages = [st.Page(path, title=title, icon=icon, url_path=path.split("/")[-1][:-3], default=(i == 0))
         for i, (path, title, icon) in enumerate(common.PAGES)]
st.navigation(pages).run()
