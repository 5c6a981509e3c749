"""Score runs with the fixed judges: one table row per checkpoint (prints figures; not a test).

    python benchmarks/quality.py runs/a runs/b                 # newest snapshot of each run
    python benchmarks/quality.py runs/a --all-snapshots        # every snapshot kept in runs/a/checkpoints
    python benchmarks/quality.py runs/a --label "cpu, ADA" --record docs/ablations.md

Each row: the label (default: the run folder's name), MSI, kimg, training wall time, fd_fundus, precision and
recall (k = 3) against the judges' reference set (a grade-conditional model asked for the reference's grade
mix), grade fidelity per requested grade and per grade group (0-1, 2, 3-4: p summed over the group's grades
>= 0.5), the referable agreement and the grade shift (grade-conditional models; `quality.grade_shift`, real
fundi 2.2-4.5 grey levels), Q's L_info of the discrete codes against H(C), MIG on the reference set's
ground-truth factors and ACM (%) of pigmentation / glare / field of view / brightness. The judges
(`retinagen.metrics.judges`) are built once per resolution from synthetic data of a seed no training run uses
and cached under ``--judges-dir``; their id is printed with the table, and only rows of one judge id compare.
``--record`` appends the table, the exact command and this machine's matmul peak to a Markdown file
(docs/ablations.md keeps every row so anyone can rerun it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak  # noqa: E402

from retinagen.dr_scale import GRADE_GROUPS, group_name  # noqa: E402
from retinagen.generation import load_model  # noqa: E402
from retinagen.metrics.judges import JudgeSpec, default_judges_dir, get_judges  # noqa: E402
from retinagen.metrics.quality import ACM_ATTRIBUTES, score_checkpoint  # noqa: E402
from retinagen.run_dir import RunDir  # noqa: E402
from retinagen.training.checkpoint import latest_valid_checkpoint, list_checkpoints  # noqa: E402

ACM_SHORT = {"pigmentation": "pig", "glare": "glare", "fov_area": "fov", "brightness": "bright"}


def checkpoints_of(path: Path, every: bool) -> list[Path]:
    """The checkpoint files a command-line path names: a checkpoint, or a run folder's newest / every one."""
    if path.is_file():
        return [path]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if every:
        found = list_checkpoints(folder)
    else:
        latest = latest_valid_checkpoint(folder)
        found = [latest] if latest is not None else []
    if not found:
        raise SystemExit(f"error: {path}: no complete checkpoint found")
    return found


def _f(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    grades = sorted({g for r in rows for g in r.get("fidelity", {})}, key=int)
    head = ["run", "MSI", "kimg", "train min", "fd_fundus", "precision", "recall"]
    groups = [group_name(g) for g in GRADE_GROUPS if any(group_name(g) in r.get("group_fidelity", {}) for r in rows)]
    head += [f"fidelity g{g}" for g in grades] + [f"group {g}" for g in groups]
    head += ["referable agr.", "grade shift"] if grades else []
    head += ["L_info / H(C)", "MIG"] + [f"ACM {ACM_SHORT[a]}" for a in ACM_ATTRIBUTES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        secs = r.get("train_seconds")
        cells = [r["label"], r["msi"], _f(r.get("kimg"), 1), _f(secs / 60 if secs else None, 1)]
        cells += [_f(r["fd_fundus"], 1), _f(r["precision"], 3), _f(r["recall"], 3)]
        cells += [_f(r.get("fidelity", {}).get(g), 3) for g in grades]
        cells += [_f(r.get("group_fidelity", {}).get(g), 3) for g in groups]
        if grades:
            cells += [_f(r.get("referable_agreement"), 3), _f(r.get("grade_shift"), 1)]
        li = r.get("L_info_discrete")
        cells.append("—" if li is None else f"{li:.2f} / {r['H_discrete']:.2f}")
        cells.append(_f(r.get("mig"), 3))
        cells += [_f(r.get("acm", {}).get(a), 0) for a in ACM_ATTRIBUTES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="run folders or checkpoint files")
    ap.add_argument("--all-snapshots", action="store_true", help="every kept snapshot, not only the newest")
    ap.add_argument("--label", action="append", default=None, help="row label per path (default: folder name)")
    ap.add_argument("--n", type=int, default=1000, help="generated images per score (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="leave out MIG and ACM (the training-time part)")
    ap.add_argument("--no-acm", action="store_true", help="leave out ACM (discovery + ACM is the slow part)")
    ap.add_argument("--judges-dir", type=Path, default=None, help=f"judges cache (default {default_judges_dir()})")
    ap.add_argument("--judge-train", type=int, default=JudgeSpec.n_train, help="judge training images")
    ap.add_argument("--judge-reference", type=int, default=JudgeSpec.n_reference, help="reference images")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="append each row as a JSON line here")
    ap.add_argument("--record", type=Path, default=None, help="append the table and command to this Markdown file")
    args = ap.parse_args(argv)
    if args.n < 8:
        ap.error("--n must be >= 8")
    if args.label and len(args.label) != len(args.paths):
        ap.error(f"{len(args.label)} --label for {len(args.paths)} paths")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, how = matmul_peak(torch.device("cpu"), torch.float32)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
               f"measured fp32 matmul peak {peak / 1e12:.3f} TFLOP/s ({how})")
    print(f"# {machine}", flush=True)

    rows: list[dict[str, Any]] = []
    judges_by_res: dict[int, Any] = {}
    for i, path in enumerate(args.paths):
        for ck in checkpoints_of(path, args.all_snapshots):
            model = load_model(ck)
            res = model.resolution
            if res not in judges_by_res:
                spec = JudgeSpec(resolution=res, n_train=args.judge_train, n_reference=args.judge_reference)
                t0 = time.perf_counter()
                judges_by_res[res] = get_judges(spec, args.judges_dir)
                v = judges_by_res[res].meta["validation"]
                print(f"# judges {judges_by_res[res].judge_id} at {res} px ({time.perf_counter() - t0:.0f} s): "
                      f"grade accuracy {v.get('grade_accuracy', float('nan')):.3f} "
                      f"(per grade {json.dumps(v.get('grade_accuracy_per_grade'))}), "
                      f"referable {v.get('referable_accuracy', float('nan')):.3f}, "
                      f"fd half vs half {v['fd_half_vs_half']:.2f}", flush=True)
            row = score_checkpoint(model, judges_by_res[res], n=args.n, seed=args.seed, quick=args.quick,
                                   acm=not args.no_acm)
            run = RunDir.of_checkpoint(ck)
            row["label"] = (args.label[i] if args.label else (run.root if run else path).name) + (
                f" @{ck.stem}" if args.all_snapshots else "")
            row["checkpoint"] = str(ck)
            rows.append(row)
            print(f"# {row['label']}: scored in {row['score_seconds']:.0f} s", flush=True)
            if args.json:
                with args.json.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
    text = table(rows)
    judges = sorted({r["judge"] for r in rows})
    print(f"\njudges {', '.join(judges)}; n = {args.n}, seed {args.seed}\n")
    print(text)
    if args.record:
        cmd = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        block = (f"\n### {time.strftime('%Y-%m-%d')}: {', '.join(r['label'] for r in rows)}\n\n"
                 f"`{cmd}`  \n{machine}; judges {', '.join(judges)}; n = {args.n}, seed {args.seed}\n\n{text}\n")
        with args.record.open("a", encoding="utf-8") as fh:
            fh.write(block)
        print(f"\nrecorded in {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
