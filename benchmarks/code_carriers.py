"""Which spatial frequencies carry the latent codes, and how much grain the images have, per snapshot of a run.

    python benchmarks/code_carriers.py runs/abl/base [runs/abl/beta01 ...] [--n 256] [--sigma 1.0]

For every checkpoint of each run (the training generator G, whose fakes Q learns from, and D's Q head):

* ``hf share``: the share of an image's energy (about its own mean) above the blur, E|x - blur(x)|^2 /
  E|x - mean(x)|^2, for the fakes and, in the header, for the run's real images: the grain, as a number;
* ``L_info`` (discrete codes, nats, against H(C)) that Q reads from:
  - the fakes as generated,
  - the fakes blurred (Gaussian, ``--sigma`` px): only the low frequencies,
  - hybrids: the low frequencies of fake A plus the high frequencies of fake B, scored against A's codes
    and against B's. Codes carried by the image's content follow A; codes hidden in grain follow B.

* ``z share`` / ``code share``: E|G(z_A, c_A) - G(z_B, c_A)|^2 and E|G(z_A, c_A) - G(z_A, c_B)|^2 over
  E|G(z_A, c_A) - G(z_B, c_B)|^2: how much of the images' variety the noise latent z and the codes c each make
  (a G that ignores z has z share 0).

With `--grid`, a picture per run: per snapshot one row of 8 images with the same codes and 8 z'.

Each row is one snapshot; every snapshot scores the same latents (seed 0), so rows differ by the weights only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from retinagen.config import config_from_json
from retinagen.data.dataset import ZipImageDataset
from retinagen.latent import LatentSample, LatentSpec
from retinagen.networks.build import build_d, build_g, latent_spec, num_classes
from retinagen.run_dir import RunDir
from retinagen.training.checkpoint import list_checkpoints, load_checkpoint
from retinagen.training.loop import save_image_grid
from retinagen.training.losses import info_terms


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W], reflect-padded, radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def hf_share(x: torch.Tensor, sigma: float) -> float:
    """E|x - blur(x)|^2 / E|x - mean(x)|^2 over the batch (each image about its own per-channel mean)."""
    hf = (x - gaussian_blur(x, sigma)).pow(2).sum()
    total = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2).sum()
    if float(total) <= 1e-8 * x.numel():  # flat images have no grain (0), not rounding error / 0
        return 0.0
    return float(hf / total)


def real_hf_share(run: Path, n: int, sigma: float) -> float:
    zips = sorted((run / "data").rglob("*.zip")) if (run / "data").is_dir() else []
    if not zips:
        return float("nan")
    ds = ZipImageDataset(zips[0])
    imgs = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    return hf_share(imgs, sigma)


@torch.no_grad()
def score_models(G: Callable[..., torch.Tensor], D: Callable[..., Any], spec: LatentSpec, classes: int, n: int,
                 sigma: float) -> dict[str, float]:
    """The columns of one row for a generator G(z', code, grade) -> [N, 3, R, R] and a D(img, grade) with
    ``.q_params``, on n latents of seed 0 (and another n for the B side of the pairs)."""
    gen = torch.Generator().manual_seed(0)
    a = spec.sample(n, gen)
    b = spec.sample(n, gen)
    grade = torch.randint(0, classes, (n,), generator=gen) if classes else None

    def run(z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # G's per-pixel noise: the same draws for every call and snapshot
        return G(z, code, grade).float()

    xa, xb = run(a.z_noise, a.code()), run(b.z_noise, b.code())
    x_za, x_ca = run(b.z_noise, a.code()), run(a.z_noise, b.code())  # one of the two latents changed
    total = (xa - xb).pow(2).mean()
    low_a, low_b = gaussian_blur(xa, sigma), gaussian_blur(xb, sigma)
    hybrid = low_a + (xb - low_b)

    def linfo(img: torch.Tensor, sample: LatentSample) -> float:
        return float(info_terms(spec, D(img, grade).q_params, sample).l_info_discrete)

    return {
        "hf": hf_share(xa, sigma),
        "z_share": float((xa - x_za).pow(2).mean() / total),
        "c_share": float((xa - x_ca).pow(2).mean() / total),
        "clean": linfo(xa, a),
        "blur": linfo(low_a, a),
        "hyb_a": linfo(hybrid, a),
        "hyb_b": linfo(hybrid, b),
        "bound": spec.discrete_entropy(),
    }


@torch.no_grad()
def same_codes_row(G: Callable[..., torch.Tensor], spec: LatentSpec, classes: int, cols: int) -> torch.Tensor:
    """[cols, 3, R, R]: one code setting (and grade) of seed 0 with ``cols`` noise latents: what z' adds."""
    gen = torch.Generator().manual_seed(0)
    sample = spec.sample(cols, gen)
    code = sample.code()[:1].expand(cols, -1)
    grade = torch.randint(0, classes, (1,), generator=gen).expand(cols) if classes else None
    torch.manual_seed(0)
    return G(sample.z_noise, code, grade).float()


def score_checkpoint(path: Path, n: int, sigma: float, cols: int = 0) -> tuple[dict[str, float], torch.Tensor | None]:
    """`score_models` for a training checkpoint's G (the one Q learned from) and D, and with ``cols`` > 0
    its `same_codes_row`."""
    ck = load_checkpoint(path)
    cfg = config_from_json(ck.meta["config"], str(path))
    G, D = build_g(cfg), build_d(cfg)
    G.load_state_dict(ck.module_state("G" if ck.has("G") else "G_ema"))
    D.load_state_dict(ck.module_state("D"))
    spec, classes = latent_spec(cfg.latent), num_classes(cfg)
    row = score_models(G.eval(), D.eval(), spec, classes, n, sigma)
    pictures = same_codes_row(G, spec, classes, cols) if cols else None
    return {"kimg": float(ck.meta.get("kimg", 0.0)), **row}, pictures


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=256, help="fakes per snapshot (default 256)")
    ap.add_argument("--sigma", type=float, default=1.0, help="the blur that splits low from high frequencies, px")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grid", type=Path, default=None,
                    help="also write RUN's PNG: per snapshot, one row of 8 images with the same codes and 8 z' "
                         "(one file per run: the run's name is added to the file name)")
    args = ap.parse_args(argv)
    if args.n < 2 or args.sigma <= 0:
        raise SystemExit("error: --n must be >= 2 and --sigma > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in args.runs:
        cks = list_checkpoints(RunDir(run).checkpoints)  # ckpt-<step>.json only, oldest first
        if not cks:
            raise SystemExit(f"error: {run}: no checkpoints")
        print(f"\n**{run.name}** (σ = {args.sigma:g} px, {args.n} fakes per snapshot; "
              f"hf share of {args.n} real images: {real_hf_share(run, args.n, args.sigma):.4f})\n")
        print("| kimg | hf share (fakes) | z share | code share | L_info clean | L_info blurred | hybrid: A's codes "
              "| hybrid: B's codes | H(C) |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = []
        for c in cks:
            r, pictures = score_checkpoint(c.with_suffix(".safetensors"), args.n, args.sigma, 8 if args.grid else 0)
            if pictures is not None:
                rows.append(pictures)
            print(f"| {r['kimg']:g} | {r['hf']:.4f} | {r['z_share']:.2f} | {r['c_share']:.2f} | {r['clean']:.2f} | "
                  f"{r['blur']:.2f} | {r['hyb_a']:.2f} | {r['hyb_b']:.2f} | {r['bound']:.2f} |", flush=True)
        if args.grid:
            out = args.grid.with_name(f"{args.grid.stem}_{run.name}.png")
            grid = torch.cat(rows)
            scale = max(1, 64 // grid.shape[-1])  # small images drawn at 64 px at least, pixel for pixel
            save_image_grid(grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2), out, cols=8)
            print(f"\nwrote {out}: one row per snapshot, top to bottom")


if __name__ == "__main__":
    main()
