"""ACM review marks in SQLite (retinagen/metrics/review_store.py): sets, marks, ACM, CSV, WAL concurrency."""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from retinagen.errors import BadInputError, RetinagenError
from retinagen.metrics.acm import acm_from_marks
from retinagen.metrics.review_store import CSV_COLUMNS, DB_NAME, ReviewStore, check_reviewer

SHA = "ab" * 32


def _new_set(store: ReviewStore, n: int = 10, code: str = "c4", **kw: object):
    args = dict(code=code, code_index=4, code_kind="uniform", n=n, steps=5, seed=0, grade=None,
                values=[-1, -0.5, 0, 0.5, 1], checkpoint_sha256=SHA, folder=f"reviews/{code}", created_by="Ann",
                attribute="pigmentation")
    args.update(kw)
    return store.create_set(**args)


def test_sets_are_created_listed_and_read_back(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    a = _new_set(store, n=7)
    b = _new_set(store, n=3, code="c2", code_index=2, code_kind="bernoulli", values=[0, 1], checkpoint_sha256="cd" * 32,
                 grade=2, attribute=None)
    assert (a.id, a.n, a.values, a.attribute, a.grade, a.created_by) == (1, 7, (-1, -0.5, 0, 0.5, 1), "pigmentation",
                                                                          None, "Ann")
    assert a.created_utc.endswith("Z") and "T" in a.created_utc
    assert [s.id for s in store.list_sets()] == [b.id, a.id]  # newest first
    assert [s.id for s in store.list_sets(SHA)] == [a.id]
    assert store.get_set(b.id).label == "#2 c2, n=3, seed 0, grade 2"
    assert store.set_folder(a) == tmp_path / "reviews" / "c4"
    with pytest.raises(RetinagenError, match="no review set #99"):
        store.get_set(99)
    for bad in ("/abs/path", "../escape", ""):
        with pytest.raises(RetinagenError, match="relative"):
            _new_set(store, folder=bad)
    with pytest.raises(RetinagenError, match="2 finite code values"):
        _new_set(store, values=[0.5])
    # A second store object on the same file sees the same data (nothing is held in memory).
    assert [s.id for s in ReviewStore(tmp_path / DB_NAME).list_sets()] == [b.id, a.id]


def test_the_database_is_in_wal_mode_with_its_schema_version(tmp_path: Path) -> None:
    ReviewStore(tmp_path / DB_NAME)
    con = sqlite3.connect(tmp_path / DB_NAME)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1
        con.execute("PRAGMA user_version = 7")
        con.commit()
    finally:
        con.close()
    with pytest.raises(BadInputError, match="schema 7"):
        ReviewStore(tmp_path / DB_NAME)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.sqlite").write_text("this is not sqlite " * 100)
    with pytest.raises(BadInputError, match="not a usable review database"):
        ReviewStore(tmp_path / "x.sqlite")
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(BadInputError, match="not a file"):
        ReviewStore(tmp_path / "dir.sqlite")


def test_the_latest_mark_per_sample_and_reviewer_counts_and_history_is_kept(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    s = _new_set(store, n=4)
    assert store.acm(s.id, "Ann") is None
    store.add_mark(s.id, 0, True, "Ann")
    store.add_mark(s.id, 1, True, "Ann")
    store.add_mark(s.id, 2, True, "Ann")
    store.add_mark(s.id, 2, False, "  Ann ")  # changed her mind; the name is trimmed
    store.add_mark(s.id, 3, True, "Ann")
    store.add_mark(s.id, 0, False, "Bob")
    assert store.latest_marks(s.id, "Ann") == {0: True, 1: True, 2: False, 3: True}
    acm = store.acm(s.id, "Ann")
    assert acm is not None and acm.n == 4 and acm.percent == pytest.approx(75.0)
    assert acm.margin95 == pytest.approx(100 * 1.96 * math.sqrt(0.75 * 0.25 / 4))
    assert acm.percent == acm_from_marks([True, True, False, True]).percent
    assert len(store.marks(s.id)) == 5 and len(store.marks(s.id, history=True)) == 6
    summary = {r.reviewer: (r.n_marked, r.acm.percent) for r in store.summary(s.id)}
    assert summary == {"Ann": (4, 75.0), "Bob": (1, 0.0)}
    assert all(m.marked_utc.endswith("Z") for m in store.marks(s.id, history=True))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, True, ""), "enter a reviewer name"),
        ((0, True, "   "), "enter a reviewer name"),
        ((0, True, "x" * 65), "longer than 64"),
        ((0, True, "Ann\x00"), "control characters"),
        ((0, True, 42), "must be text"),
        ((5, True, "Ann"), "out of range 0..4"),
        ((-1, True, "Ann"), "out of range"),
        ((0, 1, "Ann"), "True or False"),
        (("0", True, "Ann"), "integer"),
    ],
)
def test_bad_marks_are_refused(tmp_path: Path, args: tuple, match: str) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    s = _new_set(store, n=5)
    with pytest.raises(RetinagenError, match=match):
        store.add_mark(s.id, *args)
    with pytest.raises(RetinagenError, match="no review set"):
        store.add_mark(s.id + 1, 0, True, "Ann")
    assert store.marks(s.id, history=True) == []


def test_reviewer_names_are_bound_parameters_not_sql(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    s = _new_set(store, n=2)
    evil = "x'); DROP TABLE marks; --"
    store.add_mark(s.id, 0, True, evil)
    assert store.latest_marks(s.id, evil) == {0: True}
    assert check_reviewer("  Dr. Müller  ") == "Dr. Müller"


def test_csv_export_has_latest_marks_or_history_and_neutralises_formulas(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    s = _new_set(store, n=3)
    t = _new_set(store, n=2, code="c1", code_index=1)
    store.add_mark(s.id, 0, True, "Ann")
    store.add_mark(s.id, 0, False, "Ann")
    store.add_mark(s.id, 1, True, "=HYPERLINK(\"http://x\")")
    store.add_mark(t.id, 1, True, "Bob")
    rows = list(csv.DictReader(io.StringIO(store.export_csv(s.id))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["sample_index"], r["reviewer"], r["consistent"]) for r in rows] == [
        ("0", "Ann", "0"), ("1", "'=HYPERLINK(\"http://x\")", "1")]
    assert all(r["set_id"] == str(s.id) and r["code"] == "c4" and r["checkpoint_sha256"] == SHA for r in rows)
    everything = list(csv.DictReader(io.StringIO(store.export_csv(history=True))))
    assert len(everything) == 4 and {r["set_id"] for r in everything} == {str(s.id), str(t.id)}


def _mark_many(db: str, set_id: int, reviewer: str, n: int) -> None:
    store = ReviewStore(db, busy_timeout_s=60)
    for i in range(n):
        store.add_mark(set_id, i % 50, i % 3 != 0, reviewer)


def test_concurrent_threads_lose_no_mark(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    s = _new_set(store, n=50)
    threads = [threading.Thread(target=_mark_many, args=(str(store.path), s.id, f"r{k}", 25)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(store.marks(s.id, history=True)) == 8 * 25
    assert {r.reviewer: r.n_marked for r in store.summary(s.id)} == {f"r{k}": 25 for k in range(8)}


def test_concurrent_processes_lose_no_mark(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / DB_NAME)
    s = _new_set(store, n=50)
    ctx = multiprocessing.get_context("fork")  # fork: the children need no fresh import of torch
    procs = [ctx.Process(target=_mark_many, args=(str(store.path), s.id, f"p{k}", 40)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    marks = store.marks(s.id, history=True)
    assert len(marks) == 4 * 40 and len({m.id for m in marks}) == 160
    assert {r.reviewer: r.n_marked for r in store.summary(s.id)} == {f"p{k}": 40 for k in range(4)}
