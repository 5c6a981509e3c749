"""The metrics ``retinagen evaluate`` computes: name, what it measures, and the runner group that computes it.

Light on purpose (no torch): the CLI builds its ``--metrics`` choices and help from `METRICS`, and the
dashboard its labels. `retinagen.metrics.evaluate` registers one runner per group and refuses to import when a
group here has none. Metrics of one group share their work (FID and KID come from the same Inception features).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_METRICS", "KNOWN_METRICS", "METRICS", "MetricInfo", "metrics_help"]


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    group: str


# In the order they run and are listed.
METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("fid", "Fréchet Inception distance, mean ± std over repeats (needs the Inception-v3 weights)", "inception"),
        MetricInfo("kid", "kernel Inception distance on the same features", "inception"),
        MetricInfo("mig", "mutual information gap and max I(V; C) of Q on the real labelled images", "mig"),
        MetricInfo("acm", "attribute control: consistently controlled samples (%) per discovered attribute", "acm"),
        MetricInfo("fd_fundus", "Fréchet distance and KID on the project's fundus encoder", "fd_fundus"),
    )
}
KNOWN_METRICS = tuple(METRICS)
DEFAULT_METRICS = KNOWN_METRICS


def metrics_help() -> str:
    """``--metrics`` help: the names, comma-separated."""
    return "Comma-separated, any of: " + ",".join(KNOWN_METRICS)
