"""Throughput and memory of ``retinagen prepare`` (prints figures; not a test).

    python benchmarks/prepare_throughput.py                       # 200 retina-derived 512 px JPEGs
    python benchmarks/prepare_throughput.py --n 400 --source-size 1024
    python benchmarks/prepare_throughput.py --synthetic           # retinagen synth data instead

Input: ``--n`` fundus photographs in the EyePACS layout, made from scikit-image's real fundus
photograph (``skimage.data.retina()``, 1411 px) resized to ``--source-size`` with per-image
brightness / mirror / small shifts, saved as JPEG quality 90 (or ``--synthetic``: the procedural
generator at ``--source-size``). Real EyePACS photographs are 2-5k px wide, so decoding dominates
there and per-image time grows with the source size: quote the source size with the figures.

For each output resolution (64, 256) and worker count (1 = in this process, 2 = two worker
processes), the whole `prepare_dataset` call is timed (scan, decode, FOV detection, crop, resize,
PNG encoding, ZIP writing). The worker processes' forkserver is started (and torch / MONAI
imported there) once before timing, as a long run pays that only once. Peak RSS: this process
(``ru_maxrss``) and the largest worker process, sampled from /proc every 50 ms (Linux).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from retinagen.data.prepare import prepare_dataset


def make_retina_dataset(root: Path, n: int, size: int, seed: int = 0) -> None:
    from skimage import data

    base = np.asarray(
        Image.fromarray(data.retina()).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32
    )
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = base * rng.uniform(0.7, 1.05)
        img = np.roll(
            img,
            (int(rng.integers(-size // 20, size // 20)), int(rng.integers(-size // 20, size // 20))),
            (0, 1),
        )
        img = img[:, ::-1] if i % 2 else img
        stem = f"{i // 2}_{'right' if i % 2 else 'left'}"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "train" / f"{stem}.jpeg", quality=90)
        rows.append(f"{stem},{int(rng.integers(0, 5))}\n")
    (root / "trainLabels.csv").write_text("image,level\n" + "".join(rows))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class WorkerRssSampler:
    """Largest RSS of any descendant process except the forkserver itself, sampled in a thread."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in _descendants(os.getpid()):
                if p not in self.exclude:
                    self.peak = max(self.peak, _rss_mib(p))
            self._stop.wait(0.05)

    def __enter__(self) -> WorkerRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of input images")
    ap.add_argument("--source-size", type=int, default=512, help="side of the input photographs in px")
    ap.add_argument(
        "--synthetic", action="store_true", help="use retinagen synth data instead of retina-derived"
    )
    ap.add_argument("--resolutions", default="64,256")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is reported")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        t = time.perf_counter()
        if args.synthetic:
            from retinagen.data.synthetic import write_synth_dataset

            write_synth_dataset(root, n=args.n, resolution=args.source_size, seed=0, progress=False)
        else:
            make_retina_dataset(root, args.n, args.source_size)
        print(
            f"made {args.n} {'synthetic' if args.synthetic else 'retina-derived'} {args.source_size} px inputs "
            f"in {time.perf_counter() - t:.1f} s"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
        )

        # Import torch / MONAI here and start the forkserver (which imports them once) outside the timings.
        t = time.perf_counter()
        prepare_dataset("eyepacs", root, 64, Path(tmp) / "warm.zip", workers=1, progress=False)
        prepare_dataset("eyepacs", root, 64, Path(tmp) / "warm.zip", workers=2, progress=False)
        print(f"warm-up incl. imports and worker forkserver start: {time.perf_counter() - t:.1f} s")
        server = set(_descendants(os.getpid()))

        print(
            f"{'res':>5} {'workers':>7} {'kept':>5} {'img/s':>8} {'wall s':>7} {'ZIP MiB':>8} {'worker RSS MiB':>15}"
        )
        for res in (int(r) for r in args.resolutions.split(",")):
            for w in (int(x) for x in args.workers.split(",")):
                out = Path(tmp) / f"d{res}_{w}.zip"
                wall = float("inf")
                with WorkerRssSampler(server) as sampler:
                    for _ in range(args.repeats):  # best of: the machine may be shared
                        t = time.perf_counter()
                        s = prepare_dataset("eyepacs", root, res, out, workers=w, progress=False)
                        wall = min(wall, time.perf_counter() - t)
                rate = (s.n_kept + s.n_rejected) / wall
                print(
                    f"{res:>5} {w:>7} {s.n_kept:>5} {rate:>8.1f} {wall:>7.2f} {out.stat().st_size / 2**20:>8.1f} "
                    f"{sampler.peak if w > 1 else float('nan'):>15.0f}"
                )
        main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process: {main_peak:.0f} MiB")


if __name__ == "__main__":
    main()
