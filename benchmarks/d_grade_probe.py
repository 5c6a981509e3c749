"""Does the discriminator see the DR grade? Linear probes of D's features on the run's own training images.

    python benchmarks/d_grade_probe.py runs/abl/a/checkpoints/ckpt-001500.safetensors [more checkpoints ...]

Projection conditioning and the auxiliary grade classifier can only steer G towards a grade's lesions if
D's features tell the grades apart. For each checkpoint, on the images of its run's training ZIP (found from
the checkpoint's run folder, or ``--data``), this prints:

* per feature of D's trunk (``rgbR``, ``blockR``: each block's output averaged over space; ``conv4``; ``h``, the
  features the projection, Q and the grade classifier read): a logistic-regression probe fitted on 3/4 of the
  images and scored on the rest, as cross-entropy (against the grade prior's: a probe that learned nothing
  scores the prior's or worse) and balanced accuracy (chance: 1 / number of grades present);
* the raw pixels and the fixed judges' fundus encoder (`retinagen.metrics.judges`, trained to grade; skip
  with ``--no-judge``), probed the same way: what a probe finds where the grade is in the features;
* for a model with ``model.aux_classifier``: D's own classifier, its cross-entropy and confusion matrix;
* with ``--alone STEPS``: a fresh D of the same config (full resolution, no growing, an auxiliary classifier),
  trained on the grade's cross-entropy alone (no GAN) for STEPS steps of 16 images on the probes' training part,
  D's optimiser settings; its ``h`` probed and its classifier scored on the held-out quarter. It tells whether
  this D can learn the grade from these images at all.

Not a test: it prints figures. The probe is deterministic (fixed split, lbfgs).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinagen.data.dataset import ZipImageDataset
from retinagen.data.preprocess import to_model_range
from retinagen.generation import load_model
from retinagen.run_dir import RunDir


def model_range(imgs: np.ndarray) -> torch.Tensor:
    """uint8 images [N, R, R, 3] as D's input [N, 3, R, R] in [-1, 1] (the training data's conversion)."""
    return torch.stack([to_model_range(img) for img in imgs])


def trunk_features(d: torch.nn.Module, x: torch.Tensor, batch_size: int = 100) -> dict[str, np.ndarray]:
    """D's pooled features of images ``x`` (`model_range`): {name: [N, C]}, plus "h" and, with an auxiliary
    classifier, "classifier" (its softmax)."""
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            h, pooled = d._trunk(x[start : start + batch_size])
            pooled["h"] = h
            if d.class_head is not None:
                pooled["classifier"] = torch.softmax(d.class_head(h).float(), dim=1)
            for key, value in pooled.items():
                out.setdefault(key, []).append(value.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _ce(p: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-9, 1.0)).mean())


def probe(features: np.ndarray, labels: np.ndarray, num_classes: int, c: float = 0.1) -> dict[str, float]:
    """Logistic regression on standardised features, fitted on every image but each 4th and scored on each
    4th: its cross-entropy against the training prior's (an unweighted fit) and its balanced accuracy (a fit
    with balanced class weights, so that a rare grade counts)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=np.int64)
    test = np.arange(len(labels)) % 4 == 0
    train = ~test
    scaler = StandardScaler().fit(features[train])
    x_train, x_test = scaler.transform(features[train]), scaler.transform(features[test])
    out: dict[str, float] = {}
    for weights in (None, "balanced"):
        clf = LogisticRegression(max_iter=3000, C=c, class_weight=weights).fit(x_train, labels[train])
        p = np.zeros((int(test.sum()), num_classes))
        p[:, clf.classes_] = clf.predict_proba(x_test)
        if weights is None:
            out["ce"] = _ce(p, labels[test])
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")  # a small set's rare grades
                out["balanced_accuracy"] = float(balanced_accuracy_score(labels[test], p.argmax(1)))
    prior = np.bincount(labels[train], minlength=num_classes) / train.sum()
    out["prior_ce"] = _ce(np.tile(prior, (int(test.sum()), 1)), labels[test])
    return out


def train_alone(model: Any, x: torch.Tensor, labels: np.ndarray, steps: int, seed: int = 0) -> torch.nn.Module:
    """A fresh D of ``model``'s config trained on the grade cross-entropy alone (see the module docstring)."""
    from retinagen.networks.build import build_d

    cfg = model.cfg.model_copy(update={"model": model.cfg.model.model_copy(update={"grow_from": None,
                                                                                    "aux_classifier": True})})
    torch.manual_seed(seed)
    net = build_d(cfg)
    o = cfg.optim
    opt = torch.optim.Adam(net.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), eps=o.eps)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    train = np.flatnonzero(np.arange(len(labels)) % 4 != 0)  # the probes' training part
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(train, size=16))
        loss = torch.nn.functional.cross_entropy(net(x[idx]).class_logits.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def _data_zip(checkpoint: Path, model: Any, data: Path | None) -> Path:
    """--data, else the run's data.path, else the built-in data prepared in the run folder's data/."""
    if data is not None:
        return data
    if model.cfg.data.path:
        return Path(model.cfg.data.path)
    run = RunDir.of_checkpoint(checkpoint)
    found = sorted(run.data.glob("*.zip")) if run is not None else []
    if not found:
        raise SystemExit(f"error: {checkpoint}: no training ZIP in its run folder's data/; pass --data")
    return found[0]


def report(checkpoint: Path, data: Path | None, max_images: int, judge: bool = True, alone: int = 0) -> str:
    model = load_model(checkpoint)
    if model.num_classes == 0:
        return f"{checkpoint}: not a grade-conditional model"
    ds = ZipImageDataset(_data_zip(checkpoint, model, data), split="train")
    idx = np.linspace(0, len(ds) - 1, min(len(ds), max_images)).round().astype(int)
    imgs = np.stack([np.asarray(ds.read_uint8(int(i))) for i in idx])
    labels = np.asarray(ds.labels)[idx]
    k = model.num_classes
    lines = [f"{checkpoint} (kimg {model.meta.get('kimg')}): {len(idx)} training images, grades "
             f"{np.bincount(labels, minlength=k).tolist()}", "", "| features | dims | CE | prior CE | balanced acc. |",
             "|---|---|---|---|---|"]
    x = model_range(imgs)
    feats = trunk_features(model.D, x)
    classifier = feats.pop("classifier", None)
    feats["pixels"] = imgs.reshape(len(imgs), -1).astype(np.float32)
    if judge:
        from retinagen.metrics.judges import JudgeSpec, get_judges

        feats["judge encoder"] = get_judges(JudgeSpec(resolution=model.resolution)).features(imgs)
    alone_classifier = None
    if alone > 0:
        lone_feats = trunk_features(train_alone(model, x, labels, alone), x)
        feats[f"h of D trained alone ({alone} steps)"] = lone_feats["h"]
        alone_classifier = lone_feats["classifier"]
    for name, f in feats.items():
        r = probe(f, labels, k, c=0.01 if name == "pixels" else 0.1)
        lines.append(f"| {name} | {f.shape[1]} | {r['ce']:.3f} | {r['prior_ce']:.3f} | {r['balanced_accuracy']:.3f} |")
    if classifier is not None:
        ce = _ce(classifier, labels)
        m = np.zeros((k, k), dtype=int)
        np.add.at(m, (labels, classifier.argmax(1)), 1)
        lines += ["", f"D's grade classifier on all {len(labels)} images: CE {ce:.3f}; confusion (rows: grade, "
                  "columns: D's argmax):"] + [f"    {g}: {m[g].tolist()}" for g in range(k)]
    if alone_classifier is not None:
        from sklearn.metrics import balanced_accuracy_score

        held = np.arange(len(labels)) % 4 == 0
        acc = balanced_accuracy_score(labels[held], alone_classifier[held].argmax(1))
        lines += ["", f"The classifier of D trained alone, on the held-out quarter: CE {_ce(alone_classifier[held], labels[held]):.3f}, "
                  f"balanced accuracy {acc:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="training ZIP (default: the run folder's data/*.zip)")
    ap.add_argument("--max-images", type=int, default=2000)
    ap.add_argument("--no-judge", action="store_true", help="leave out the judges' encoder row")
    ap.add_argument("--alone", type=int, default=0, metavar="STEPS",
                    help="also train a fresh D on the grade alone for STEPS steps and probe it")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for ck in args.checkpoints:
        print(report(ck, args.data, args.max_images, judge=not args.no_judge, alone=args.alone), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
