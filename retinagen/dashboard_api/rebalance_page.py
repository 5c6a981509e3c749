"""The Rebalance page: grade histograms, target strings and a background `clinical.rebalance.rebalance` job."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinagen.dashboard_api.controls_page import _check_seed
from retinagen.dashboard_api.run import DashboardRun
from retinagen.dr_scale import grade_label  # re-exported: the pages call api.grade_label
from retinagen.errors import BadInputError, RetinagenError

REBALANCE_DIR = "dashboard_rebalance"
# A browser request may not start an arbitrarily large job; bigger rebalances belong to `retinagen rebalance`.
MAX_DASHBOARD_REBALANCE = 5000


def grade_histogram(dataset: str | Path) -> tuple[list[int], str]:
    """Images per DR grade in the training split of a prepared ZIP (all images without splits), and the split.

    The same images `clinical.rebalance.rebalance` counts. Raises `BadInputError` for an unlabelled dataset.
    """
    from retinagen.data.dataset import ZipImageDataset, read_dataset_json

    dataset = Path(dataset)
    split = "train" if (read_dataset_json(dataset).get("splits") or {}) else None
    ds = ZipImageDataset(dataset, split=split)
    if ds.num_classes == 0:
        raise BadInputError(dataset, "the dataset has no DR grades; rebalancing needs a graded dataset")
    labels = ds.labels[ds.labels >= 0]
    return np.bincount(labels, minlength=ds.num_classes).astype(int).tolist(), split or "all"


def rebalance_target(kind: str, *, counts: Mapping[int, int] | None = None, ratio: float | None = None,
                     num_classes: int = 5) -> str:
    """The ``--target`` string of a dashboard choice, validated by `clinical.rebalance.parse_target`."""
    from clinical.rebalance import parse_target

    if kind == "uniform":
        text = "uniform"
    elif kind == "counts":
        text = "counts:" + ",".join(f"{int(g)}={int(n)}" for g, n in sorted((counts or {}).items()))
    elif kind == "ratio":
        text = f"ratio:{ratio!r}"
    else:
        raise RetinagenError(f"unknown target kind {kind!r}; expected uniform, counts or ratio")
    return parse_target(text, num_classes).canonical()


def rebalance_plan(real_counts: Sequence[int], target: str) -> list[int]:
    """Synthetic images per grade that ``target`` asks for (`clinical.rebalance.synthetic_counts`)."""
    from clinical.rebalance import parse_target, synthetic_counts

    return synthetic_counts(parse_target(target, len(real_counts)), real_counts)


class RebalanceJob:
    """`clinical.rebalance.rebalance` in a background thread, into a fresh folder under the run's state folder.

    ``progress()`` counts the synthetic PNGs written so far (each is written atomically when kept), so a page can
    poll it; ``result`` is the `RebalanceSummary` once done, ``error`` the message of a `RetinagenError`.
    """

    def __init__(self, out: Path, total: int, thread: threading.Thread) -> None:
        self.out = out
        self.total = total
        self._thread = thread
        self.result: Any = None
        self.error: str | None = None

    @classmethod
    def start(cls, run: DashboardRun, dataset: str | Path, target: str, *, seed: int = 0,
              grader: Path | None = None, gate_threshold: float = 0.5, copy_real: bool = False) -> RebalanceJob:
        """Check the request, then start. ``dataset`` must be one of ``run.datasets`` and ``grader`` one of
        ``run.graders`` (the browser picks from lists; it never types a path)."""
        from clinical.rebalance import rebalance

        dataset = Path(dataset).resolve()
        if dataset not in run.datasets:
            raise RetinagenError(f"{dataset.name}: not one of this run's datasets")
        if grader is not None and Path(grader) not in run.graders:
            raise RetinagenError(f"{Path(grader).name}: not one of this run's graders")
        if not run.conditional:
            raise RetinagenError(f"{run.model.path.name} is not DR-grade conditional; it cannot rebalance grades")
        real, _ = grade_histogram(dataset)
        need = rebalance_plan(real, target)
        if sum(need) > MAX_DASHBOARD_REBALANCE:
            raise RetinagenError(
                f"this target asks for {sum(need):,} synthetic images; the dashboard makes at most "
                f"{MAX_DASHBOARD_REBALANCE:,} per run: use `retinagen rebalance` for more"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = run.state_dir / REBALANCE_DIR / f"{stamp}-{uuid.uuid4().hex[:6]}"
        job: RebalanceJob

        def work() -> None:
            try:
                job.result = rebalance(run.model, dataset, out, target=target, seed=_check_seed(seed),
                                       grader=grader, gate_threshold=gate_threshold, copy_real=copy_real,
                                       progress=False)
            except RetinagenError as exc:
                job.error = str(exc)
            except OSError as exc:
                job.error = f"{out}: {exc.strerror or exc}"
            except Exception as exc:  # noqa: BLE001 - a bug must still end the job visibly, not look like success
                job.error = f"internal error ({type(exc).__name__}: {exc}); please report it"

        job = cls(out, sum(need), threading.Thread(target=work, name="retinagen-rebalance", daemon=True))
        job._thread.start()
        return job

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job; True when it has finished."""
        self._thread.join(timeout)
        return self.done

    def progress(self) -> tuple[int, int]:
        """(synthetic images written so far, images requested)."""
        folder = self.out / "train"
        n = sum(1 for _ in folder.glob("synth_g*_*.png")) if folder.is_dir() else 0
        return min(n, self.total), self.total

    def report(self) -> dict[str, Any] | None:
        """The finished run's ``rebalance_report.json`` (None before)."""
        from clinical.rebalance import REPORT_FILE

        path = self.out / REPORT_FILE
        if not self.done or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))


def gate_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-grade rows of a rebalance report: real, requested, generated, tries, rejected, rejection rate,
    shortfall, mean gate probability (None without a gate)."""
    rows = []
    for r in report.get("per_grade", []):
        rows.append({
            "grade": grade_label(int(r["grade"])), "real": r["real"], "requested": r["requested"],
            "generated": r["generated"], "tries": r["tries"], "rejected": r["rejected"],
            "rejection rate": r.get("rejection_rate"), "shortfall": r["shortfall"],
            "mean gate prob": r.get("mean_gate_prob"),
        })
    return rows
