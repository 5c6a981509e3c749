"""The training-time judge scores of runs, one Markdown table per run (what docs/ablations.md shows per snapshot).

    python benchmarks/snapshot_table.py runs/abl/base runs/abl/beta01

Reads RUN/metrics.jsonl: every snapshot's ``quality/*`` row (fd_fundus, precision, recall, grade fidelity,
referable agreement, L_info of the discrete codes against H(C), scored on ``train.quality_n`` images; z share,
the share of the images' variety the noise latent makes, where logged), the training minutes up to it and,
for ADA runs, the augmentation strength p at that snapshot, for progressively grown runs the stage
(resolution, and the fade's alpha while one runs). Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from retinagen.run_dir import RunDir


def rows(run: Path) -> tuple[list[dict], dict[float, float], dict[float, str]]:
    """(scored snapshots, ADA's p by kimg, the growing stage by kimg) of one run."""
    path = RunDir(run).metrics
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found (is {run} a run folder?)")
    scored, ada, stage = [], {}, {}
    for line, rec in RunDir(run).log():
        if rec is None:
            print(f"warning: {path}: a line that is not JSON (or not an object), skipped: {line[:60]!r}", file=sys.stderr)
            continue
        if "quality/fd_fundus" in rec:
            scored.append(rec)
        if "augment/p" in rec:
            ada[float(rec["kimg"])] = float(rec["augment/p"])
        if "grow/resolution" in rec:
            alpha = float(rec.get("grow/alpha", 1.0))
            stage[float(rec["kimg"])] = f"{rec['grow/resolution']:.0f}" + (f" ({alpha:.2f})" if alpha < 1 else "")
    return scored, ada, stage


def _at(values: dict[float, str], kimg: float) -> str:
    """The last logged value at or before ``kimg`` (logging steps and snapshots need not coincide)."""
    before = [k for k in values if k <= kimg + 1e-9]
    return values[max(before)] if before else "–"


def _f(rec: dict, key: str, fmt: str) -> str:
    v = rec.get(key)
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table(run: Path, label: str | None = None) -> str:
    scored, ada, stage = rows(run)
    if not scored:
        return f"**{label or run.name}**: no scored snapshot in {run / 'metrics.jsonl'}\n"
    minutes = scored[-1].get("quality/train_seconds", float("nan")) / 60.0
    head = "| kimg | fd_fundus | precision | recall | fidelity g0-g4 | referable agr. | L_info / H(C) |"
    sep = "|---|---|---|---|---|---|---|"
    groups = any("quality/group_fidelity/3-4" in rec for rec in scored)  # logged since 2026-12-08
    if groups:
        head, sep = head + " groups 0-1 / 2 / 3-4 |", sep + "---|"
    z_share = any("quality/z_share" in rec for rec in scored)  # logged since 2026-12-07
    if z_share:
        head, sep = head + " z share |", sep + "---|"
    minutes_logged = any("quality/train_seconds" in rec for rec in scored)
    if minutes_logged:
        head, sep = head + " min |", sep + "---|"
    if ada:
        head, sep = head + " ADA p |", sep + "---|"
    if stage:
        head, sep = head + " stage px |", sep + "---|"
    out = [f"**{label or run.name}** ({minutes:.0f} min of training)", "", head, sep]
    for rec in scored:
        grades = sorted(int(k.rsplit("/", 1)[1]) for k in rec if k.startswith("quality/fidelity/"))
        fid = " / ".join(_f(rec, f"quality/fidelity/{g}", ".2f") for g in grades) or "–"
        kimg = float(rec["kimg"])
        shown = f"{kimg:.0f}" if kimg.is_integer() else f"{kimg:.2f}"  # a budget's last snapshot: 12.18
        line = (f"| {shown} | {_f(rec, 'quality/fd_fundus', '.1f')} | {_f(rec, 'quality/precision', '.3f')} | "
                f"{_f(rec, 'quality/recall', '.3f')} | {fid} | {_f(rec, 'quality/referable_agreement', '.2f')} | "
                f"{_f(rec, 'quality/L_info_discrete', '.2f')} / {_f(rec, 'quality/H_discrete', '.2f')} |")
        if groups:
            line += " " + " / ".join(_f(rec, f"quality/group_fidelity/{g}", ".2f") for g in ("0-1", "2", "3-4")) + " |"
        if z_share:
            line += f" {_f(rec, 'quality/z_share', '.2f')} |"
        if minutes_logged:
            secs = rec.get("quality/train_seconds")
            line += f" {secs / 60.0:.1f} |" if isinstance(secs, (int, float)) else " – |"
        if ada:
            line += f" {_at({k: f'{v:.2f}' for k, v in ada.items()}, kimg)} |"
        if stage:
            line += f" {_at(stage, kimg)} |"
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders")
    ap.add_argument("--label", action="append", default=None, help="table title per run (default: folder name)")
    args = ap.parse_args(argv)
    labels = args.label or []
    if len(labels) > len(args.runs):
        ap.error("more --label than runs")
    for i, run in enumerate(args.runs):
        print(table(run, labels[i] if i < len(labels) else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
