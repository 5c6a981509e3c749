"""Generation from a trained checkpoint: images, fixed codes, traversal grids.

The public entry points the CLI, the clinical modules and the dashboard use:

    model = load_model("runs/cpu")                  # a run folder (its newest valid checkpoint) or a file
    imgs, values = generate_images(model, n=16, seed=0, grade=2, codes={"c4": 0.8})
    grid = traversal_grid(model, factor=4, steps=7, samples=8, seed=0)

Generation uses the EMA generator with constant noise, so the same seed gives the same images on
the same device.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retinagen.config import RunConfig, config_from_json
from retinagen.errors import BadInputError, CheckpointError, RetinagenError
from retinagen.fileio import sha256_file
from retinagen.latent import CodeValueError, LatentSample, LatentSpec
from retinagen.networks.build import build_d, build_g, latent_spec, num_classes
from retinagen.run_dir import FACTOR_MAP_FILE, RunDir
from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint


@dataclass
class LoadedModel:
    """An inference-ready model: EMA generator (+ discriminator/Q head when stored)."""

    cfg: RunConfig
    spec: LatentSpec
    G: nn.Module
    D: nn.Module | None
    meta: dict[str, Any]
    path: Path
    sha256: str
    device: torch.device

    @property
    def num_classes(self) -> int:
        return num_classes(self.cfg)

    @property
    def resolution(self) -> int:
        return self.cfg.model.resolution

    @property
    def factor_names(self) -> dict[str, str]:
        """Code name -> discovered attribute name, when a factor map is stored next to the checkpoint."""
        return dict(self.meta.get("factor_names", {}))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path: given a run folder, its newest complete checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = latest_valid_checkpoint(RunDir(path).checkpoints) or latest_valid_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint found in this run folder")
        return found.with_suffix(".safetensors")
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path.with_suffix(".safetensors") if path.suffix == ".json" else path


def load_model(path: str | Path, device: str | torch.device = "cpu", *, with_discriminator: bool = True) -> LoadedModel:
    """Load G_ema (and D with its Q head) from a data-only checkpoint."""
    tensor_path = resolve_checkpoint(path)
    ck = load_checkpoint(tensor_path)
    if "config" not in ck.meta:
        raise CheckpointError(f"{tensor_path}: metadata has no config; not a retinagen model checkpoint")
    cfg = config_from_json(ck.meta["config"], f"{tensor_path.with_suffix('.json')}:config")
    device = torch.device(device)
    G = build_g(cfg)
    prefix = "G_ema" if ck.has("G_ema") else "G"
    try:
        G.load_state_dict(ck.module_state(prefix))
    except RuntimeError as exc:
        raise CheckpointError(f"{tensor_path}: generator weights do not match its config ({exc})") from None
    D = None
    if with_discriminator and ck.has("D"):
        D = build_d(cfg)
        try:
            D.load_state_dict(ck.module_state("D"))
        except RuntimeError as exc:
            raise CheckpointError(f"{tensor_path}: discriminator weights do not match its config ({exc})") from None
        D = D.to(device).eval().requires_grad_(False)
    G = G.to(device).eval().requires_grad_(False)
    return LoadedModel(
        cfg=cfg,
        spec=latent_spec(cfg.latent),
        G=G,
        D=D,
        meta=ck.meta,
        path=tensor_path,
        sha256=sha256_file(tensor_path),
        device=device,
    )


def default_factor_map_path(checkpoint: str | Path) -> Path:
    """Where ``retinagen discover`` writes, and generation looks for, the factor map of a checkpoint file.

    ``RUN/factors.json`` for a checkpoint inside a run folder; ``<stem>.factors.json`` beside a lone checkpoint
    file (e.g. a shipped ``model.safetensors`` -> ``model.factors.json``).
    """
    ck = Path(checkpoint)
    run = RunDir.of_checkpoint(ck)
    if run is not None:
        return run.factors
    return ck.with_name(f"{ck.stem}.{FACTOR_MAP_FILE}")


def find_factor_map(model: LoadedModel, path: str | Path | None = None) -> tuple[dict[str, Any], Path] | None:
    """The factor map for ``model``: ``path`` when given (it must exist), else the default one if present.

    Returns ``(map, path)`` or None when no path is given and no default map exists. The map is validated
    (`retinagen.factor_map.load_factor_map`) and every code it names must be a code of ``model``
    (`CodeValueError` otherwise: a map discovered on a model with other codes is unusable).
    """
    from retinagen.factor_map import load_factor_map

    if path is None:
        path = default_factor_map_path(model.path)
        if not path.is_file():
            return None
    path = Path(path)
    fmap = load_factor_map(path)
    foreign = sorted(set(fmap["codes"]) - set(model.spec.code_names))
    if foreign:
        raise CodeValueError(
            f"{path}: the factor map names code(s) {', '.join(foreign)} that {model.path.name} does not have "
            f"(its codes are {_code_range(model.spec)}); it was discovered on another model"
        )
    return fmap, path


def _code_range(spec: LatentSpec) -> str:
    return f"c0..c{spec.n_codes - 1}" if spec.n_codes > 1 else ", ".join(spec.code_names) or "none"


def resolve_code_name(spec: LatentSpec, name: str | int, aliases: Mapping[str, str] | None = None,
                      factor_map: Mapping[str, Any] | None = None, *, flag: str = "--set") -> int:
    """The index of the code a user named: an index (``4``), a code name (``c4``) or an attribute name.

    Attribute names come from ``aliases`` (code -> attribute, `retinagen.factor_map.factor_aliases`) and
    from a factor map (its assigned attributes and their synonyms, e.g. ``melanin`` for ``pigmentation``,
    `retinagen.factor_map.attribute_codes`). Raises `CodeValueError` whose message lists every valid
    name; for an attribute name without a factor map it says how to make one; for an attribute the map did not
    assign to any code it says so.
    """
    from retinagen.factor_map import attribute_codes
    from retinagen.metrics.attributes import ATTRIBUTES, SYNONYMS

    text = str(name).strip()
    if (isinstance(name, int) and not isinstance(name, bool)) or text.isdigit():
        if not 0 <= int(text) < spec.n_codes:
            raise CodeValueError(f"{flag} {text}: code index out of range; this model has codes {_code_range(spec)}")
        return int(text)
    by_attr: dict[str, str] = {attr: code for code, attr in (aliases or {}).items()}
    if factor_map is not None:
        for attr, code in attribute_codes(factor_map).items():
            by_attr.setdefault(attr, code)
    code = by_attr.get(text, text)
    if code in spec.code_names:
        return spec.code_names.index(code)
    if text in by_attr:  # an attribute whose code is not in this model (a map of another model)
        raise CodeValueError(f"{flag} {text}: the factor map assigns it to {code}, which this model does not have")
    valid = f"codes {_code_range(spec)}"
    if by_attr:
        valid += "; attributes " + ", ".join(f"{a} ({c})" for a, c in sorted(by_attr.items()))
    if text in ATTRIBUTES or text in SYNONYMS:
        if factor_map is None and not by_attr:
            raise CodeValueError(
                f"{flag} {text}: {text!r} is an attribute name, but this checkpoint has no factor map; run "
                "`retinagen discover --checkpoint CK` first (it writes RUN/factors.json) or pass --factors "
                f"FACTORS.json. Valid names now: {valid}"
            )
        raise CodeValueError(
            f"{flag} {text}: the factor map assigns no code to {SYNONYMS.get(text, text)!r} (discovery found "
            f"no code that controls it consistently). Valid names: {valid}"
        )
    raise CodeValueError(f"{flag} {text}: unknown code or attribute. Valid names: {valid}")


def parse_code_settings(spec: LatentSpec, items: Sequence[str] | Mapping[str, float] | None,
                        aliases: Mapping[str, str] | None = None, *,
                        factor_map: Mapping[str, Any] | None = None) -> dict[int, float]:
    """``["c4=0.8", "melanin=1"]`` -> ``{4: 0.8, ...}``: code index -> the value it is fixed to.

    Names are resolved by `resolve_code_name`: code names (``c4``), attribute aliases (``aliases``: code ->
    attribute) and, with a factor map, every discovered attribute and its synonyms. The value is the code's own
    value (a class index, 0/1, or a number in [-1, 1]), not an attribute level. Raises `CodeValueError`.
    """
    if not items:
        return {}
    pairs: list[tuple[str, str]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        for item in items:
            if "=" not in item:
                raise CodeValueError(f"--set {item!r}: expected NAME=VALUE, e.g. c4=0.8")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[int, float] = {}
    for name, raw in pairs:
        idx = resolve_code_name(spec, name, aliases, factor_map)
        try:
            value = float(raw)
        except ValueError:
            raise CodeValueError(f"--set {name}={raw}: value is not a number") from None
        if idx in out and out[idx] != value:
            raise CodeValueError(f"--set {name}={raw}: {spec.code_names[idx]} is already set to {out[idx]:g}")
        try:  # the range check generation applies, made now so a bad value fails before any image is written
            spec.with_code(spec.sample(1), idx, value, allow_extrapolation=True)
        except CodeValueError as exc:
            raise CodeValueError(f"--set {name}={raw}: {exc}") from None
        out[idx] = value
    return out


def _to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((imgs.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _check_grade(model: LoadedModel, grade: int | None) -> None:
    if grade is None:
        return
    if model.num_classes == 0:
        raise RetinagenError("--grade given but this model is not DR-grade conditional")
    if not 0 <= grade < model.num_classes:
        raise RetinagenError(f"--grade {grade}: must be in 0..{model.num_classes - 1}")


def _grades(model: LoadedModel, n: int, grade: int | None, gen: torch.Generator) -> torch.Tensor | None:
    if model.num_classes == 0:
        return None
    if grade is not None:
        return torch.full((n,), grade, dtype=torch.int64)
    probs = model.meta.get("grade_probs") or [1.0 / model.num_classes] * model.num_classes
    return torch.multinomial(torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=gen)


@torch.no_grad()
def run_generator(model: LoadedModel, sample: LatentSample, grade: torch.Tensor | None,
                  truncation_psi: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """G_ema on a latent sample, in batches: [N, 3, R, R] float in [-1, 1] on the CPU."""
    outs = []
    for start in range(0, sample.n, batch_size):
        part = sample[slice(start, start + batch_size)].to(model.device)
        g = None if grade is None else grade[start : start + batch_size].to(model.device)
        outs.append(model.G(part.z_noise, part.code(), g, truncation_psi=truncation_psi, noise_mode="const").float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 3, model.resolution, model.resolution)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a run with ``seed``: images do not depend on batch size or n."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def sample_latents(model: LoadedModel, seeds: Sequence[int], grade: int | None = None) -> tuple[LatentSample, torch.Tensor | None]:
    """One latent (and DR grade, when conditional) per seed, each from its own generator."""
    _check_grade(model, grade)
    parts, grades = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))
        parts.append(model.spec.sample(1, gen))
        g = _grades(model, 1, grade, gen)
        if g is not None:
            grades.append(g)
    sample = LatentSample(
        model.spec,
        torch.cat([p.z_noise for p in parts]),
        torch.cat([p.cat for p in parts]),
        torch.cat([p.bern for p in parts]),
        torch.cat([p.unif for p in parts]),
    )
    return sample, (torch.cat(grades) if grades else None)


def generate_images(
    model: LoadedModel,
    n: int,
    seed: int = 0,
    *,
    grade: int | None = None,
    codes: Mapping[int, float] | None = None,
    truncation_psi: float = 1.0,
    batch_size: int = 64,
    start: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images ``start .. start+n-1`` of a seeded run: uint8 [N, R, R, 3] and their latents.

    Returns ``(images, info)`` with ``info["values"]`` [N, L] (the codes), ``info["grade"]`` [N]
    (-1 when unconditional) and ``info["seed"]`` [N] (the per-image seeds).
    """
    if n < 1:
        raise RetinagenError(f"--n must be >= 1, got {n}")
    seeds = [image_seed(seed, i) for i in range(start, start + n)]
    sample, grades = sample_latents(model, seeds, grade)
    for idx, value in (codes or {}).items():
        sample = model.spec.with_code(sample, idx, value, allow_extrapolation=True)
    imgs = run_generator(model, sample, grades, truncation_psi, batch_size)
    info = {
        "values": sample.values().cpu().numpy(),
        "grade": (grades.numpy() if grades is not None else np.full(n, -1)),
        "seed": np.asarray(seeds, dtype=np.uint64),
    }
    return _to_uint8(imgs), info


def traversal_values(spec: LatentSpec, factor: int, steps: int) -> list[float]:
    """The values a traversal visits: every class, 0/1, or ``steps`` points over [-1, 1]."""
    kind = spec.code_kinds[factor]
    if kind == "categorical":
        return [float(k) for k in range(spec.categorical[factor])]
    if kind == "bernoulli":
        return [0.0, 1.0]
    return [float(v) for v in np.linspace(-1.0, 1.0, steps)]


@torch.no_grad()
def traversal_images(model: LoadedModel, factor: int | str, steps: int = 7, samples: int = 8, seed: int = 0,
                     grade: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """Images [V, S, 3, R, R] in [-1, 1]: row v sets code ``factor`` to its v-th value, columns resample the rest."""
    spec = model.spec
    idx = spec.code_index(factor)
    if samples < 1 or steps < 2:
        raise RetinagenError("traversal needs --samples >= 1 and --steps >= 2")
    _check_grade(model, grade)
    gen = torch.Generator().manual_seed(seed)
    base = spec.sample(samples, gen)
    grades = _grades(model, samples, grade, gen)
    values = traversal_values(spec, idx, steps)
    rows = []
    for v in values:
        s = spec.with_code(base, idx, v, allow_extrapolation=True)
        rows.append(run_generator(model, s, grades))
    return torch.stack(rows), values


def traversal_grid(model: LoadedModel, factor: int | str, steps: int = 7, samples: int = 8, seed: int = 0,
                   grade: int | None = None) -> np.ndarray:
    """A Figure-1-style grid as uint8 [V*R, S*R, 3] (rows: code values, columns: other latents)."""
    imgs, _ = traversal_images(model, factor, steps, samples, seed, grade)
    v, s, _, r, _ = imgs.shape
    u8 = _to_uint8(imgs.reshape(v * s, 3, r, r)).reshape(v, s, r, r, 3)
    return u8.transpose(0, 2, 1, 3, 4).reshape(v * r, s * r, 3)


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes with no text metadata."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


MANIFEST_COLUMNS = ["file", "level", "synthetic", "seed", "codes", "checkpoint_sha256", "model", "created"]


def write_generated(model: LoadedModel, out: Path, n: int, seed: int = 0, *, grade: int | None = None,
                    codes: Mapping[int, float] | None = None, batch_size: int = 64, progress: bool = True,
                    also_write: Callable[[np.ndarray, dict[str, Any]], None] | None = None) -> Path:
    """Write ``n`` PNGs and ``manifest.csv`` (every row marked synthetic=1 with its provenance).

    ``also_write(rgb [H, W, 3] uint8, row)`` is called after each PNG with its manifest row (e.g. to
    write the same image as DICOM, see ``retinagen generate --dicom``). Generating into a folder that
    already holds a manifest adds to it (a file written again gets its new row). Every PNG left on disk
    is listed as synthetic: when an error or Ctrl-C stops the run, the manifest is written with the
    images so far, and if even that fails (a full disk), the PNGs this run wrote are removed.
    """
    from retinagen.fileio import atomic_write_bytes, atomic_write_text
    from retinagen.progress import progress_bar

    out = Path(out)
    manifest = out / "manifest.csv"
    rows = _read_manifest(manifest)  # file -> row; read first: a damaged manifest stops before any work
    out.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    written: list[Path] = []

    def write_manifest() -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows.values())
        atomic_write_text(manifest, buf.getvalue())

    try:
        with progress_bar(n, "generate", enabled=progress) as bar:
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                imgs, info = generate_images(model, m, seed=seed, grade=grade, codes=codes, start=start)
                for j in range(m):
                    name = f"seed{seed}-{start + j:06d}.png"
                    row = {
                        "file": name,
                        "level": int(info["grade"][j]),
                        "synthetic": 1,
                        "seed": int(info["seed"][j]),
                        "codes": " ".join(f"{c}={v:g}" for c, v in zip(model.spec.code_names, info["values"][j], strict=True)),
                        "checkpoint_sha256": model.sha256,
                        "model": model.cfg.msi_name,
                        "created": created,
                    }
                    atomic_write_bytes(out / name, png_bytes(imgs[j]))
                    rows.pop(name, None)  # a rewritten file's row moves to the end, with its new provenance
                    rows[name] = row
                    written.append(out / name)
                    if also_write is not None:
                        also_write(imgs[j], row)
                bar.advance(m)
    except BaseException:
        # Every image already written stays marked synthetic: record them before the error propagates.
        # Where the manifest cannot be written either (a full disk), this run's PNGs go, so that no
        # synthetic image is left without its manifest row.
        try:
            write_manifest()
        except OSError:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if written:
                print(f"note: removed the {len(written)} images written before the error: {manifest} "
                      "could not be written to mark them synthetic", file=sys.stderr)
        raise
    write_manifest()
    return manifest


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an existing manifest by file name; {} when there is none. Refuses a damaged one."""
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != MANIFEST_COLUMNS:
                raise BadInputError(path, f"not a retinagen manifest: its columns are {reader.fieldnames}, "
                                          f"expected {MANIFEST_COLUMNS}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(path, f"cannot read the existing manifest ({type(exc).__name__})") from None
    for i, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()) or row["synthetic"] != "1" or not row["file"]:
            raise BadInputError(path, f"line {i} is malformed; move the folder's manifest away or write elsewhere")
    return {row["file"]: row for row in rows}


def write_traversal_grids(model: LoadedModel, out_dir: Path, *, steps: int = 7, samples: int = 8, seed: int = 0,
                          progress: bool = True) -> list[Path]:
    """One traversal grid PNG per code (``c0.png`` ...) in ``out_dir``."""
    from retinagen.fileio import atomic_write_bytes
    from retinagen.progress import progress_bar

    paths = []
    with progress_bar(model.spec.n_codes, "traversals", unit="grid", enabled=progress) as bar:
        for i, name in enumerate(model.spec.code_names):
            path = Path(out_dir) / f"{name}.png"
            atomic_write_bytes(path, png_bytes(traversal_grid(model, i, steps, samples, seed)))
            paths.append(path)
            bar.advance(1)
    return paths
