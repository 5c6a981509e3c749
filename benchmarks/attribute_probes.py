"""How well the fundus attribute probes follow the synthetic renderer's ground truth (prints figures; not a test).

    python benchmarks/attribute_probes.py                            # 240 images, seeds 0-3, 64/128/256 px

For each resolution and seed: ``n`` images of `sample_factors` with uniform DR grades, rendered, measured by
every probe of `retinagen.metrics.attributes`, and the Spearman rho of each probe with its ground-truth factor
(`synthetic_truth`). Prints rho per seed, its range over the seeds, the probes' images/s and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
from scipy.stats import spearmanr

from retinagen.data.synthetic import render_fundus, sample_factors
from retinagen.metrics.attributes import ATTRIBUTES, measure, synthetic_truth

UNIFORM_GRADES = (0.2, 0.2, 0.2, 0.2, 0.2)  # lesion counts over the whole range, not mostly 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="images per resolution and seed (default 240)")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--resolutions", default="64,128,256")
    args = ap.parse_args(argv)
    if args.n < 3:
        ap.error("--n must be at least 3")
    seeds = [int(s) for s in args.seeds.split(",")]
    names = list(ATTRIBUTES)
    print(f"{'px':>4} {'seed':>4} " + " ".join(f"{n[:15]:>15}" for n in names) + f" {'probe img/s':>11}")
    for res in (int(r) for r in args.resolutions.split(",")):
        rhos: dict[str, list[float]] = {n: [] for n in names}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            factors = [sample_factors(rng, UNIFORM_GRADES) for _ in range(args.n)]
            images = np.stack([render_fundus(f, res) for f in factors])
            t0 = time.perf_counter()
            values = measure(images)
            rate = args.n / (time.perf_counter() - t0)
            truth = synthetic_truth(factors)
            row = []
            for n in names:
                rho = float(spearmanr(values[n], truth[n]).statistic)
                rhos[n].append(rho)
                row.append(f"{rho:>15.3f}")
            print(f"{res:>4} {seed:>4} " + " ".join(row) + f" {rate:>11.1f}", flush=True)
        spans = " ".join(f"{f'{min(v):.2f}-{max(v):.2f}':>15}" for v in rhos.values())
        print(f"{res:>4} {'all':>4} {spans}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"({args.n} images per row, Spearman rho with the ground-truth factor; peak RSS {peak:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
