"""Time of one DR-grader training step per architecture (prints figures; not a test).

    python benchmarks/grader_step.py                        # batch 64 at 32 px, 1 thread, every architecture
    python benchmarks/grader_step.py --resolution 64 --threads 2 --arch densenet_small densenet121

One step is what `clinical.grader` runs per batch: forward, cross-entropy, backward, AdamW update, on random
inputs in [-1, 1]. Architectures come from the grader's own registry (`clinical.grader.ARCHITECTURES`). Each is
warmed up, then timed over ``--steps`` steps, interleaved round-robin so that a machine shared with other
work slows all of them alike; the median and p90 per step are printed, with images/s, parameters, the peak
RSS and this machine's measured matmul peak (machines of one kind differ ~3x: compare rows of one run only).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak, peak_rss_mib  # noqa: E402

from clinical.grader import ARCHITECTURES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per architecture")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    peak, how = matmul_peak(cpu, torch.float32)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}; "
          f"measured fp32 matmul peak {peak / 1e12:.3f} TFLOP/s ({how})")
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    y = torch.randint(0, 5, (args.batch,))
    nets = {a: ARCHITECTURES[a](5) for a in args.arch}
    opts = {a: torch.optim.AdamW(n.parameters(), lr=1e-3) for a, n in nets.items()}

    def step(a: str) -> float:
        t0 = time.perf_counter()
        opts[a].zero_grad(set_to_none=True)
        F.cross_entropy(nets[a](x), y).backward()
        opts[a].step()
        return time.perf_counter() - t0

    for a in nets:
        for _ in range(args.warmup):
            step(a)
    times: dict[str, list[float]] = {a: [] for a in nets}
    for _ in range(args.steps):
        for a in nets:
            times[a].append(step(a))
    print(f"\n| architecture | parameters | step median / p90 (batch {args.batch}, {args.resolution} px) | images/s |")
    print("|---|---|---|---|")
    for a, ts in times.items():
        med, p90 = statistics.median(ts), sorted(ts)[max(0, round(0.9 * len(ts)) - 1)]
        n_par = sum(p.numel() for p in nets[a].parameters())
        print(f"| {a} | {n_par / 1e6:.2f} M | {1e3 * med:.0f} / {1e3 * p90:.0f} ms | {args.batch / med:.0f} |")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
