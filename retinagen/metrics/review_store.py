"""Human ACM review marks in SQLite: review sets, marks with reviewer and time, ACM, CSV export.

The paper's ACM (Sec. 4.3, Table 3) counts, over N traversals of one code, the samples in which the attribute
is controlled consistently, and reports the percentage with its 95 % margin. `retinagen.metrics.acm` computes
it from marks (`acm_from_marks`) and writes the traversal strips a person marks (`write_review_set`); this
module stores the marks, so several reviewers (and several dashboard sessions at once) can mark the same sets.

Database (one file, `DB_NAME`, normally in the run folder)
    ``review_sets``  one row per set of strips: code (name, index, kind), the attribute it is reviewed for,
                     n, steps, seed, grade, the code values, the checkpoint's sha256, the folder holding the
                     strips (relative to the database's folder), who created it and when (UTC, ISO 8601).
    ``marks``        append-only: set, sample index (0..n-1), reviewer, consistent (0/1), time (UTC). A
                     reviewer who changes a mark adds a row; the latest row per (set, sample, reviewer)
                     counts (ordered by row id, so two marks in the same second still have an order) and the
                     history stays for audit.
    ``PRAGMA user_version`` holds `SCHEMA_VERSION`.

Concurrency
    The journal is WAL (readers never block the writer, the writer never blocks readers). Every call opens
    its own connection (a connection is never shared between threads or sessions) with a busy timeout, and
    every write is one ``BEGIN IMMEDIATE`` transaction, so concurrent writers from threads or processes queue
    instead of failing, and no mark is lost. WAL needs a local file system (not NFS).

Reviewer names are free text from a browser: 1-64 printable characters after trimming, stored as given and
only ever passed to SQLite as bound parameters. The CSV export neutralises cells that a spreadsheet would run
as a formula (a leading ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a ``'`` prefix).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinagen.checks import check, int_in
from retinagen.errors import BadInputError, RetinagenError
from retinagen.metrics.acm import ACMResult, acm_from_marks

__all__ = [
    "CSV_COLUMNS",
    "DB_NAME",
    "SCHEMA_VERSION",
    "Mark",
    "ReviewSet",
    "ReviewStore",
    "ReviewerSummary",
    "check_reviewer",
]

DB_NAME = "reviews.sqlite"
SCHEMA_VERSION = 1
MAX_REVIEWER_LENGTH = 64
DEFAULT_BUSY_TIMEOUT_S = 30.0
CSV_COLUMNS = (
    "set_id", "code", "code_kind", "attribute", "sample_index", "seed", "grade", "n", "reviewer",
    "consistent", "marked_utc", "checkpoint_sha256",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_sets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    code TEXT NOT NULL,
    code_index INTEGER NOT NULL CHECK (code_index >= 0),
    code_kind TEXT NOT NULL CHECK (code_kind IN ('categorical', 'bernoulli', 'uniform')),
    attribute TEXT,
    n INTEGER NOT NULL CHECK (n >= 1),
    steps INTEGER NOT NULL CHECK (steps >= 2),
    seed INTEGER NOT NULL CHECK (seed >= 0),
    grade INTEGER,
    code_values TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    folder TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    set_id INTEGER NOT NULL REFERENCES review_sets(id) ON DELETE CASCADE,
    sample_index INTEGER NOT NULL CHECK (sample_index >= 0),
    reviewer TEXT NOT NULL,
    consistent INTEGER NOT NULL CHECK (consistent IN (0, 1)),
    marked_utc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS marks_by_set ON marks (set_id, reviewer, sample_index, id);
"""

# The latest mark per (set, sample, reviewer): the row with the largest id of its group.
_LATEST = """
SELECT m.* FROM marks m
JOIN (SELECT MAX(id) AS id FROM marks WHERE set_id = ? GROUP BY sample_index, reviewer) last ON m.id = last.id
"""


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_reviewer(name: Any) -> str:
    """A reviewer name, trimmed: 1-64 printable characters; `RetinagenError` otherwise (the name is not echoed)."""
    if not isinstance(name, str):
        raise RetinagenError("the reviewer name must be text")
    text = name.strip()
    if not text:
        raise RetinagenError("enter a reviewer name before marking")
    if len(text) > MAX_REVIEWER_LENGTH:
        raise RetinagenError(f"the reviewer name is longer than {MAX_REVIEWER_LENGTH} characters")
    if not text.isprintable():
        raise RetinagenError("the reviewer name holds control characters")
    return text


@dataclass(frozen=True)
class ReviewSet:
    """One set of traversal strips to review. ``folder`` is relative to the database's folder."""

    id: int
    code: str
    code_index: int
    code_kind: str
    attribute: str | None
    n: int
    steps: int
    seed: int
    grade: int | None
    values: tuple[float, ...]
    checkpoint_sha256: str
    folder: str
    created_by: str
    created_utc: str

    @property
    def label(self) -> str:
        """A short description for lists, e.g. ``#3 c4 (pigmentation), n=20, seed 0``."""
        attr = f" ({self.attribute})" if self.attribute else ""
        grade = "" if self.grade is None else f", grade {self.grade}"
        return f"#{self.id} {self.code}{attr}, n={self.n}, seed {self.seed}{grade}"


@dataclass(frozen=True)
class Mark:
    """One mark: sample ``sample_index`` of set ``set_id`` judged consistent (True) or not by ``reviewer``."""

    id: int
    set_id: int
    sample_index: int
    reviewer: str
    consistent: bool
    marked_utc: str


@dataclass(frozen=True)
class ReviewerSummary:
    """A reviewer's progress on a set: samples marked out of n, and the ACM of their marks (None if none)."""

    reviewer: str
    n_marked: int
    n: int
    acm: ACMResult | None


def _row_to_set(row: sqlite3.Row) -> ReviewSet:
    return ReviewSet(
        id=int(row["id"]),
        code=str(row["code"]),
        code_index=int(row["code_index"]),
        code_kind=str(row["code_kind"]),
        attribute=row["attribute"],
        n=int(row["n"]),
        steps=int(row["steps"]),
        seed=int(row["seed"]),
        grade=None if row["grade"] is None else int(row["grade"]),
        values=tuple(float(v) for v in json.loads(row["code_values"])),
        checkpoint_sha256=str(row["checkpoint_sha256"]),
        folder=str(row["folder"]),
        created_by=str(row["created_by"]),
        created_utc=str(row["created_utc"]),
    )


def _row_to_mark(row: sqlite3.Row) -> Mark:
    return Mark(
        id=int(row["id"]),
        set_id=int(row["set_id"]),
        sample_index=int(row["sample_index"]),
        reviewer=str(row["reviewer"]),
        consistent=bool(row["consistent"]),
        marked_utc=str(row["marked_utc"]),
    )


def _csv_safe(value: Any) -> Any:
    """A cell a spreadsheet will not evaluate: text starting with = + - @ tab CR gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class ReviewStore:
    """The review database at ``path`` (created with its tables on first use). See the module docstring.

    Cheap to construct; holds no connection. Safe to use from several threads and processes at once.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        if not (isinstance(busy_timeout_s, int | float) and math.isfinite(busy_timeout_s) and busy_timeout_s > 0):
            raise ValueError(f"busy_timeout_s must be a positive number, got {busy_timeout_s!r}")
        self.path = Path(path)
        self.busy_timeout_s = float(busy_timeout_s)
        if self.path.exists() and not self.path.is_file():
            raise BadInputError(self.path, "the review database path is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init()

    @property
    def folder(self) -> Path:
        """The folder the database lives in; review set folders are relative to it."""
        return self.path.parent

    # ------------------------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every write below opens its own BEGIN IMMEDIATE.
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise BadInputError(self.path, f"cannot open the review database ({exc})") from None
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = NORMAL")  # durable at each WAL checkpoint; safe against corruption
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one BEGIN IMMEDIATE transaction: committed on success, rolled back on error."""
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as con:
            yield con

    def _init(self) -> None:
        try:
            with closing(self._connect()) as con:
                mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise BadInputError(self.path, f"the review database cannot use WAL (journal mode {mode})")
                con.execute("BEGIN IMMEDIATE")
                try:
                    version = con.execute("PRAGMA user_version").fetchone()[0]
                    if version not in (0, SCHEMA_VERSION):
                        raise BadInputError(
                            self.path, f"review database schema {version}; this retinagen reads {SCHEMA_VERSION}"
                        )
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            con.execute(stmt)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise BadInputError(self.path, f"not a usable review database ({exc})") from None

    # ------------------------------------------------------------------------------------------ sets
    def create_set(
        self,
        *,
        code: str,
        code_index: int,
        code_kind: str,
        n: int,
        steps: int,
        seed: int,
        grade: int | None,
        values: Sequence[float],
        checkpoint_sha256: str,
        folder: str,
        created_by: str,
        attribute: str | None = None,
    ) -> ReviewSet:
        """Record a review set (its strips already written to ``folder``, relative to `folder`); returns it."""
        who = check_reviewer(created_by)
        rel = Path(folder)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise RetinagenError(f"review set folder must be relative to {self.folder} without '..'")
        vals = [float(v) for v in values]
        if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
            raise RetinagenError("a review set needs at least 2 finite code values")
        with self._write() as con:
            cur = con.execute(
                "INSERT INTO review_sets (code, code_index, code_kind, attribute, n, steps, seed, grade, code_values,"
                " checkpoint_sha256, folder, created_by, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (code, int(code_index), code_kind, attribute, int(n), int(steps), int(seed),
                 None if grade is None else int(grade), json.dumps(vals), checkpoint_sha256, rel.as_posix(), who,
                 _utc_now()),
            )
            set_id = int(cur.lastrowid or 0)
        return self.get_set(set_id)

    def get_set(self, set_id: int) -> ReviewSet:
        """The set with this id; `RetinagenError` when there is none."""
        with self._read() as con:
            row = con.execute("SELECT * FROM review_sets WHERE id = ?", (int(set_id),)).fetchone()
        if row is None:
            raise RetinagenError(f"no review set #{set_id} in {self.path}")
        return _row_to_set(row)

    def list_sets(self, checkpoint_sha256: str | None = None) -> list[ReviewSet]:
        """Every set (of one checkpoint when given), newest first."""
        with self._read() as con:
            if checkpoint_sha256 is None:
                rows = con.execute("SELECT * FROM review_sets ORDER BY id DESC").fetchall()
            else:
                rows = con.execute(
                    "SELECT * FROM review_sets WHERE checkpoint_sha256 = ? ORDER BY id DESC", (checkpoint_sha256,)
                ).fetchall()
        return [_row_to_set(r) for r in rows]

    def set_folder(self, review_set: ReviewSet) -> Path:
        """The absolute folder of a set's strips."""
        return self.folder / review_set.folder

    # ----------------------------------------------------------------------------------------- marks
    def add_mark(self, set_id: int, sample_index: int, consistent: bool, reviewer: str) -> Mark:
        """Append one mark (checked against the set's n) and return it."""
        who = check_reviewer(reviewer)
        if not isinstance(consistent, bool):
            raise RetinagenError(f"a mark must be True or False, got {consistent!r}")
        sample_index = check(int_in(), sample_index, "sample index", RetinagenError)
        with self._write() as con:
            row = con.execute("SELECT n FROM review_sets WHERE id = ?", (int(set_id),)).fetchone()
            if row is None:
                raise RetinagenError(f"no review set #{set_id} in {self.path}")
            if not 0 <= sample_index < int(row["n"]):
                raise RetinagenError(f"sample index {sample_index} out of range 0..{int(row['n']) - 1}")
            when = _utc_now()
            cur = con.execute(
                "INSERT INTO marks (set_id, sample_index, reviewer, consistent, marked_utc) VALUES (?, ?, ?, ?, ?)",
                (int(set_id), sample_index, who, int(consistent), when),
            )
            mark_id = int(cur.lastrowid or 0)
        return Mark(mark_id, int(set_id), sample_index, who, consistent, when)

    def marks(self, set_id: int, reviewer: str | None = None, *, history: bool = False) -> list[Mark]:
        """Marks of a set (of one reviewer when given): the latest per (sample, reviewer), or every row with
        ``history``; ordered by reviewer, sample, then time."""
        with self._read() as con:
            if history:
                rows = con.execute("SELECT * FROM marks WHERE set_id = ?", (int(set_id),)).fetchall()
            else:
                rows = con.execute(_LATEST, (int(set_id),)).fetchall()
        out = [_row_to_mark(r) for r in rows]
        if reviewer is not None:
            who = check_reviewer(reviewer)
            out = [m for m in out if m.reviewer == who]
        return sorted(out, key=lambda m: (m.reviewer, m.sample_index, m.id))

    def latest_marks(self, set_id: int, reviewer: str) -> dict[int, bool]:
        """Sample index -> the reviewer's latest mark (unmarked samples absent)."""
        return {m.sample_index: m.consistent for m in self.marks(set_id, reviewer)}

    def acm(self, set_id: int, reviewer: str) -> ACMResult | None:
        """The ACM (percent, 95 % margin) of one reviewer's latest marks on a set; None before any mark."""
        marks = self.latest_marks(set_id, reviewer)
        return acm_from_marks(marks) if marks else None

    def summary(self, set_id: int) -> list[ReviewerSummary]:
        """Per reviewer of a set: samples marked and the ACM of their marks, by reviewer name."""
        rs = self.get_set(set_id)
        by: dict[str, dict[int, bool]] = {}
        for m in self.marks(set_id):
            by.setdefault(m.reviewer, {})[m.sample_index] = m.consistent
        return [
            ReviewerSummary(who, len(marks), rs.n, acm_from_marks(marks)) for who, marks in sorted(by.items())
        ]

    # ---------------------------------------------------------------------------------------- export
    def export_csv(self, set_id: int | None = None, *, history: bool = False) -> str:
        """CSV text (`CSV_COLUMNS`) of the latest marks (every row with ``history``) of one set or of all sets."""
        sets = [self.get_set(set_id)] if set_id is not None else sorted(self.list_sets(), key=lambda s: s.id)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        for rs in sets:
            for m in sorted(self.marks(rs.id, history=history), key=lambda m: m.id):
                w.writerow([_csv_safe(v) for v in (
                    rs.id, rs.code, rs.code_kind, rs.attribute or "", m.sample_index, rs.seed,
                    "" if rs.grade is None else rs.grade, rs.n, m.reviewer, int(m.consistent), m.marked_utc,
                    rs.checkpoint_sha256,
                )])
        return buf.getvalue()
