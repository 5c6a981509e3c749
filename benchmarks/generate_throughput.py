"""Generation throughput of G (no gradients, what `generate`, `rebalance` and the dashboard run).

Prints, per resolution and width preset: images/s, ms per batch and peak memory, for the modulated
convolution's default form and, with ``--modconv ab``, its grouped and unfused forms interleaved batch
by batch in one process with the default rule (the measurement behind `layers.fused_modconv_default`).

    python benchmarks/generate_throughput.py                                   # CPU, cpu widths 32/64/128
    python benchmarks/generate_throughput.py --modconv ab --resolutions 32,64 --threads 2
    python benchmarks/generate_throughput.py --device cuda --widths paper --resolutions 256 --batch 64
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import sys
import time

import torch
from train_throughput import WIDTHS, matmul_peak  # benchmarks/ is on sys.path when run as a script

from retinagen.config import load_run_config, parse_overrides
from retinagen.networks import generator, layers
from retinagen.networks.build import build_g, latent_spec, num_classes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(resolution: int, widths: str, device: str, amp: str):
    overrides = [f"model.resolution={resolution}", f"train.device={device}", f"train.amp={amp}", *WIDTHS[widths]]
    cfg = load_run_config("synthfundus", overrides=parse_overrides(overrides))
    torch.manual_seed(0)
    g = build_g(cfg).to(device).eval().requires_grad_(False)
    return cfg, g


def time_batches(g, cfg, device: torch.device, batch: int, batches: int, amp: str, form: bool | None) -> list[float]:
    """Seconds per batch over ``batches`` batches (after one warm-up batch) with the modulated convolution
    in ``form`` (None: the default rule)."""
    spec = latent_spec(cfg.latent)
    gen = torch.Generator().manual_seed(1)
    sample = spec.sample(batch, gen, device)
    grade = torch.randint(0, 5, (batch,), generator=gen).to(device) if num_classes(cfg) else None
    use_bf16 = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    original = generator.modulated_conv2d
    generator.modulated_conv2d = functools.partial(layers.modulated_conv2d, fused=form)
    try:
        out = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            for i in range(batches + 1):
                t = time.perf_counter()
                g(sample.z_noise, sample.code(), grade, noise_mode="const")
                _sync(device)
                if i:
                    out.append(time.perf_counter() - t)
        return out
    finally:
        generator.modulated_conv2d = original


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--resolutions", default="32,64,128", help="comma separated (default 32,64,128)")
    ap.add_argument("--widths", default="cpu", help="cpu, paper or cpu,paper (default cpu)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--batches", type=int, default=5, help="timed batches (default 5)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    ap.add_argument("--modconv", default="default", choices=["default", "ab"],
                    help="ab: the grouped form, the unfused form and the default rule interleaved batch by batch")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.batches < 1:
        ap.error("--batch and --batches must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak, path = matmul_peak(device, torch.bfloat16 if device.type == "cuda" and args.amp != "off" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; measured dense matmul peak ({path}): {peak / 1e12:.3f} TFLOP/s")
    forms = {"default": None} if args.modconv == "default" else {"grouped": True, "unfused": False, "default": None}
    print(f"{'res':>4} {'widths':>6} {'batch':>5} " + " ".join(f"{f + ' img/s':>15}" for f in forms)
          + (f" {'unfused/grouped (min-max)':>26}" if args.modconv == "ab" else "") + f" {'peak MiB':>9}")
    for w in args.widths.split(","):
        for res in (int(r) for r in args.resolutions.split(",")):
            cfg, g = build(res, w, args.device, args.amp)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times: dict[str, list[float]] = {f: [] for f in forms}
            for _ in range(args.batches):  # interleaved, one batch of each form per round
                for f, form in forms.items():
                    times[f] += time_batches(g, cfg, device, args.batch, 1, args.amp, form)
            rates = {f: args.batch / statistics.median(t) for f, t in times.items()}
            row = f"{res:>4} {w:>6} {args.batch:>5} " + " ".join(f"{rates[f]:>15.1f}" for f in forms)
            if args.modconv == "ab":
                ratios = sorted(g_ / u for g_, u in zip(times["grouped"], times["unfused"], strict=True))
                row += f" {f'{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})':>26}"
            print(row + f" {_peak_mib(device):>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
