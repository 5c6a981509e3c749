"""Validate the fixed judges as Heusel et al. (2017) validated FID (prints figures; not a test).

    python benchmarks/judges.py                      # the 32 px judges (built and cached first if needed)
    python benchmarks/judges.py --resolution 64 --n 1000

Prints the judges' own held-out figures (grade accuracy per grade and referable accuracy of the judge
grader on the reference set, fd_fundus of one half of it against the other), then fd_fundus, precision and
recall of ``--n`` held-out real-like fundi (a `retinagen synth` seed neither the judges nor any run use) as
they are and under every disturbance of `retinagen.metrics.judges.DISTURBANCES`: rising blur, noise,
colour shift and occlusion must raise fd_fundus, and mode dropping must lower recall.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak  # noqa: E402

from retinagen.metrics.judges import (  # noqa: E402
    JudgeSpec,
    default_judges_dir,
    disturbance_table,
    get_judges,
    held_out_real,
)

HELD_OUT_SEED = 99_991


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--n", type=int, default=1000, help="held-out real images")
    ap.add_argument("--judge-train", type=int, default=JudgeSpec.n_train)
    ap.add_argument("--judge-reference", type=int, default=JudgeSpec.n_reference)
    ap.add_argument("--judges-dir", type=Path, default=None, help=f"judges cache (default {default_judges_dir()})")
    args = ap.parse_args(argv)
    peak, how = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"# {torch.get_num_threads()} thread(s), measured fp32 matmul peak {peak / 1e12:.3f} TFLOP/s ({how})")
    spec = JudgeSpec(resolution=args.resolution, n_train=args.judge_train, n_reference=args.judge_reference)
    t0 = time.perf_counter()
    judges = get_judges(spec, args.judges_dir)
    print(f"# judges {judges.judge_id} ({judges.folder}), ready in {time.perf_counter() - t0:.0f} s")
    print(json.dumps(judges.meta["validation"], indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        imgs, grades, factors, names = held_out_real(spec, args.n, HELD_OUT_SEED, Path(tmp))
    rows = disturbance_table(judges, imgs, grades, factors, names)
    print(f"\nheld-out real images: {len(imgs)} (seed {HELD_OUT_SEED}), judges {judges.judge_id}\n")
    print("| disturbance | level | fd_fundus | precision | recall |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['disturbance']} | {r['level']:g} | {r['fd_fundus']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
