"""Latency of the dashboard's Controls page: a code slider moved, to the new image (prints figures; not a test).

    python benchmarks/dashboard_latency.py                       # the shipped model
    python benchmarks/dashboard_latency.py --run runs/cpu --n 40

Two figures per run folder, both with one torch thread as the dashboard uses:
- ``render_image``: the model call alone (`retinagen.dashboard_api.measure_latency`, one uniform code swept).
- AppTest rerun: Streamlit's script rerun of the whole Controls page after the slider moves
  (`streamlit.testing.v1.AppTest`, no browser, no network), which is what the server does per change.
Median and p95 over ``--n`` changes after one warm-up, with this machine's measured matmul peak (machines of one
kind differ ~3x: compare rows of one run only). What a browser adds on top (websocket, image decode) is not
measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak  # noqa: E402

from retinagen import dashboard_api as api  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "apps" / "dashboard.py")


def apptest_rerun_ms(run_dir: Path, n: int) -> tuple[float, float]:
    from streamlit.testing.v1 import AppTest

    os.environ[api.RUN_ENV] = str(run_dir)
    at = AppTest.from_file(APP, default_timeout=300).run()
    if at.exception:
        raise SystemExit(f"the dashboard failed on {run_dir}: {[e.value for e in at.exception]}")
    run = api.load_run(run_dir, environ={})
    slider = next((c for c in api.code_controls(run) if c.kind == "uniform"), None)
    if slider is None:
        raise SystemExit(f"{run_dir}: the model has no uniform code to move")
    times = []
    for j in range(n + 1):
        at.slider(key=f"ctl_code_{slider.index}").set_value(round(-1.0 + 2.0 * j / n, 2))
        t = time.perf_counter()
        at.run()
        if j:  # the first change is the warm-up
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times), float(np.percentile(times, 95))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", default=[None], help="run folders (default: the shipped model)")
    ap.add_argument("--n", type=int, default=30, help="slider changes per figure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    peak, how = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"# 1 torch thread; measured fp32 matmul peak {peak / 1e12:.3f} TFLOP/s ({how})")
    print("\n| Model | `render_image` median / p95 | AppTest rerun median / p95 |")
    print("| --- | --- | --- |")
    for r in args.run:
        run_dir = api.resolve_run_dir(r)
        run = api.load_run(run_dir, environ={})
        lat = api.measure_latency(run.model, n=args.n)
        med, p95 = apptest_rerun_ms(run_dir, args.n)
        name = "shipped model" if r is None else str(r)
        print(f"| {name}, {run.model.resolution} px | {lat['median_ms']:.1f} / {lat['p95_ms']:.1f} ms | "
              f"{med:.1f} / {p95:.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
