"""Throughput and memory of the procedural synthetic fundus generator (prints figures; not a test).

    python benchmarks/synth_throughput.py                 # render-only (1 core) + end-to-end (2 workers)
    python benchmarks/synth_throughput.py --grid docs/img/synth_grid_64.png --grid-resolution 64
    python benchmarks/synth_throughput.py --grid docs/img/synth_grid_256.png --grid-resolution 256 --grid-n 8

Render-only: ``render_fundus`` in this process with OpenCV limited to one thread, factors sampled
beforehand; reported as images per wall-clock second and per CPU second. End-to-end:
``write_synth_dataset`` (sampling, rendering, JPEG encoding, CSVs, atomic move) with 2 worker
processes into a temporary folder. Peak memory is the maximum resident set size of this process
and of its (worker) children.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from retinagen.data.synthetic import make_sample_grid, render_fundus, sample_factors, write_synth_dataset
from retinagen.fileio import atomic_path


def render_only(resolution: int, n: int, seed: int = 0) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of render_fundus on one core."""
    factors = [sample_factors(np.random.default_rng([seed, i])) for i in range(n)]
    render_fundus(factors[0], resolution)  # warm caches (coordinate grids)
    wall, cpu = time.perf_counter(), time.process_time()
    for f in factors:
        render_fundus(f, resolution)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, n / cpu


def end_to_end(resolution: int, n: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_synth_dataset(
            Path(tmp) / "synth", n=n, resolution=resolution, workers=workers, progress=False
        )
    return summary.images_per_s


def _peak_rss_mib(who: int) -> float:
    kib = resource.getrusage(who).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)


def write_grid(path: Path, resolution: int, n: int, cols: int, seed: int) -> None:
    grid = make_sample_grid(n=n, resolution=resolution, seed=seed, cols=cols)
    ok, buf = cv2.imencode(".png", grid[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    print(f"wrote {path} ({grid.shape[1]}x{grid.shape[0]} px, {n} images at {resolution} px)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", default="64,256", help="comma-separated image sizes")
    ap.add_argument(
        "--n", type=int, default=600, help="images per measurement at 64 px (fewer at larger sizes)"
    )
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the end-to-end run")
    ap.add_argument("--grid", type=Path, help="only write a sample grid PNG to this path")
    ap.add_argument("--grid-resolution", type=int, default=64)
    ap.add_argument("--grid-n", type=int, default=32)
    ap.add_argument("--grid-cols", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.grid is not None:
        cols = min(args.grid_cols, args.grid_n)
        write_grid(args.grid, args.grid_resolution, args.grid_n, cols, args.seed)
        return 0

    cv2.setNumThreads(1)  # "one core": OpenCV would otherwise spread blurs/remaps over threads
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, opencv {cv2.__version__}, {platform.machine()}"
    )
    print(
        f"{'res':>5} {'render img/s (1 core)':>22} {'img/CPU-s':>10} {f'end-to-end img/s ({args.workers} workers)':>30}"
    )
    for res in (int(r) for r in args.resolutions.split(",")):
        n = max(50, int(args.n * (64 / res) ** 2)) if res > 64 else args.n
        wall, cpu = render_only(res, n, args.seed)
        e2e = end_to_end(res, 2 * n, args.workers)
        print(f"{res:>5} {wall:>22.1f} {cpu:>10.1f} {e2e:>30.1f}")
    print(
        f"peak RSS: this process {_peak_rss_mib(resource.RUSAGE_SELF):.0f} MiB, "
        f"largest worker {_peak_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB"
    )
    return 0


if __name__ == "__main__":  # guard needed: the workers are spawned processes that import this file
    raise SystemExit(main())
