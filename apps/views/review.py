"""Review: the ACM review flow. N traversals of one code; a reviewer marks each consistent or not; ACM ± 95 %."""

from __future__ import annotations

import streamlit as st

from apps import common
from retinagen import dashboard_api as api
from retinagen.errors import RetinagenError
from retinagen.metrics.review_store import check_reviewer

PER_PAGE = 20
CHOICES = ["consistent", "not consistent"]

run = common.get_run()
model = run.model
controls = api.code_controls(run)

st.title("Review: attribute control (ACM)")
st.caption(
    "Each strip is one latent sample with one code moved across its range (left to right), everything else "
    "fixed. Mark it *consistent* when the attribute changes monotonically in one direction. The ACM is the "
    "share of consistent strips with its 95 % margin (paper, Table 3). Marks are stored with your name and "
    "the time (UTC)."
)

try:
    store = api.review_store(run)
except (RetinagenError, OSError) as exc:
    st.error(f"The review database cannot be opened: {exc}")
    st.stop()

reviewer_raw = st.text_input("Your name (stored with every mark)", max_chars=64, key="rev_reviewer")
reviewer: str | None = None
if reviewer_raw.strip():
    try:
        reviewer = check_reviewer(reviewer_raw)
    except RetinagenError as exc:
        st.error(str(exc))

with st.expander("New review set", expanded=not store.list_sets(model.sha256)):
    with st.form("rev_new"):
        c1, c2, c3, c4 = st.columns(4)
        code = c1.selectbox("Code (factor)", [c.index for c in controls], format_func=lambda i: controls[i].label,
                            key="rev_new_code")
        n = int(c2.number_input("N traversals", min_value=1, max_value=200, value=20, step=1, key="rev_new_n"))
        steps = int(c3.number_input("Values per uniform code", min_value=3, max_value=11, value=7, step=1,
                                    key="rev_new_steps"))
        seed = int(c4.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="rev_new_seed"))
        grade = None
        if run.conditional:
            grade = st.selectbox("DR grade (blank: sampled per strip)", [None, *common.grade_options(run)],
                                 format_func=lambda g: "sampled" if g is None else api.grade_label(g),
                                 key="rev_new_grade")
        create = st.form_submit_button("Create review set", disabled=reviewer is None)
    if reviewer is None:
        st.caption("Enter your name to create a set.")
    if create and reviewer is not None:
        with st.spinner("Rendering the strips ..."):
            try:
                made = api.start_review_set(run, code, n=n, steps=steps, seed=seed, grade=grade, reviewer=reviewer)
            except (RetinagenError, OSError) as exc:
                st.error(f"The review set could not be created: {exc}")
            else:
                st.session_state["rev_set"] = made.id
                st.session_state["rev_page"] = 1
                st.success(f"Created review set {made.label}.")

sets = store.list_sets(model.sha256)
if not sets:
    st.info("No review sets for this checkpoint yet.")
    st.stop()
ids = [s.id for s in sets]
if st.session_state.get("rev_set") not in ids:
    st.session_state["rev_set"] = ids[0]
set_id = st.selectbox("Review set", ids, format_func=lambda i: next(s.label for s in sets if s.id == i),
                      key="rev_set")
rs = store.get_set(set_id)


def _store_mark(set_id: int, index: int, key: str) -> None:
    """on_change of a strip's radio: append the mark (the database keeps every mark with its time)."""
    choice = st.session_state.get(key)
    who = st.session_state.get("rev_reviewer", "")
    if choice is None:
        return
    try:
        store.add_mark(set_id, index, choice == CHOICES[0], who)
    except RetinagenError as exc:
        st.session_state["rev_error"] = str(exc)


# The radios show this reviewer's latest marks; switching reviewer or set reloads them from the database.
marks = store.latest_marks(set_id, reviewer) if reviewer else {}
if st.session_state.get("rev_loaded") != (set_id, reviewer):
    for j in range(rs.n):
        key = f"rev_mark_{set_id}_{j}"
        st.session_state[key] = None if j not in marks else CHOICES[0 if marks[j] else 1]
    st.session_state["rev_loaded"] = (set_id, reviewer)

if err := st.session_state.pop("rev_error", None):
    st.error(err)

m1, m2, m3 = st.columns(3)
acm = store.acm(set_id, reviewer) if reviewer else None
m1.metric("ACM, your marks", "–" if acm is None else f"{acm.percent:.1f} %",
          None if acm is None else f"± {acm.margin95:.1f} (95 %)", delta_color="off")
m2.metric("Marked", f"{len(marks)} / {rs.n}")
values = ", ".join(f"{v:g}" for v in rs.values)
m3.caption(f"{rs.code} ({rs.code_kind}{', ' + api.attribute_label(rs.attribute) if rs.attribute else ''}): "
           f"values {values}; created by {rs.created_by} at {rs.created_utc}")

try:
    strips = api.review_strip_paths(store, rs)
except RetinagenError as exc:
    st.error(str(exc))
    st.stop()
pages = max(1, -(-rs.n // PER_PAGE))
page = int(st.number_input("Page", min_value=1, max_value=pages, value=1, step=1, key="rev_page")) if pages > 1 else 1
for j in range(PER_PAGE * (page - 1), min(rs.n, PER_PAGE * page)):
    a, b = st.columns([3, 2])
    a.image(api.upscale(api.read_png(strips[j]), min(720, 96 * len(rs.values)), "nearest"))
    key = f"rev_mark_{set_id}_{j}"
    b.radio(f"Strip {j + 1}", CHOICES, index=None, key=key, horizontal=True, disabled=reviewer is None,
            on_change=_store_mark, args=(set_id, j, key))

st.subheader("All reviewers")
rows = [{"reviewer": s.reviewer, "marked": f"{s.n_marked}/{s.n}",
         "ACM %": None if s.acm is None else round(s.acm.percent, 1),
         "± 95 %": None if s.acm is None else round(s.acm.margin95, 1)} for s in store.summary(set_id)]
if rows:
    st.dataframe(rows, hide_index=True)
c1, c2 = st.columns(2)
c1.download_button("Marks of this set (CSV)", store.export_csv(set_id), file_name=f"acm_review_set{set_id}.csv",
                   mime="text/csv", on_click="ignore", key="rev_csv_set")
c2.download_button("All marks, with history (CSV)", store.export_csv(history=True),
                   file_name="acm_review_all.csv", mime="text/csv", on_click="ignore", key="rev_csv_all")
