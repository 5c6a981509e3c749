"""The MSI training loop: ``min_{G,Q} max_D V(D, G) - beta * L_info`` (paper Eq. 4).

One step = a discriminator phase (logistic loss on reals and fakes, the Q head learning to recover
the codes of fakes, lazy R1 on reals every ``r1_interval`` steps) then a generator phase
(non-saturating loss + beta * (-log Q(c | G(z', c)))), then the generator EMA update.

Everything random comes from explicit generators whose state is checkpointed (latents, noise, data
order), so ``--resume`` continues exactly: N steps straight and N/2 + resume + N/2 give the same
weights on the same device.

Multi-GPU / multi-node: launch with ``torchrun``; each process takes a slice of every global batch,
and gradients are averaged with one ``all_reduce`` per phase (torch.distributed, NCCL on GPU, gloo on
CPU) - the scheme of NVlabs' StyleGAN2-ADA, which avoids DistributedDataParallel's trouble with
alternating G/D phases and parameters that only some phases use.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retinagen.config import RunConfig, config_from_json
from retinagen.errors import CheckpointError, RetinagenError
from retinagen.fileio import atomic_write_json, atomic_write_text
from retinagen.latent import LatentSpec, pair_rows
from retinagen.networks.build import build_d, build_g, latent_spec, num_classes
from retinagen.networks.grow import GrowStage, grow_stage
from retinagen.networks.layers import BatchNoise, NoiseSource
from retinagen.progress import progress_bar
from retinagen.run_dir import RunDir
from retinagen.training import losses
from retinagen.training.augment import AugmentPipe
from retinagen.training.checkpoint import (
    checkpoint_stem,
    config_mismatch,
    flatten_optimizer,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from retinagen.training.distributed import (
    Dist,
    StreamSampler,
    allreduce_grads,
    balanced_grade_probs,
    broadcast_module,
    image_weights,
    init_distributed,
)
from retinagen.training.ema import ema_beta, update_ema
from retinagen.training.grade_guide import (
    AUTO,
    GUIDE_TRANSFORMS,
    GradeGuide,
    check_grade_guide,
    ensure_auto_guide,
    load_grade_guide,
)
from retinagen.training.snapshots import SnapshotScore, best_logged_fd, log_lines_upto, score_snapshot

# Config sections that must match between a checkpoint and the run resuming it.
RESUME_SECTIONS = ("model", "latent", "loss", "optim", "data")


# --------------------------------------------------------------------------------------------------
# Data


def resolve_training_data(cfg: RunConfig, run_dir: Path, d: Dist) -> Path:
    """The prepared ZIP to train on; for the built-in synthetic data it is made on first use."""
    if cfg.data.path is not None:
        path = Path(cfg.data.path)
        if path.is_dir() and cfg.data.dataset == "synthfundus":
            return _prepare_synth(path, RunDir(run_dir).data, cfg, d, synthesize=False)
        if not path.is_file():
            raise RetinagenError(f"--data {path}: not found (expected a ZIP written by `retinagen prepare`)")
        return path
    if cfg.data.dataset != "synthfundus":
        raise RetinagenError(
            f"--dataset {cfg.data.dataset} needs --data DS.zip: run `retinagen prepare --dataset {cfg.data.dataset} "
            "--data-root DIR --resolution R --out DS.zip` first"
        )
    data = RunDir(run_dir).data
    return _prepare_synth(data / "synthfundus", data, cfg, d, synthesize=True)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: Ctrl-C reaches the whole process group (and `pkill -f`
    every process), and a worker killed under the main process turns a clean stop-and-snapshot into a
    crash. The main process handles the signal, saves, and shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _prepare_synth(src: Path, data_dir: Path, cfg: RunConfig, d: Dist, synthesize: bool) -> Path:
    res = cfg.model.resolution
    zip_path = data_dir / f"synthfundus-n{cfg.data.synth_n}-s{cfg.data.synth_seed}-r{res}.zip"
    if d.main and not zip_path.is_file():
        from retinagen.data.prepare import prepare_dataset
        from retinagen.data.synthetic import write_synth_dataset

        if synthesize and not (src / "trainLabels.csv").is_file():
            # Rendered at >= 64 px and downscaled by prepare: below that the FOV detector cannot find the
            # disc of frame-cut fundi (at 32 px it rejected 1,238 of 2,000 renders, at 64 px 4).
            write_synth_dataset(src, n=cfg.data.synth_n, resolution=max(res, 64), seed=cfg.data.synth_seed)
        prepare_dataset("eyepacs", src, res, zip_path, label="synthfundus")  # synth writes the EyePACS layout
    if d.world > 1:
        dist.barrier()
    return zip_path


# --------------------------------------------------------------------------------------------------
# Images


def save_image_grid(images: torch.Tensor, path: Path, cols: int) -> None:
    """Save ``images`` [N, 3, H, W] in [-1, 1] as one PNG grid, ``cols`` images per row (atomic)."""
    from PIL import Image

    from retinagen.fileio import atomic_path

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    grid = torch.zeros(3, rows * h, cols * w)
    for i, img in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    images_seen: int
    elapsed_s: float
    images_per_s: float
    last_checkpoint: Path | None
    stopped_early: bool
    # SIGINT / SIGTERM that stopped the run (after its snapshot), None otherwise: the CLI exits 128 + it.
    stop_signal: int | None = None
    # True when train.max_minutes ended the run (a finished run: snapshot written, nothing left to resume).
    budget_reached: bool = False


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a snapshot at the end of the step and exits."""

    def __init__(self) -> None:
        self.stop = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.stop = True
        self.signum = signum
        print(f"\nsignal {signum}: saving a snapshot after this step, then stopping", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _agree_on_stopping(budget_hit: bool, flag: _StopFlag, device: torch.device) -> tuple[bool, bool]:
    """Multi-process runs: each process's own clock and signals, combined (max) over all of them.

    A time budget is measured by each process's clock and a signal may reach one process only (a `kill`
    of one PID, a scheduler that signals only the first task): a process that left the loop alone would
    leave the others waiting in the next gradient all_reduce. Returns (any process's budget is spent, any
    process was signalled) as agreed at this step, and marks ``flag`` stopped (with the signal) in the second
    case. The caller must act on the returned decision, not on ``flag.stop`` read later: a signal that lands
    after the all_reduce would otherwise stop this process one step before the others (a deadlock)."""
    stop = flag.stop
    signum = float(flag.signum or 0) if stop else 0.0
    t = torch.tensor([float(budget_hit), signum, float(stop)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[2] > 0 and not flag.stop:
        flag.stop, flag.signum = True, int(t[1]) or None
    return bool(t[0] > 0), bool(t[2] > 0)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def select_device(cfg: RunConfig, d: Dist) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RetinagenError("train.device is cuda but no CUDA GPU is available; use --preset cpu or device: auto")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class Trainer:
    """Holds the networks, optimizers and state of one training run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True, log: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.d = init_distributed("cuda" if (cfg.train.device != "cpu" and torch.cuda.is_available()) else "cpu")
        self.device = select_device(cfg, self.d)
        self.log = log and self.d.main
        if cfg.train.batch_size % self.d.world:
            raise RetinagenError(
                f"train.batch_size {cfg.train.batch_size} is not divisible by the {self.d.world} processes"
            )
        per_rank = cfg.train.batch_size // self.d.world
        if cfg.loss.mode_seeking > 0 and per_rank < 2:
            raise RetinagenError(
                f"loss.mode_seeking needs at least 2 images per process to pair, got {per_rank} "
                f"(train.batch_size {cfg.train.batch_size} over {self.d.world} processes)"
            )
        if cfg.loss.mode_seeking > 0 and cfg.loss.mode_seeking_pool > cfg.model.resolution:
            raise RetinagenError(
                f"loss.mode_seeking_pool {cfg.loss.mode_seeking_pool} is larger than the "
                f"{cfg.model.resolution} px images"
            )
        if self.d.world > 1 and self.d.main and per_rank % cfg.model.mbstd_group:
            # Minibatch-stddev groups are consecutive rows of each process's slice; only when they tile it
            # are they the groups one process would form, and the run the same as a single-process run.
            print(
                f"note: model.mbstd_group {cfg.model.mbstd_group} does not divide the {per_rank} images per "
                "process, so D's minibatch statistics differ from a single-process run",
                file=sys.stderr,
            )
        self.spec: LatentSpec = latent_spec(cfg.latent)
        self.num_classes = num_classes(cfg)
        self.guide: GradeGuide | None = None
        check_grade_guide(cfg.loss.grade_guide, bool(self.num_classes))
        if cfg.loss.grade_guide not in (None, AUTO):  # "auto" is trained on the training data in `train`
            self.guide = load_grade_guide(cfg.loss.grade_guide, self.num_classes, self.device)
        use_amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_amp else None

        torch.manual_seed(cfg.train.seed)  # parameter init: identical on every process
        self.G = build_g(cfg).to(self.device)
        self.D = build_d(cfg).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        broadcast_module(self.G, self.d.world)
        broadcast_module(self.D, self.d.world)
        self.G_ema.load_state_dict(self.G.state_dict())

        # Lazy regularisation (StyleGAN2): R1 runs every r1_interval steps, so D's Adam hyper-parameters
        # are rescaled to keep the effective step the same.
        o, k = cfg.optim, cfg.loss.r1_interval
        mb = k / (k + 1) if cfg.loss.r1_gamma > 0 else 1.0
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), eps=o.eps)
        self.opt_D = torch.optim.Adam(
            self.D.parameters(), lr=o.lr_d * mb, betas=(o.beta1**mb, o.beta2**mb), eps=o.eps
        )
        # Latents, noise and fake grades come from this generator, data order from the sampler. It is the
        # same stream on every process: each draws the global batch's randomness and keeps its own rows
        # (`_sample_fakes`, `BatchNoise`), so N processes compute what one process computes on the whole
        # batch, and a resumed run (every rank restores rank 0's state) stays correct.
        self.gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 17)
        # Per-layer noise is drawn on the training device (a CPU generator on CUDA would copy every
        # noise tensor host-to-device); on the CPU the two generators are one.
        if self.device.type == "cuda":
            self.noise_gen = torch.Generator(device=self.device)
            self.noise_gen.manual_seed(cfg.train.seed * 1_000_003 + 29)
        else:
            self.noise_gen = self.gen
        self.step = 0
        self.images_seen = 0
        # Training wall time over all sessions of the run (restored on resume): what "same wall time" compares.
        self.train_seconds = 0.0
        self._clock: float | None = None  # perf_counter at the start of this session's training loop
        # The data's grade frequencies (saved; generation draws grades by them) and the ones training shows
        # (data.grade_balance), with the per-image weights the sampler draws real images by (None: uniform).
        self.grade_probs: torch.Tensor | None = None
        self.train_grade_probs: torch.Tensor | None = None
        self.image_weights: np.ndarray | None = None
        self.dataset_fingerprint: str | None = None

        self.guide_augment: AugmentPipe | None = None
        if cfg.loss.grade_guide_augment > 0:
            self.guide_augment = AugmentPipe(GUIDE_TRANSFORMS, p=cfg.loss.grade_guide_augment, mode="fixed")
        a = cfg.augment
        self.augment: AugmentPipe | None = None
        if a.mode != "off":
            self.augment = AugmentPipe(a.transforms, p=a.p, mode=a.mode, target=a.target,
                                       speed_kimg=a.speed_kimg, interval=a.interval)

        # Progressive growing: the stage (resolution, fade) of G, D and G_ema, set from the images shown.
        self._grow_stages = [m for net in (self.G, self.D, self.G_ema) for m in net.modules() if isinstance(m, GrowStage)]

        self._compiled_G: nn.Module = self.G
        self._compiled_D: nn.Module = self.D
        if cfg.train.compile:
            # The compiled wrappers share parameters with G and D, which stay the modules that checkpoints
            # save and load (no `_orig_mod.` keys; resume works with compile on or off). Static shapes: a
            # training step has fixed shapes, and dynamic ones trip inductor on torch 2.14.
            self._compiled_G = torch.compile(self.G, dynamic=False)  # type: ignore[assignment]
            self._compiled_D = torch.compile(self.D, dynamic=False)  # type: ignore[assignment]

    # ---------------------------------------------------------------------------- checkpointing
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            for k, v in module.state_dict().items():
                tensors[f"{prefix}.{k}"] = v
        tg, mg = flatten_optimizer("opt_G", self.opt_G.state_dict())
        td, md = flatten_optimizer("opt_D", self.opt_D.state_dict())
        tensors.update(tg)
        tensors.update(td)
        if self.augment is not None:
            tensors.update(self.augment.state_tensors())
        tensors["rng.latent"] = self.gen.get_state()
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            tensors["rng.noise"] = self.noise_gen.get_state()
        meta = {"opt_G": mg, "opt_D": md}
        return tensors, meta

    def elapsed_train_seconds(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def meta(self) -> dict[str, Any]:
        return {
            "kind": "retinagen-msi",
            "msi": self.cfg.msi_name,
            "config": self.cfg.to_json_dict(),
            "latent": self.spec.to_dict(),
            "code_names": list(self.spec.code_names),
            "code_kinds": list(self.spec.code_kinds),
            "step": self.step,
            "images_seen": self.images_seen,
            "kimg": self.images_seen / 1000.0,
            "train_seconds": round(self.elapsed_train_seconds(), 3),
            "world_size": self.d.world,
            "dataset_fingerprint": self.dataset_fingerprint,
            "grade_probs": None if self.grade_probs is None else [float(x) for x in self.grade_probs],
            "grade_guide_sha256": None if self.guide is None else self.guide.sha256,
            "num_params": {"G": _count_params(self.G), "D": _count_params(self.D)},
        }

    def save(self) -> Path:
        tensors, opt_meta = self.state_tensors()
        meta = self.meta()
        meta.update(opt_meta)
        ck_dir = RunDir(self.run_dir).checkpoints
        path = save_checkpoint(ck_dir / checkpoint_stem(self.step), tensors, meta)
        # Keep the newest snapshots only; never delete the one just written.
        keep = self.cfg.train.keep_checkpoints
        for old in list_checkpoints(ck_dir)[:-keep]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        return path

    def restore(self, meta_path: Path) -> None:
        ck = load_checkpoint(meta_path)
        diffs = config_mismatch(ck.meta.get("config", {}), self.cfg.to_json_dict(), RESUME_SECTIONS,
                                defaults=RunConfig().to_json_dict())
        if diffs:
            raise CheckpointError(
                f"{meta_path}: checkpoint does not match this config:\n  " + "\n  ".join(diffs)
            )
        guide_sha = None if self.guide is None else self.guide.sha256
        if ck.meta.get("grade_guide_sha256") != guide_sha:
            raise CheckpointError(
                f"{meta_path}: loss.grade_guide {self.cfg.loss.grade_guide} is not the grade guide this run was "
                "trained with (its SHA-256 differs)"
            )
        try:
            self.G.load_state_dict(ck.module_state("G"))
            self.D.load_state_dict(ck.module_state("D"))
            self.G_ema.load_state_dict(ck.module_state("G_ema"))
            self.opt_G.load_state_dict(unflatten_optimizer("opt_G", ck.tensors, ck.meta["opt_G"]))
            self.opt_D.load_state_dict(unflatten_optimizer("opt_D", ck.tensors, ck.meta["opt_D"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{meta_path}: tensors do not fit the networks of this config ({exc})") from None
        if int(ck.meta.get("world_size", 1)) != self.d.world:
            raise CheckpointError(
                f"{meta_path}: written by {ck.meta.get('world_size')} processes; resume with the same number "
                f"(now {self.d.world}) for an exact continuation"
            )
        if self.augment is not None:
            self.augment.load_state_tensors(ck.tensors)
        self.gen.set_state(ck.tensors["rng.latent"])
        torch.set_rng_state(ck.tensors["rng.torch_cpu"])
        if self.device.type == "cuda" and "rng.cuda" in ck.tensors:
            torch.cuda.set_rng_state(ck.tensors["rng.cuda"], self.device)
            if "rng.noise" in ck.tensors:
                self.noise_gen.set_state(ck.tensors["rng.noise"])
        self.step = int(ck.meta["step"])
        self.images_seen = int(ck.meta["images_seen"])
        self.train_seconds = float(ck.meta.get("train_seconds", 0.0))
        if ck.meta.get("dataset_fingerprint") and self.dataset_fingerprint not in (None, ck.meta["dataset_fingerprint"]):
            raise CheckpointError(f"{meta_path}: the training data changed since this checkpoint was written")

    # ---------------------------------------------------------------------------- sampling
    def _sample_fakes(self, n: int) -> tuple[Any, torch.Tensor | None]:
        """Latents and fake grades of this process's n rows of the global batch (drawn whole, then cut)."""
        total, start = n * self.d.world, n * self.d.rank
        sample = self.spec.sample(total, self.gen, self.device)[start : start + n]
        grade = self._sample_grades(total)
        grade = None if grade is None else grade[start : start + n]
        if self.cfg.loss.mode_seeking > 0:
            # Pairs for the mode-seeking term: rows m..2m-1 take the codes (and grade) of rows 0..m-1.
            sample = sample.with_paired_codes()
            grade = None if grade is None else pair_rows(grade)
        return sample, grade

    def _sample_grades(self, n: int) -> torch.Tensor | None:
        probs = self.grade_probs if self.train_grade_probs is None else self.train_grade_probs
        if self.num_classes == 0 or probs is None:
            return None
        return torch.multinomial(probs, n, replacement=True, generator=self.gen).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _run_G(self, sample: Any, grade: torch.Tensor | None) -> torch.Tensor:
        # The per-layer noise is drawn here, outside torch.compile (a draw from a torch.Generator cannot be
        # traced and would split the compiled G at every layer), with the same draws the layers would make.
        noise = self.G.draw_noise(len(sample), self._noise_source(len(sample)), self.device)
        return self._compiled_G(sample.z_noise, sample.code(), grade, noise_mode="random", noise=noise)

    def _noise_source(self, n: int) -> NoiseSource:
        if self.d.world == 1:
            return self.noise_gen
        return BatchNoise(self.noise_gen, start=n * self.d.rank, batch=n * self.d.world)

    # ---------------------------------------------------------------------------- one step
    def train_step(self, real: torch.Tensor, real_grade: torch.Tensor | None) -> dict[str, torch.Tensor | float]:
        """One step: D (with Q) phase, lazy R1, G phase, EMA. The statistics it returns are 0-d tensors
        still on the device (reading them waits for the device: `read_stats` does, on logging steps only)."""
        cfg = self.cfg
        beta = cfg.loss.beta
        # Weight of the uniform codes' log Q in the info loss (InfoGAN's smaller lambda for continuous
        # codes; see losses.info_terms).
        cont_w = cfg.loss.info_continuous_weight
        n = real.shape[0]
        stats: dict[str, torch.Tensor | float] = {}
        if self._grow_stages:
            m = cfg.model
            assert m.grow_from is not None
            res, alpha = grow_stage(self.images_seen / 1000.0, m.grow_from, m.resolution, m.grow_stable_kimg,
                                    m.grow_fade_kimg)
            for stage in self._grow_stages:
                stage.set(res, alpha)
            stats["grow/resolution"], stats["grow/alpha"] = float(res), alpha

        # --- D phase: max V (logistic), Q (sharing D's trunk) learns to recover the codes of fakes.
        # With train.reuse_fakes G's graph is kept here and these fakes are the G phase's too.
        reuse = cfg.train.reuse_fakes
        self.G.requires_grad_(reuse)
        self.D.requires_grad_(True)
        sample, fake_grade = self._sample_fakes(n)
        with torch.set_grad_enabled(reuse), self._autocast():
            fake = self._run_G(sample, fake_grade)
        with self._autocast():
            out_fake = self._compiled_D(self._aug(fake.detach()), fake_grade, q_grad_scale=cfg.loss.q_trunk_scale)
            out_real = self._compiled_D(self._aug(real), real_grade)
        if self.augment is not None:
            self.augment.accumulate(out_real.logits)
        neg_log_q_d = ce = None
        if beta > 0:
            q_fake = self._q_params(out_fake, fake.detach(), fake_grade, cfg.loss.q_trunk_scale)
            neg_log_q_d = losses.info_terms(self.spec, q_fake.float(), sample, cont_w).neg_log_q
        if out_real.class_logits is not None and real_grade is not None:
            ce = losses.grade_ce_loss(out_real.class_logits.float(), real_grade)
            stats["loss/grade_ce"] = ce.detach()
        loss_d = losses.total_discriminator_loss(
            out_real.logits.float(), out_fake.logits.float(), neg_log_q=neg_log_q_d, beta=beta,
            grade_ce=ce, grade_weight=cfg.loss.grade_weight,
        )  # fmt: skip
        stats["loss/D"] = losses.d_logistic_loss(out_real.logits.float(), out_fake.logits.float()).detach()
        self.opt_D.zero_grad(set_to_none=True)
        loss_d.backward()
        allreduce_grads(self.D, self.d.world)
        self.opt_D.step()
        stats["D/real_score"] = out_real.logits.float().mean().detach()
        stats["D/fake_score"] = out_fake.logits.float().mean().detach()

        # --- Lazy R1 on reals (fp32: second-order gradients in bf16 are too coarse).
        if cfg.loss.r1_gamma > 0 and self.step % cfg.loss.r1_interval == 0:
            real_r1 = self._aug(real).detach().requires_grad_(True)
            out_r1 = self.D(real_r1, real_grade)
            penalty = losses.r1_penalty(real_r1, out_r1.logits)
            loss_r1 = losses.r1_loss(penalty, cfg.loss.r1_gamma, cfg.loss.r1_interval)
            self.opt_D.zero_grad(set_to_none=True)
            # Touch the Q head so every D parameter has a gradient (keeps all_reduce shapes uniform).
            (loss_r1 + 0.0 * out_r1.q_params.sum()).backward()
            allreduce_grads(self.D, self.d.world)
            self.opt_D.step()
            stats["loss/R1"] = penalty.mean().detach()

        # --- G phase: min -log D(G(z)) + beta * (-log Q(c | G(z', c))).
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        if not reuse:
            sample, fake_grade = self._sample_fakes(n)
            with self._autocast():
                fake = self._run_G(sample, fake_grade)
        with self._autocast():
            out = self._compiled_D(self._aug(fake), fake_grade)
            q_g = self._q_params(out, fake, fake_grade)
        info = losses.info_terms(self.spec, q_g.float(), sample, cont_w)
        fake_ce = None
        if out.class_logits is not None and fake_grade is not None:
            fake_ce = losses.grade_ce_loss(out.class_logits.float(), fake_grade)
        guide_ce = None
        if self.guide is not None and fake_grade is not None:
            seen = fake if self.guide_augment is None else self.guide_augment(
                fake, self.gen, rank=self.d.rank, world=self.d.world)
            guide_ce = losses.grade_ce_loss(self.guide(seen), fake_grade)
            stats["loss/guide_ce"] = guide_ce.detach()
        ms = None
        if cfg.loss.mode_seeking > 0:
            m = n // 2
            ms = losses.mode_seeking_loss(fake[:m], fake[m : 2 * m], sample.z_noise[:m], sample.z_noise[m : 2 * m],
                                          pool=cfg.loss.mode_seeking_pool)
            stats["loss/mode_seeking"] = ms.detach()
        loss_g = losses.total_generator_loss(
            out.logits.float(), neg_log_q=info.neg_log_q if beta > 0 else None, beta=self.g_info_weight(),
            grade_ce=fake_ce, grade_weight=cfg.loss.grade_weight,
            mode_seeking=ms, mode_seeking_weight=cfg.loss.mode_seeking,
            guide_ce=guide_ce, guide_weight=cfg.loss.grade_guide_weight,
        )  # fmt: skip
        stats["loss/G"] = losses.g_nonsaturating_loss(out.logits.float()).detach()
        self.opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        allreduce_grads(self.G, self.d.world)
        self.opt_G.step()
        self.D.requires_grad_(True)

        stats["info/L_info"] = info.l_info.detach()
        stats["info/L_info_discrete"] = info.l_info_discrete.detach()
        stats["info/H_discrete"] = float(info.discrete_bound)

        # --- EMA of G.
        self.images_seen += n * self.d.world
        beta_ema = ema_beta(cfg.train.batch_size, cfg.train.ema_kimg, self.images_seen, cfg.train.ema_rampup)
        update_ema(self.G_ema, self.G, beta_ema)
        self.step += 1
        if self.augment is not None:
            self.augment.adjust(self.step, cfg.train.batch_size, self.d.world)
            stats["augment/p"] = self.augment.p
            if math.isfinite(self.augment.last_rt):
                stats["augment/rt"] = self.augment.last_rt
        return stats

    @staticmethod
    def read_stats(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """`train_step`'s statistics as floats (one wait for the device for all of them)."""
        keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
        values = torch.stack([stats[k].float() for k in keys]).tolist() if keys else []  # type: ignore[union-attr]
        out = {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
        out.update(zip(keys, values, strict=True))
        return {k: out[k] for k in stats}

    def g_info_weight(self) -> float:
        """beta on G's step: ramped over ``loss.beta_rampup_kimg`` from the images shown so far."""
        ramp = self.cfg.loss.beta_rampup_kimg
        frac = 1.0 if ramp <= 0 else min(1.0, self.images_seen / (ramp * 1000.0))
        return self.cfg.loss.beta * frac

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of ``x``: augmented (`augment`) or as it is."""
        if self.augment is None:
            return x
        return self.augment(x, self.gen, rank=self.d.rank, world=self.d.world)

    def _q_params(
        self, out: Any, clean: torch.Tensor, grade: torch.Tensor | None, q_grad_scale: float = 1.0
    ) -> torch.Tensor:
        """Q's output for the fakes: from D's pass on what it judged, or (``augment.q_input: clean`` with
        augmentation on) from one more pass of D on the clean fakes."""
        if self.augment is None or self.augment.p <= 0 or self.cfg.augment.q_input == "augmented":
            return out.q_params
        return self._compiled_D(clean, grade, q_grad_scale=q_grad_scale).q_params

    # ---------------------------------------------------------------------------- samples
    def fixed_latents(self) -> tuple[Any, torch.Tensor | None]:
        cols, rows = self.cfg.train.sample_grid
        g = torch.Generator().manual_seed(12345)
        sample = self.spec.sample(cols * rows, g, self.device)
        grade = None
        if self.num_classes:
            grade = torch.arange(rows).repeat_interleave(cols).remainder(self.num_classes).to(self.device)
        return sample, grade

    @torch.no_grad()
    def save_samples(self) -> Path:
        sample, grade = self.fixed_latents()
        imgs = self.G_ema(sample.z_noise, sample.code(), grade, noise_mode="const")
        path = RunDir(self.run_dir).samples / f"fakes-{self.step:06d}.png"
        save_image_grid(imgs, path, cols=self.cfg.train.sample_grid[0])
        return path


def _open_training_data(trainer: Trainer, zip_path: Path) -> Any:
    """The run's training split, checked against the model (resolution, labels), with the trainer told
    its fingerprint and, for a conditional model, the grade frequencies fake grades are drawn from."""
    from retinagen.data.dataset import ZipImageDataset

    cfg = trainer.cfg
    dataset = ZipImageDataset(zip_path, split=None if cfg.data.split == "all" else "train")
    if dataset.resolution != cfg.model.resolution:
        raise RetinagenError(
            f"{zip_path}: images are {dataset.resolution} px but model.resolution is {cfg.model.resolution}; "
            f"prepare the data at {cfg.model.resolution} px or change the resolution"
        )
    trainer.dataset_fingerprint = dataset.fingerprint()
    if trainer.num_classes:
        labels = np.asarray(dataset.labels)
        if labels.size == 0 or (labels < 0).any():
            raise RetinagenError(f"{zip_path}: model.conditional is true but the dataset has unlabelled images")
        if labels.max() >= trainer.num_classes:
            raise RetinagenError(f"{zip_path}: label {labels.max()} >= model.num_classes {trainer.num_classes}")
        counts = np.bincount(labels, minlength=trainer.num_classes).astype(np.float64)
        trainer.grade_probs = torch.tensor(counts / counts.sum(), dtype=torch.float64)
        shown = balanced_grade_probs(counts, cfg.data.grade_balance)
        trainer.train_grade_probs = torch.tensor(shown, dtype=torch.float64)
        if cfg.data.grade_balance > 0:
            trainer.image_weights = image_weights(labels, shown)
    return dataset


def _log_step(trainer: Trainer, stats: dict[str, torch.Tensor | float], rate: float, metrics_path: Path,
              writer: Any, bar: Any) -> None:
    """One logging step: the step's statistics (read from the device now) to metrics.jsonl, TensorBoard
    and the progress bar's description."""
    floats = trainer.read_stats(stats)
    record = {"step": trainer.step, "kimg": trainer.images_seen / 1000.0, "images_per_s": rate, **floats}
    with open(metrics_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, trainer.step)
    bar.set_description(
        f"G {floats['loss/G']:.2f} D {floats['loss/D']:.2f} "
        f"Linfo {floats['info/L_info_discrete']:.1f}/{floats['info/H_discrete']:.1f}"
    )


def _loader(trainer: Trainer, dataset: Any) -> torch.utils.data.DataLoader:
    """This process's slice of every global batch, in the run's order from the images already shown."""
    cfg, d = trainer.cfg, trainer.d
    sampler = StreamSampler(len(dataset), cfg.train.seed, cfg.train.batch_size, d.rank, d.world,
                            start=trainer.images_seen, weights=trainer.image_weights)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train.batch_size // d.world,
        sampler=sampler,
        num_workers=cfg.train.workers,
        pin_memory=trainer.device.type == "cuda",
        drop_last=True,
        persistent_workers=cfg.train.workers > 0,
        worker_init_fn=_ignore_stop_signals,
    )


def _open_writer(trainer: Trainer, dataset: Any) -> Any:
    """The run's TensorBoard writer (events after the resumed step purged), and samples/reals.png once."""
    from torch.utils.tensorboard import SummaryWriter

    run, cfg = RunDir(trainer.run_dir), trainer.cfg
    writer = SummaryWriter(str(run.tensorboard), purge_step=trainer.step)
    if not (run.samples / "reals.png").is_file():
        cols, rows = cfg.train.sample_grid
        reals = torch.stack([dataset[i][0] for i in range(min(len(dataset), cols * rows))])
        save_image_grid(reals, run.samples / "reals.png", cols=cols)
    return writer


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    snapshot_score: SnapshotScore | None = None,
) -> TrainSummary:
    """Train (or resume) a run in ``run_dir``; returns when ``cfg.train.kimg`` images have been shown.

    ``max_steps`` stops early after that many steps in total (tests use it to cut a run in half).
    ``snapshot_score(checkpoint, data_zip)`` (the CLI passes `retinagen.metrics.quality.SnapshotScorer`)
    scores each snapshot on the main process: its numeric fields go to metrics.jsonl and TensorBoard as
    ``quality/<name>``, and the snapshot with the lowest ``fd_fundus`` so far is kept as
    ``checkpoints/best-<step>`` (outside the rotation of ``keep_checkpoints``). Scoring time is not counted
    in the run's ``train_seconds``.
    """
    run_dir = Path(run_dir)
    trainer = Trainer(cfg, run_dir, progress=progress)
    d = trainer.d
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunDir(run_dir).config, cfg.to_json_dict())
    print(
        f"retinagen train: {cfg.msi_name} on {cfg.data.dataset} at {cfg.model.resolution} px, device {trainer.device}"
        f"{' (bf16 autocast)' if trainer.amp_dtype else ''}, {d.world} process(es), "
        f"G {_count_params(trainer.G) / 1e6:.2f} M / D {_count_params(trainer.D) / 1e6:.2f} M params",
        file=sys.stderr,
    )

    zip_path = resolve_training_data(cfg, run_dir, d)
    dataset = _open_training_data(trainer, zip_path)
    if cfg.loss.grade_guide == AUTO:
        guide = RunDir(run_dir).grade_guide
        # Every process trains (the others into a temporary folder) so that none waits at the barrier for the
        # first; all then load the first one's file.
        have = guide.is_file() and guide.with_suffix(".json").is_file()
        if d.main or not have:
            ensure_auto_guide(guide, zip_path, dataset.fingerprint(), cfg.model.resolution, cfg.train.seed,
                              trainer.device, progress and d.main, keep=d.main)
        if d.world > 1:
            dist.barrier()
        trainer.guide = load_grade_guide(guide, trainer.num_classes, trainer.device)

    if resume:
        latest = latest_valid_checkpoint(RunDir(run_dir).checkpoints)
        if latest is None:
            raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
        trainer.restore(latest)
        print(f"resumed from {latest.name} at step {trainer.step} ({trainer.images_seen / 1000:.3f} kimg)", file=sys.stderr)
    metrics_path = RunDir(run_dir).metrics
    if d.main:
        # Drop log lines written after the snapshot we resumed from, so the curves have no duplicates.
        kept = log_lines_upto(metrics_path, trainer.step)
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))

    loader = _loader(trainer, dataset)
    total_images = int(round(cfg.train.kimg * 1000))
    writer = _open_writer(trainer, dataset) if d.main else None

    snapshot_every = max(1, int(round(cfg.train.snapshot_kimg * 1000)))
    sample_every = max(1, int(round(cfg.train.sample_kimg * 1000)))
    next_snapshot = (trainer.images_seen // snapshot_every + 1) * snapshot_every
    next_sample = (trainer.images_seen // sample_every + 1) * sample_every
    last_ck: Path | None = None
    best_fd = best_logged_fd(metrics_path) if d.main else math.inf
    t0 = time.perf_counter()
    trainer._clock = t0
    start_images = trainer.images_seen
    window_t, window_imgs = t0, trainer.images_seen
    stopped = False
    budget_s = None if cfg.train.max_minutes is None else cfg.train.max_minutes * 60.0
    # A resumed run whose budget is already spent ends at once (its last snapshot stands).
    budget_reached = budget_s is not None and trainer.train_seconds >= budget_s
    data_iter = iter(loader)
    with _StopFlag() as flag, progress_bar(total_images, "train", unit="img", enabled=progress and d.main,
                                                completed=trainer.images_seen) as bar:
        while trainer.images_seen < total_images and not budget_reached:
            if max_steps is not None and trainer.step >= max_steps:
                stopped = True
                break
            real, label = next(data_iter)
            real = real.to(trainer.device, non_blocking=True)
            real_grade = label.to(trainer.device) if trainer.num_classes else None
            stats = trainer.train_step(real, real_grade)
            bar.advance(cfg.train.batch_size)
            if d.main and (trainer.step % cfg.train.log_every_steps == 0 or trainer.images_seen >= total_images):
                now = time.perf_counter()
                rate = (trainer.images_seen - window_imgs) / max(now - window_t, 1e-9)
                window_t, window_imgs = now, trainer.images_seen
                _log_step(trainer, stats, rate, metrics_path, writer, bar)
            done = trainer.images_seen >= total_images
            budget_hit = not done and budget_s is not None and trainer.elapsed_train_seconds() >= budget_s
            if d.world > 1:  # every process leaves at the same step, or the others wait in an all_reduce
                budget_hit, stop_now = _agree_on_stopping(budget_hit, flag, trainer.device)
            else:
                stop_now = flag.stop  # read once: a signal from here on is acted on after the next step
            if budget_hit:
                done = budget_reached = True
            if d.main and (trainer.images_seen >= next_sample or done):
                trainer.save_samples()
                next_sample = (trainer.images_seen // sample_every + 1) * sample_every
            if trainer.images_seen >= next_snapshot or done or stop_now:
                if d.main:
                    last_ck = trainer.save()
                    if snapshot_score is not None and not stop_now:
                        best_fd, took = score_snapshot(snapshot_score, last_ck, zip_path, metrics_path, writer,
                                                       best_fd, step=trainer.step, images_seen=trainer.images_seen)
                        if trainer._clock is not None:
                            trainer._clock += took  # scoring is not training time
                next_snapshot = (trainer.images_seen // snapshot_every + 1) * snapshot_every
            if stop_now:
                stopped = True
                break
            if budget_reached:
                break
    if stopped and d.main and (last_ck is None or int(last_ck.stem.split("-")[1]) != trainer.step):
        last_ck = trainer.save()
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - t0
    if d.world > 1:
        dist.barrier()
    return TrainSummary(
        run_dir=run_dir, steps=trainer.step, images_seen=trainer.images_seen, elapsed_s=elapsed,
        images_per_s=(trainer.images_seen - start_images) / max(elapsed, 1e-9), last_checkpoint=last_ck,
        stopped_early=stopped, stop_signal=flag.signum if stopped else None, budget_reached=budget_reached,
    )  # fmt: skip


def load_run_config_from_dir(run_dir: Path) -> RunConfig:
    path = RunDir(run_dir).config
    if not path.is_file():
        raise RetinagenError(f"{run_dir}: not a run folder (no config.json)")
    return config_from_json(path.read_text(encoding="utf-8"), str(path))
