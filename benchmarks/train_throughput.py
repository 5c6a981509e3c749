"""Training throughput of a full MSI step (D phase with Q, lazy R1 every 16, G phase, EMA).

Prints, per resolution and width preset: images/s, ms/step, peak memory, FLOPs per image (counted
with torch.utils.flop_counter, forward + backward + R1's double backward, amortised over the R1
interval) and the achieved FLOP/s as a fraction of this machine's measured dense-matmul peak.

    python benchmarks/train_throughput.py                       # CPU: cpu widths 64/128/256 + paper widths 64
    python benchmarks/train_throughput.py --device cuda --widths paper --resolutions 256 --batch 32
    python benchmarks/train_throughput.py --compile-ab --widths cpu --resolutions 32,64 --steps 10
    python benchmarks/train_throughput.py --baseline origin/main --widths cpu --resolutions 32,64 --repeats 3
    python benchmarks/train_throughput.py --profile --widths cpu --resolutions 64    # per-op table, 16 steps
    python benchmarks/train_throughput.py --set-ab train.reuse_fakes=true --widths cpu --resolutions 32,64 --steps 16

On CUDA it also prints seconds per kimg (the StyleGAN2-ADA paper quotes 21.6-24.2 s/kimg at 256 px,
batch 32, on one V100).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from retinagen.config import load_run_config, parse_overrides
from retinagen.training.loop import Trainer

WIDTHS = {
    # The cpu preset (configs/presets/cpu.yaml) and the paper's StyleGAN widths (configs/presets/gpu.yaml).
    "cpu": ["model.w_dim=128", "model.mapping_layers=4", "model.g_channel_base=2048", "model.g_channel_max=128",
            "model.d_channel_base=2048", "model.d_channel_max=128", "latent.z_dim=128"],
    "paper": ["model.w_dim=512", "model.mapping_layers=8", "model.g_channel_base=16384", "model.g_channel_max=512",
              "model.d_channel_base=16384", "model.d_channel_max=512", "latent.z_dim=512"],
}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> tuple[float, str]:
    """Measured dense-matmul FLOP/s of this machine (the denominator of the utilisation figure).

    Two GEMM paths are timed and the faster one is the peak: ``torch.mm`` (MKL or cuBLAS) and the same
    GEMM as a 1x1 convolution (oneDNN on CPUs). On AMD CPUs MKL's sgemm runs well below the chip's
    peak while oneDNN does not, so taking torch.mm alone would inflate the utilisation figures.
    """
    import torch.nn.functional as F

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(1, n, 64, 64, device=device, dtype=dtype)
    w = torch.randn(n, n, 1, 1, device=device, dtype=dtype)
    candidates = {
        "torch.mm": (lambda: a @ b, 2 * n**3),
        "1x1 conv GEMM": (lambda: F.conv2d(x, w), 2 * n * n * 64 * 64),
    }
    best_rate, best_name = 0.0, ""
    for name, (fn, flops) in candidates.items():
        for _ in range(2):
            fn()
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        if flops / best > best_rate:
            best_rate, best_name = flops / best, name
    return best_rate, best_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _GlobalOnly:
    """Stand-in for FlopCounterMode's module tracker: we need the total only, and the tracker's
    backward hooks fail under R1's ``autograd.grad`` on a leaf input."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` (forward and backward). The modulated convolutions are counted in their unfused
    form - the same function as one ordinary convolution - because the flop counter's formula for the
    backward of a grouped convolution with per-sample kernels overcounts by about the batch size."""
    import functools

    from retinagen.networks import generator, layers

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    original = generator.modulated_conv2d
    generator.modulated_conv2d = functools.partial(layers.modulated_conv2d, fused=False)
    try:
        with counter:
            fn()
    finally:
        generator.modulated_conv2d = original
    return counter.get_total_flops()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(resolution: int, widths: str, batch: int, steps: int, device: str, amp: str, compile_: bool) -> dict:
    overrides = [f"model.resolution={resolution}", f"train.batch_size={batch}", f"train.device={device}",
                 f"train.amp={amp}", f"train.compile={str(compile_).lower()}", *WIDTHS[widths]]
    cfg = load_run_config("synthfundus", overrides=parse_overrides(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), progress=False)
    dev = tr.device
    tr.grade_probs = torch.full((cfg.model.num_classes,), 1.0 / cfg.model.num_classes, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(dev)
    grade = torch.randint(0, cfg.model.num_classes, (batch,), generator=g).to(dev)

    # FLOPs of one step with R1 (step 0) and one without (step 1), amortised over the R1 interval.
    flops = []
    for _ in range(2):
        flops.append(count_flops(lambda: tr.train_step(real, grade)))
    k = cfg.loss.r1_interval
    flops_per_step = (flops[0] + (k - 1) * flops[1]) / k

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):  # warm-up (allocator, compile, cudnn autotune)
        tr.train_step(real, grade)
    _sync(dev)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tr.train_step(real, grade)
        _sync(dev)
        times.append(time.perf_counter() - t)
    # Mean over a whole number of R1 intervals would need >= 16 steps; the mean of the measured steps
    # plus the amortised R1 share is reported instead when fewer are run.
    step_s = statistics.mean(times)
    mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mib()
    return {
        "resolution": resolution,
        "widths": widths,
        "batch": batch,
        "device": str(dev),
        "params_G_M": sum(p.numel() for p in tr.G.parameters()) / 1e6,
        "params_D_M": sum(p.numel() for p in tr.D.parameters()) / 1e6,
        "step_ms": step_s * 1e3,
        "images_per_s": batch / step_s,
        "s_per_kimg": 1000.0 / (batch / step_s),
        "gflop_per_image": flops_per_step / batch / 1e9,
        "achieved_tflops": flops_per_step / step_s / 1e12,
        "peak_mem_mib": mem,
    }


def _trainer(resolution: int, widths: str, batch: int, device: str, amp: str, compile_: bool,
             extra: tuple[str, ...] = ()) -> Trainer:
    overrides = [f"model.resolution={resolution}", f"train.batch_size={batch}", f"train.device={device}",
                 f"train.amp={amp}", f"train.compile={str(compile_).lower()}", *WIDTHS[widths], *extra]
    cfg = load_run_config("synthfundus", overrides=parse_overrides(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), progress=False)
    tr.grade_probs = torch.full((cfg.model.num_classes,), 1.0 / cfg.model.num_classes, dtype=torch.float64)
    return tr


def bench_compile_ab(resolution: int, widths: str, batch: int, steps: int, device: str, amp: str,
                     settings: tuple[str, ...] = ()) -> dict:
    """Eager and torch.compile steps of the same model, interleaved step by step in this process; with
    ``settings`` (config overrides, `--set-ab`) eager steps without and with them instead.

    The second trainer's first steps (until every graph is built: D and G phases, the lazy-R1 step) are
    timed separately as its warm-up. Then ``steps`` pairs alternate first / second, so a machine shared with
    other work slows both alike; the ratio's spread is over the pairs."""
    eager = _trainer(resolution, widths, batch, device, amp, False)
    if settings:
        compiled = _trainer(resolution, widths, batch, device, amp, False, settings)
    else:
        compiled = _trainer(resolution, widths, batch, device, amp, True)
    dev = eager.device
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(dev)
    grade = torch.randint(0, eager.cfg.model.num_classes, (batch,), generator=g).to(dev)
    k = eager.cfg.loss.r1_interval
    t0 = time.perf_counter()
    for _ in range(2):  # step 0 runs lazy R1, step 1 does not: every graph is compiled after these two
        compiled.train_step(real, grade)
    _sync(dev)
    warmup_s = time.perf_counter() - t0
    for _ in range(2):
        eager.train_step(real, grade)
    pairs: list[tuple[float, float]] = []
    for _ in range(steps):
        times = []
        for tr in (eager, compiled):
            t = time.perf_counter()
            tr.train_step(real, grade)
            _sync(dev)
            times.append(time.perf_counter() - t)
        pairs.append((times[0], times[1]))
    ratios = sorted(e / c for e, c in pairs)
    return {
        "eager_img_s": batch / statistics.median(e for e, _ in pairs),
        "compiled_img_s": batch / statistics.median(c for _, c in pairs),
        "ratio_median": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "warmup_s": warmup_s,
        "r1_interval": k,
        "peak_rss_mib": peak_rss_mib(),
    }


def profile_steps(resolution: int, widths: str, batch: int, steps: int, device: str, amp: str, top: int) -> str:
    """torch.profiler's per-op table over ``steps`` steps (after 2 warm-up steps), sorted by self time.

    The profiled steps start at a lazy-R1 step, so with ``steps`` = r1_interval (the default) the table holds
    R1's double backward at its amortised share."""
    from torch.profiler import ProfilerActivity, profile

    tr = _trainer(resolution, widths, batch, device, amp, False)
    dev = tr.device
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(dev)
    grade = torch.randint(0, tr.cfg.model.num_classes, (batch,), generator=g).to(dev)
    k = tr.cfg.loss.r1_interval
    while tr.step < 2 or tr.step % k:  # warm up, then start on an R1 step
        tr.train_step(real, grade)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            tr.train_step(real, grade)
        _sync(dev)
    elapsed = time.perf_counter() - t
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48)
    return (f"{resolution} px, {widths} widths, batch {batch}: {steps} steps in {elapsed:.2f} s under the profiler "
            f"({batch * steps / elapsed:.1f} img/s with its overhead)\n{table}")


# ------------------------------------------------------------------------------- --baseline REV
def time_steps(resolution: int, widths: str, batch: int, steps: int, device: str, amp: str,
               weights_out: str | None = None) -> dict:
    """Worker of `--baseline`: img/s over ``steps`` timed steps of the `retinagen` on sys.path (after 2
    warm-up steps), and, with ``weights_out``, G and D's weights after 2 fixed-seed steps saved there.
    Uses only the Trainer API (config loader, ``Trainer(cfg, folder, progress=False)``, ``train_step``), so
    it runs against older revisions too."""
    import retinagen

    tr = _trainer(resolution, widths, batch, device, amp, False)
    dev = tr.device
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(dev)
    grade = torch.randint(0, tr.cfg.model.num_classes, (batch,), generator=g).to(dev)
    def weights(prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}G.{k}": v for k, v in tr.G.state_dict().items()}
        state.update({f"{prefix}D.{k}": v for k, v in tr.D.state_dict().items()})
        return {k: v.detach().float().cpu().clone().contiguous() for k, v in state.items()}

    before = weights("init.") if weights_out else {}
    for _ in range(2):
        tr.train_step(real, grade)
    if weights_out:
        from safetensors.torch import save_file

        save_file({**before, **weights("")}, weights_out)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step(real, grade)
    _sync(dev)
    elapsed = time.perf_counter() - t
    return {"images_per_s": batch * steps / elapsed, "peak_rss_mib": peak_rss_mib(),
            "retinagen": str(Path(retinagen.__file__).resolve().parent)}


def _worker(tree: Path, args: dict) -> dict:
    """`time_steps(**args)` in a fresh Python process that imports retinagen from ``tree``."""
    import json
    import subprocess

    code = (
        "import json, sys, torch\n"
        f"sys.path[:0] = [{str(tree)!r}, {str(Path(__file__).resolve().parent)!r}]\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "import train_throughput as tt\n"
        f"print('RESULT ' + json.dumps(tt.time_steps(**json.loads({json.dumps(args)!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker on {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    if Path(out["retinagen"]).parent != tree.resolve():
        raise SystemExit(f"worker on {tree} imported retinagen from {out['retinagen']}")
    return out


def compare_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """``max |W_a - W_b|`` and ``|dW_a - dW_b| / |dW_b|`` of the two trees' weights after 2 fixed-seed steps
    (dW: the change from the shared initial weights, stored under ``init.``). Adam's first steps move each
    weight by about lr * sign(gradient), so a weight whose gradient is ~0 may move either way under a
    different float summation order: the max can reach 2 * lr while the relative difference of the updates
    stays small; a change of what is computed shows in both."""
    if a.keys() != b.keys():
        return f"keys differ ({len(a.keys() ^ b.keys())})"
    names = [k for k in a if not k.startswith("init.")]
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in names)
    num = sum(float((a[k] - b[k]).square().sum()) for k in names)
    den = sum(float((b[k] - b["init." + k]).square().sum()) for k in names if "init." + k in b)
    return f"{max_abs:.1e}, rel {((num / den) ** 0.5 if den > 0 else float('nan')):.1e}"


def bench_baseline(rev: str, resolutions: list[int], widths: list[str], batch: int, steps: int | None,
                   repeats: int, device: str, amp: str) -> None:
    """The working tree against git revision ``rev`` (checked out as a temporary worktree): for each
    repeat, one process per tree, in alternating order, timing the same steps; then the weights of both
    after 2 fixed-seed steps compared."""
    import subprocess

    from safetensors.torch import load_file

    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="retinagen-baseline-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(base), rev], check=True,
                       capture_output=True)
        try:
            sha = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
            print(f"baseline: {rev} ({sha}) in a worktree; current: the working tree {here}")
            print(f"{'res':>4} {'widths':>6} {'batch':>5} {'baseline img/s':>14} {'current img/s':>13} "
                  f"{'ratio (min-max)':>18} {'peak RSS MiB b/c':>17} {'weights: max |diff|, rel':>26}")
            for w in widths:
                for res in resolutions:
                    k = steps or 16  # default: one lazy-R1 interval of the presets (R1 every 16 steps)
                    args = {"resolution": res, "widths": w, "batch": batch, "steps": k, "device": device,
                            "amp": amp}
                    runs: dict[str, list[dict]] = {"base": [], "cur": []}
                    for i in range(repeats):
                        order = [("base", base), ("cur", here)]
                        for name, tree in order if i % 2 == 0 else order[::-1]:
                            runs[name].append(_worker(tree, args))
                    ratios = sorted(c["images_per_s"] / b["images_per_s"]
                                    for b, c in zip(runs["base"], runs["cur"], strict=True))
                    wb, wc = Path(tmp) / "base.safetensors", Path(tmp) / "cur.safetensors"
                    _worker(base, {**args, "steps": 0, "weights_out": str(wb)})
                    _worker(here, {**args, "steps": 0, "weights_out": str(wc)})
                    diff = compare_weights(load_file(str(wb)), load_file(str(wc)))
                    med_b = statistics.median(r["images_per_s"] for r in runs["base"])
                    med_c = statistics.median(r["images_per_s"] for r in runs["cur"])
                    rss = f"{max(r['peak_rss_mib'] for r in runs['base']):.0f}/{max(r['peak_rss_mib'] for r in runs['cur']):.0f}"
                    spread = f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
                    print(f"{res:>4} {w:>6} {batch:>5} {med_b:>14.1f} {med_c:>13.1f} {spread:>18} {rss:>17} "
                          f"{diff:>26}", flush=True)
            print(f"({repeats} repeats, one process per tree per repeat, alternating order; {k} timed steps after "
                  "2 warm-up steps; ratio = current / baseline per repeat; weights: max |W_cur - W_base| after 2 "
                  "fixed-seed steps and the relative difference of the 2 steps' updates, "
                  "|dW_cur - dW_base| / |dW_base| over all weights)")
        finally:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--resolutions", default=None, help="comma separated (default 64,128,256)")
    ap.add_argument("--widths", default=None, help="cpu, paper or cpu,paper (default: both)")
    ap.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 32 on CUDA")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default 4; --baseline: 16, one lazy-R1 interval)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-ab", action="store_true",
                    help="eager vs torch.compile, interleaved in one process: img/s of each, ratio, compile warm-up")
    ap.add_argument("--set-ab", metavar="KEY=VALUE", action="append", default=[],
                    help="like --compile-ab, but eager steps without vs with these config overrides (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="time the working tree against git revision REV (a temporary worktree), interleaved")
    ap.add_argument("--repeats", type=int, default=3, help="--baseline: processes per tree (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's per-op table (self time) over --steps steps (default 16)")
    ap.add_argument("--top", type=int, default=25, help="--profile: rows of the table (default 25)")
    ap.add_argument("--peak-n", type=int, default=2048,
                    help="side of the square GEMM the matmul peak is measured on (default 2048; smaller is "
                         "faster and reads lower: for quick checks, not for reported figures)")
    args = ap.parse_args(argv)
    if args.peak_n < 64:
        ap.error("--peak-n must be at least 64")
    if args.baseline:  # checked before the minute-long peak measurement
        import subprocess

        if args.repeats < 1:
            ap.error("--repeats must be at least 1")
        found = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--verify",
                                "--quiet", f"{args.baseline}^{{commit}}"], capture_output=True, text=True)
        if found.returncode != 0:
            ap.error(f"--baseline {args.baseline}: not a git revision of this repository")
    if args.set_ab:  # a bad KEY=VALUE is refused here, before the minute-long peak measurement
        from retinagen.errors import RetinagenError

        try:
            load_run_config("synthfundus", overrides=parse_overrides(args.set_ab))
        except RetinagenError as exc:
            ap.error(f"--set-ab: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 16)
    resolutions = [int(r) for r in (args.resolutions or "64,128,256").split(",")]
    widths = (args.widths or "cpu,paper").split(",")
    peak_dtype = torch.bfloat16 if (device.type == "cuda" and args.amp != "off") else torch.float32
    peak, peak_path = matmul_peak(device, peak_dtype, n=args.peak_n)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; measured dense matmul peak ({peak_dtype}, {peak_path}): {peak / 1e12:.3f} TFLOP/s")
    if args.baseline:
        bench_baseline(args.baseline, resolutions, widths, batch, args.steps, args.repeats, args.device, args.amp)
        return 0
    if args.profile:
        for w in widths:
            for res in resolutions:
                print(profile_steps(res, w, batch, args.steps or 16, args.device, args.amp, args.top), flush=True)
        return 0
    if args.compile_ab or args.set_ab:
        second = "with --set-ab" if args.set_ab else "compiled"
        print(f"{'res':>4} {'widths':>6} {'batch':>5} {'eager img/s':>11} {second + ' img/s':>14} "
              f"{'ratio (min-max)':>20} {'warm-up s':>17} {'peak RSS MiB':>12}")
        for w in widths:
            for res in resolutions:
                r = bench_compile_ab(res, w, batch, args.steps or 4, args.device, args.amp, tuple(args.set_ab))
                spread = f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
                print(f"{res:>4} {w:>6} {batch:>5} {r['eager_img_s']:>11.1f} {r['compiled_img_s']:>14.1f} "
                      f"{spread:>20} {r['warmup_s']:>17.1f} {r['peak_rss_mib']:>12.0f}", flush=True)
        print(f"({args.steps or 4} interleaved pairs from step 2; lazy R1 every {r['r1_interval']} steps lands in both "
              "members of a pair)")
        return 0
    print(f"{'res':>4} {'widths':>6} {'batch':>5} {'G M':>6} {'D M':>6} {'ms/step':>9} {'img/s':>8} "
          f"{'s/kimg':>8} {'GFLOP/img':>9} {'TFLOP/s':>8} {'% peak':>7} {'peak MiB':>9}")
    for w in widths:
        for res in resolutions:
            r = bench(res, w, batch, args.steps or 4, args.device, args.amp, args.compile)
            print(f"{r['resolution']:>4} {w:>6} {r['batch']:>5} {r['params_G_M']:>6.2f} {r['params_D_M']:>6.2f} "
                  f"{r['step_ms']:>9.1f} {r['images_per_s']:>8.1f} {r['s_per_kimg']:>8.1f} {r['gflop_per_image']:>9.3f} "
                  f"{r['achieved_tflops']:>8.3f} {100 * r['achieved_tflops'] * 1e12 / peak:>6.1f}% {r['peak_mem_mib']:>9.0f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
