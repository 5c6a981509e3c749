"""DR-grade rebalancing: synthetic images from a grade-conditional checkpoint fill up the rare grades.

* `clinical.rebalance.targets`: targets (``uniform``, ``counts:...``, ``ratio:R``), code steering, try seeds;
* `clinical.rebalance.files`: the output folder's layout and safety checks, CSV files, real copies;
* `clinical.rebalance.job`: `rebalance` itself (generation, quality gate, resuming, the report).

The names below are the package's API; import them from here.
"""

from clinical.rebalance.files import MANIFEST_COLUMNS, REPORT_FILE
from clinical.rebalance.job import DEFAULT_MAX_TRIES_FACTOR, RebalanceSummary, rebalance
from clinical.rebalance.targets import (
    GRADE_STRIDE,
    RebalanceTarget,
    SteerPlan,
    parse_steer,
    parse_target,
    spread_value,
    synthetic_counts,
    synthetic_name,
    try_seed,
)

__all__ = [
    "DEFAULT_MAX_TRIES_FACTOR",
    "GRADE_STRIDE",
    "MANIFEST_COLUMNS",
    "REPORT_FILE",
    "RebalanceSummary",
    "RebalanceTarget",
    "SteerPlan",
    "parse_steer",
    "parse_target",
    "rebalance",
    "spread_value",
    "synthetic_counts",
    "synthetic_name",
    "try_seed",
]
