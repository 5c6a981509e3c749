"""Fixed judges: one fundus encoder and its DR-grade head, trained once on synthetic data no run trains on.

Scores of different runs are only comparable when the judge does not change between them. `retinagen
evaluate` trains its fd_fundus encoder on the data it is given, so two runs on two datasets (or one run
judged before and after a change to the encoder's settings) get two judges. A `Judges` is built from a
`JudgeSpec` alone, deterministically, and cached by the spec's key:

* a judge set of ``n_train`` `retinagen synth` fundi of seed ``seed`` with every DR grade equally likely
  (so the grade head sees enough of each lesion), prepared at ``resolution`` like any training ZIP;
* a reference set of ``n_reference`` fundi of seed ``seed + 1`` with the default grade mix (what the
  built-in training data looks like), prepared the same way: the real images generated ones are compared with;
* the fundus encoder of `retinagen.metrics.encoder` trained on the judge set (seed 0; grade cross-entropy +
  ground-truth factor regression): its features give fd_fundus and precision / recall, its grade head is
  the judge grader. The judges' own held-out figures (grade accuracy per grade on the reference set, the
  fd_fundus of one half of the reference set against the other) are stored with them.

Training data never uses the judges' seeds: the run config refuses ``data.synth_seed`` in `JUDGE_SEEDS`. The judge id (the encoder's SHA-256, first 12 hex digits) is printed with every score.

On disk (``DIR/judges-<key>/``, data only): ``encoder.safetensors`` + ``encoder.json`` (the encoder),
``reference.safetensors`` (the reference set's features, grades and factors), ``reference.zip`` (its
images, a prepared dataset: MIG reads Q on them), ``judges.json``
(spec, validation, SHA-256 of each file). The folder is written under a temporary name and renamed when
complete, so an interrupted build leaves nothing that loads.

Precision and recall are Kynkäänniemi et al. (2019) with k = 3 (StyleGAN2-ADA's ``pr50k3`` on our
features), computed by torch-fidelity's `prc_features_to_metric`. Grade fidelity of grade g: the share of
images generated with grade g that the judge grader gives grade g with probability >= 0.5. Referable
agreement: the share of generated images whose judged referable status (grade >= 2) is the requested one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from retinagen.config import JUDGE_SEEDS
from retinagen.dr_scale import GRADE_GROUPS, REFERABLE_GRADE, group_name
from retinagen.errors import CheckpointError
from retinagen.fileio import sha256_file
from retinagen.metrics.fid import feature_stats, frechet_distance, images_to_uint8_nchw

JUDGES_SCHEMA = "retinagen.judges/1"
# Not a seed any training data uses: `retinagen train` renders its built-in data with data.synth_seed
# (default 0), and the config refuses the judges' seeds JUDGE_SEEDS = (JUDGE_SEED, JUDGE_SEED + 1) there.
JUDGE_SEED = JUDGE_SEEDS[0]
FIDELITY_P = 0.5
PRC_K = 3
JUDGE_FILES = ("encoder.safetensors", "encoder.json", "reference.safetensors", "reference.zip")


@dataclass(frozen=True)
class JudgeSpec:
    """What determines the judges (and so their cache key): resolution, set sizes, seed, encoder training."""

    resolution: int = 32
    n_train: int = 3000
    n_reference: int = 1000
    seed: int = JUDGE_SEED
    epochs: int = 12
    min_steps: int = 800

    def key(self) -> str:
        payload = json.dumps({"schema": JUDGES_SCHEMA, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    @property
    def seeds(self) -> tuple[int, int]:
        return self.seed, self.seed + 1


def default_judges_dir() -> Path:
    return Path(os.environ.get("RETINAGEN_JUDGES_DIR", "~/.cache/retinagen/judges")).expanduser()


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = PRC_K) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019) precision and recall of ``fake`` features against ``real`` ([N, D] each)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    if len(fake) <= k or len(real) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images on each side")
    out = prc_features_to_metric(
        torch.as_tensor(np.asarray(fake, np.float32)),
        torch.as_tensor(np.asarray(real, np.float32)),
        prc_neighborhood=k,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])


class Judges:
    """Loaded judges: `features`, `grade_proba` and `score` of uint8 images."""

    def __init__(self, folder: Path, meta: dict[str, Any], encoder: Any, reference: dict[str, torch.Tensor]):
        self.folder = folder
        self.meta = meta
        self.encoder = encoder
        self.net = encoder.net
        self.ref_features = reference["features"].numpy()
        self.ref_grades = reference["grades"].numpy()
        self.ref_factors = reference["factors"].numpy() if "factors" in reference else None
        self.factor_names: list[str] = list(meta.get("factor_names", []))
        self.ref_mu, self.ref_sigma = feature_stats(self.ref_features)

    def with_reference(self, features: np.ndarray, label: str, grades: np.ndarray | None = None) -> Judges:
        """The same encoder and grader against another reference set (e.g. a run's real training images), with
        its images' DR grades where known (-1: unknown)."""
        meta = {**self.meta, "reference": label}
        g = np.full(len(features), -1, np.int64) if grades is None else np.asarray(grades, np.int64)
        if len(g) != len(features):
            raise ValueError(f"{len(features)} reference features but {len(g)} grades")
        ref = {"features": torch.from_numpy(np.ascontiguousarray(features, np.float32)), "grades": torch.from_numpy(g)}
        return Judges(self.folder, meta, self.encoder, ref)

    def reference_grade_probs(self, num_classes: int) -> np.ndarray | None:
        """The reference set's share of each DR grade (None when its grades are unknown): the grade mix that
        generated images are drawn with for fd_fundus, precision and recall."""
        known = self.ref_grades[(self.ref_grades >= 0) & (self.ref_grades < num_classes)]
        if not len(known):
            return None
        return np.bincount(known, minlength=num_classes) / len(known)

    @property
    def judge_id(self) -> str:
        return str(self.meta["files"]["encoder.safetensors"])[:12]

    @property
    def reference_zip(self) -> Path:
        """The reference set as a prepared dataset ZIP (images, grades, ground-truth factors): MIG's real data."""
        return self.folder / "reference.zip"

    @property
    def resolution(self) -> int:
        return int(self.meta["spec"]["resolution"])

    @property
    def num_classes(self) -> int:
        return int(self.net.cfg.num_classes)

    def _run(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        return _judge(self.net, images)

    def features(self, images: Any) -> np.ndarray:
        return self._run(images)[0]

    def grade_proba(self, images: Any) -> np.ndarray:
        return self._run(images)[1]

    def fd(self, features: np.ndarray) -> float:
        mu, sigma = feature_stats(features)
        return float(frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma))

    def score(self, images: Any, requested_grades: np.ndarray | Sequence[int] | None = None) -> dict[str, Any]:
        """fd_fundus, precision and recall of generated images against the reference set, and (when grades
        were requested) grade fidelity of the same images. Fréchet distance and precision / recall compare
        distributions, so the images should have the reference's grade mix (`reference_grade_probs`); fidelity
        wants every grade asked for: `retinagen.metrics.quality.score_checkpoint` scores two sets for that."""
        feats, proba = self._run(images)
        precision, recall = precision_recall(feats, self.ref_features)
        out: dict[str, Any] = {
            "judge": self.judge_id,
            "n": int(len(feats)),
            "fd_fundus": self.fd(feats),
            "precision": precision,
            "recall": recall,
        }
        if requested_grades is not None and proba.shape[1]:
            out.update(grade_fidelity(proba, np.asarray(requested_grades, np.int64)))
        return out

    def fidelity(self, images: Any, requested_grades: np.ndarray | Sequence[int]) -> dict[str, Any]:
        """Grade fidelity (`grade_fidelity`) of generated images asked for ``requested_grades``."""
        return grade_fidelity(self.grade_proba(images), np.asarray(requested_grades, np.int64))


@torch.no_grad()
def _judge(net: Any, images: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], grade probabilities [N, C] or [N, 0]) of images under the encoder ``net``.

    The encoder normalises per image (GroupNorm), so the batch size changes no value; 64 rather than 256 keeps
    the activations in cache (measured: 1,000 images at 32 px ~20 % faster on one and on two CPU threads)."""
    x = images_to_uint8_nchw(images)
    feats, probs = [], []
    for start in range(0, len(x), batch_size):
        f = net(x[start : start + batch_size])
        feats.append(f.numpy())
        if net.grade_head is not None:
            probs.append(torch.softmax(net.grade_head(f), dim=1).numpy())
    f_all = np.concatenate(feats) if feats else np.zeros((0, net.cfg.feature_dim), np.float32)
    p_all = np.concatenate(probs) if probs else np.zeros((len(f_all), 0), np.float32)
    return f_all, p_all


def grade_fidelity(proba: np.ndarray, requested: np.ndarray) -> dict[str, Any]:
    """Per requested grade, the share judged that grade with p >= 0.5; per group of `GRADE_GROUPS` asked
    for, the share whose p summed over the group's grades is >= 0.5; and the referable agreement."""
    if len(proba) != len(requested):
        raise ValueError(f"{len(proba)} judged images but {len(requested)} requested grades")
    hit = proba[np.arange(len(requested)), np.clip(requested, 0, proba.shape[1] - 1)] >= FIDELITY_P
    per = {int(g): float(hit[requested == g].mean()) for g in np.unique(requested) if g >= 0}
    groups = {}
    for group in GRADE_GROUPS:
        asked = np.isin(requested, group)
        if asked.any() and max(group) < proba.shape[1]:
            groups[group_name(group)] = float((proba[asked][:, list(group)].sum(1) >= FIDELITY_P).mean())
    judged_ref = proba[:, REFERABLE_GRADE:].sum(1) >= 0.5
    agree = float((judged_ref == (requested >= REFERABLE_GRADE)).mean()) if len(requested) else float("nan")
    return {"fidelity": per, "group_fidelity": groups, "referable_agreement": agree}


# ------------------------------------------------------------------------------------------- building


def prepare_set(tmp: Path, name: str, n: int, seed: int, res: int, probs: Sequence[float]) -> Path:
    """``n`` fundi of ``seed`` with grade mix ``probs``, rendered and prepared at ``res`` px into
    ``tmp/<name>.zip`` as the judges' own sets are (``prepare_set(.., "train", spec.n_train, spec.seed, ..,
    [0.2] * 5)`` is the set the judges learn from)."""
    from retinagen.data.prepare import prepare_dataset
    from retinagen.data.synthetic import write_synth_dataset

    src = tmp / f"{name}-src"
    # Rendered at >= 64 px and downscaled by prepare, as `retinagen train` does with its built-in data.
    write_synth_dataset(src, n=n, resolution=max(res, 64), seed=seed, grade_probs=probs, progress=False)
    out = tmp / f"{name}.zip"
    prepare_dataset("eyepacs", src, res, out, label=f"judges-{name}", progress=False)
    shutil.rmtree(src)
    return out


def _dataset_arrays(zip_path: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None, list[str]]:
    from retinagen.data.dataset import ZipImageDataset, per_image_table

    ds = ZipImageDataset(zip_path)
    imgs = torch.stack([images_to_uint8_nchw(np.asarray(ds.read_uint8(i)))[0] for i in range(len(ds))])
    grades = np.asarray(ds.labels, np.int64)
    meta = ds.meta if isinstance(getattr(ds, "meta", None), dict) else {}
    table = per_image_table(meta.get("factors"), list(ds.names))
    if table is None:
        return imgs, grades, None, []
    names, values = table
    return imgs, grades, np.asarray(values, np.float32), [str(n) for n in names]


def build_judges(spec: JudgeSpec, folder: Path, progress: bool = True) -> Path:
    """Build the judges of ``spec`` into ``folder`` (atomically); returns ``folder``."""
    from retinagen.data.synthetic import DEFAULT_GRADE_PROBS
    from retinagen.metrics.encoder import load_fundus_encoder, train_fundus_encoder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        if progress:
            print(f"judges {spec.key()}: rendering {spec.n_train} + {spec.n_reference} fundi", file=sys.stderr)
        train_zip = prepare_set(tmp, "train", spec.n_train, spec.seed, spec.resolution, [0.2] * 5)
        ref_zip = prepare_set(tmp, "reference", spec.n_reference, spec.seed + 1, spec.resolution, DEFAULT_GRADE_PROBS)
        train_fundus_encoder(train_zip, tmp / "encoder", resolution=spec.resolution, epochs=spec.epochs,
                             min_steps=spec.min_steps, seed=0, progress=progress)
        enc = load_fundus_encoder(tmp / "encoder.safetensors")
        imgs, grades, factors, names = _dataset_arrays(ref_zip)
        feats, proba = _judge(enc.net, imgs)
        tensors = {"features": torch.from_numpy(feats), "grades": torch.from_numpy(grades)}
        if factors is not None:
            tensors["factors"] = torch.from_numpy(factors)
        save_file(tensors, str(tmp / "reference.safetensors"))
        validation = _validate(feats, proba, grades)
        train_zip.unlink()
        for extra in tmp.iterdir():  # prepare's reports, the encoder's scratch: only the judges' files stay
            if extra.name not in JUDGE_FILES + ("judges.json",):
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        meta = {
            "schema": JUDGES_SCHEMA,
            "spec": asdict(spec),
            "key": spec.key(),
            "factor_names": names,
            "validation": validation,
            "files": {n: sha256_file(tmp / n) for n in JUDGE_FILES},
        }
        (tmp / "judges.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _validate(feats: np.ndarray, proba: np.ndarray, grades: np.ndarray) -> dict[str, Any]:
    """The judges' own figures on the held-out reference set: grade accuracy per grade, FD floor."""
    out: dict[str, Any] = {"n_reference": int(len(feats))}
    if proba.shape[1]:
        pred = proba.argmax(1)
        out["grade_accuracy"] = float((pred == grades).mean())
        out["grade_accuracy_per_grade"] = {int(g): float((pred[grades == g] == g).mean()) for g in np.unique(grades)}
        out["grade_counts"] = {int(g): int((grades == g).sum()) for g in np.unique(grades)}
        out["referable_accuracy"] = float(((proba[:, REFERABLE_GRADE:].sum(1) >= 0.5) == (grades >= REFERABLE_GRADE)).mean())
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(feats))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    mu_a, s_a = feature_stats(feats[a])
    mu_b, s_b = feature_stats(feats[b])
    out["fd_half_vs_half"] = float(frechet_distance(mu_a, s_a, mu_b, s_b))
    return out


def load_judges(folder: Path) -> Judges:
    """Load judges built by `build_judges`; refuses a folder whose files do not match their SHA-256."""
    from retinagen.metrics.encoder import load_fundus_encoder

    meta_path = folder / "judges.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not readable judges ({exc})") from None
    if not isinstance(meta, dict) or meta.get("schema") != JUDGES_SCHEMA:
        raise CheckpointError(f"{meta_path}: not a judges file (schema {meta.get('schema')!r})")
    files = meta.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(JUDGE_FILES):
        raise CheckpointError(f"{meta_path}: lists {sorted(files or {})}, expected {sorted(JUDGE_FILES)}")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the judges are incomplete; delete {folder} to rebuild)")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: contents do not match the sha256 in judges.json (delete {folder} to rebuild)")
    enc = load_fundus_encoder(folder / "encoder.safetensors")
    ref = load_file(str(folder / "reference.safetensors"))
    return Judges(folder, meta, enc, ref)


# Judges that ship with the package (the default 32 px spec): loaded from here before any cache is built.
SHIPPED_JUDGES_DIR = Path(__file__).resolve().parent.parent / "assets" / "judges"


def get_judges(spec: JudgeSpec | None = None, cache_dir: Path | None = None, progress: bool = True) -> Judges:
    """The judges of ``spec``: the shipped ones, else loaded from the cache, or built there first (minutes,
    once per spec). ``cache_dir`` given explicitly is the only place looked in (tests build their own)."""
    spec = spec or JudgeSpec()
    shipped = SHIPPED_JUDGES_DIR / f"judges-{spec.key()}"
    if cache_dir is None and (shipped / "judges.json").is_file():
        return load_judges(shipped)
    folder = (cache_dir or default_judges_dir()) / f"judges-{spec.key()}"
    if not (folder / "judges.json").is_file():
        build_judges(spec, folder, progress=progress)
    return load_judges(folder)


# ------------------------------------------------------------------------------------------- validation

# Disturbances of real images and their levels (Heusel et al. 2017, Fig. 1, on our features): each must raise
# fd_fundus as its level rises. Blur and noise in pixels / grey levels at the judges' resolution; colour: a
# red-up / blue-down gain; occlusion: a black square of that fraction of the side; the mode-dropping ones keep
# part of the set (one DR grade; the lowest fraction of pigmentation; that many distinct images) and resample
# it to the full size, so only diversity changes.
DISTURBANCES: dict[str, tuple[float, ...]] = {
    "blur": (0.5, 1.0, 2.0),
    "noise": (4.0, 8.0, 16.0),
    "colour": (0.05, 0.1, 0.2),
    "occlusion": (0.2, 0.35, 0.5),
    "one_grade": (0.0,),
    "pigmentation_range": (0.5, 0.25, 0.1),
    "repeated": (0.25, 0.05, 0.01),
}


MODE_DROPPING = ("one_grade", "pigmentation_range", "repeated")  # resample part of the set: no pixel changes


def _resampled(name: str, level: float, grades: np.ndarray, factors: np.ndarray | None,
               factor_names: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """The indices a mode-dropping disturbance draws (as many as there are images)."""
    n = len(grades)
    if name == "one_grade":
        keep = np.flatnonzero(grades == int(level))
    elif name == "pigmentation_range":
        if factors is None or "pigmentation" not in factor_names:
            raise ValueError("pigmentation_range needs the images' ground-truth pigmentation factor")
        col = factors[:, list(factor_names).index("pigmentation")]
        keep = np.flatnonzero(col <= np.quantile(col, level))
    else:
        keep = rng.choice(n, size=max(1, int(round(level * n))), replace=False)
    return keep[rng.integers(0, len(keep), n)] if len(keep) else keep


def _rng(name: str, level: float, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), int(level * 1000)])


def disturb(name: str, level: float, images: np.ndarray, grades: np.ndarray, factors: np.ndarray | None,
            factor_names: Sequence[str], seed: int = 0) -> np.ndarray:
    """``images`` (uint8 [N, H, W, 3]) under one disturbance of `DISTURBANCES` at ``level``."""
    import cv2

    rng = _rng(name, level, seed)
    n = len(images)
    x = images.astype(np.float32)
    if name == "blur":
        return np.stack([cv2.GaussianBlur(im, (0, 0), sigmaX=level, borderType=cv2.BORDER_REFLECT) for im in images])
    if name == "noise":
        return np.clip(x + rng.normal(0.0, level, x.shape), 0, 255).round().astype(np.uint8)
    if name == "colour":
        gain = np.array([1 + level, 1.0, 1 - level], np.float32)
        return np.clip(x * gain, 0, 255).round().astype(np.uint8)
    if name == "occlusion":
        out = images.copy()
        h, w = images.shape[1:3]
        s = max(1, int(round(level * min(h, w))))
        for i in range(n):
            top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            out[i, top : top + s, left : left + s] = 0
        return out
    if name not in MODE_DROPPING:
        raise ValueError(f"unknown disturbance {name!r}; known: {', '.join(DISTURBANCES)}")
    return images[_resampled(name, level, grades, factors, factor_names, rng)]


def disturbance_table(judges: Judges, images: np.ndarray, grades: np.ndarray, factors: np.ndarray | None,
                      factor_names: Sequence[str]) -> list[dict[str, Any]]:
    """fd_fundus, precision and recall of held-out real ``images`` as they are and under every disturbance.

    A mode-dropping disturbance only resamples the images, so its features are the undisturbed ones, indexed.
    """
    rows = []

    def add(name: str, level: float, feats: np.ndarray) -> None:
        p, r = precision_recall(feats, judges.ref_features)
        rows.append({"disturbance": name, "level": level, "fd_fundus": judges.fd(feats), "precision": p, "recall": r})

    base = judges.features(images)
    add("none", 0.0, base)
    for name, levels in DISTURBANCES.items():
        for level in levels:
            if name in MODE_DROPPING:
                feats = base[_resampled(name, level, grades, factors, factor_names, _rng(name, level, 0))]
            else:
                feats = judges.features(disturb(name, level, images, grades, factors, factor_names))
            add(name, level, feats)
    return rows


def held_out_real(spec: JudgeSpec, n: int, seed: int, folder: Path, grade_probs: Sequence[float] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """``n`` real-like fundi of ``seed`` (the reference mix of grades, or ``grade_probs``), prepared as the
    judges' sets are: (uint8 [N, R, R, 3], grades, factors or None, factor names)."""
    from retinagen.data.synthetic import DEFAULT_GRADE_PROBS

    if seed in spec.seeds:
        raise ValueError(f"seed {seed} is one of the judges' own seeds {spec.seeds}: not held out")
    probs = DEFAULT_GRADE_PROBS if grade_probs is None else grade_probs
    zip_path = prepare_set(folder, f"heldout-{seed}", n, seed, spec.resolution, probs)
    imgs, grades, factors, names = _dataset_arrays(zip_path)
    return imgs.permute(0, 2, 3, 1).numpy(), grades, factors, names
