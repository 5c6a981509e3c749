"""A second grade judge of another architecture: is the grade fidelity the fixed judges report real?

    python benchmarks/second_judge.py runs/a/checkpoints/ckpt-001500.safetensors [more ...] [--n 1000]

`loss.grade_guide` trains G against a fundus encoder of the fixed judges' own architecture
(`retinagen.metrics.encoder`), so G could lower the guide's loss with patterns that fool any network of that
architecture instead of drawing lesions. This trains a DenseNet DR grader (`clinical.grader`'s cpu preset:
another architecture, trained with augmentation) on the judges' own training set (3,000 fundi with equal
grades, of the judges' seed, which no training data may use), prints its group accuracy on 1,000 held-out real
fundi (seed 4242), then for each checkpoint the group fidelity (share of images asked for a group whose p
summed over the group's grades is >= 0.5) by the fixed judges and by it, on the same generated images.
The grader is cached under the judges' folder (``second-<key>``). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clinical.grader import GradedImages, grader_config, load_grader, predict_proba, save_grader, train_grader
from retinagen.data.dataset import ZipImageDataset
from retinagen.dr_scale import GRADE_GROUPS, group_name
from retinagen.generation import load_model
from retinagen.metrics import judges as jm
from retinagen.metrics.quality import _generate

HELD_OUT_SEED = 4242


def second_grader(spec: jm.JudgeSpec, folder: Path, steps: int, seed: int = 0):
    """The DenseNet grader trained on the judges' training set (built once, then loaded from the cache)."""
    cfg = grader_config("cpu", resolution=spec.resolution, steps=steps, device="cpu")
    key = hashlib.sha256(json.dumps({"spec": spec.key(), "grader": cfg.to_json(), "seed": seed},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"second-{key}" / "grader.safetensors"
    if path.is_file():
        return load_grader(path), key
    with tempfile.TemporaryDirectory() as tmp:
        print(f"second judge {key}: rendering {spec.n_train} fundi and training {cfg.arch} for {steps} steps",
              file=sys.stderr)
        zip_path = jm.prepare_set(Path(tmp), "train", spec.n_train, spec.seed, spec.resolution, [0.2] * 5)
        ds = ZipImageDataset(zip_path)
        data = GradedImages.from_zip(ds, np.arange(len(ds)), spec.resolution)
        grader = train_grader(data, cfg, seed=seed, progress=False)
    save_grader(grader, path)
    return load_grader(path), key


def groups(proba: np.ndarray, asked: np.ndarray) -> list[float]:
    fid = jm.grade_fidelity(proba, asked)["group_fidelity"]
    return [fid.get(group_name(g), float("nan")) for g in GRADE_GROUPS]


def report(checkpoints: list[Path], spec: jm.JudgeSpec, judges_dir: Path | None, n: int = 1000,
           steps: int = 1000, held_out: int = 1000) -> str:
    """The Markdown table: held-out real fundi, then each grade-conditional checkpoint's generated images."""
    judges = jm.get_judges(spec, judges_dir)
    t0 = time.perf_counter()
    grader, key = second_grader(spec, judges_dir or jm.default_judges_dir(), steps)
    names = " / ".join(group_name(g) for g in GRADE_GROUPS)
    lines = [f"second judge {key} ({grader.arch}, ready in {time.perf_counter() - t0:.0f} s); "
             f"fixed judges {judges.judge_id}", "",
             f"| images | judges: groups {names} | second judge: groups {names} | same group |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        imgs, grades, _, _ = jm.held_out_real(spec, held_out, HELD_OUT_SEED, Path(tmp))
    rows = [("real held-out", imgs, grades)]
    for ck in checkpoints:
        fakes, asked = _generate(load_model(ck, with_discriminator=False), n, 0)
        if asked is None:
            print(f"{ck}: not grade-conditional, skipped", file=sys.stderr)
            continue
        rows.append((f"{ck.parent.parent.name}-{ck.stem.split('-')[-1]}", fakes, asked))
    group_of = np.array([next(i for i, g in enumerate(GRADE_GROUPS) if k in g) for k in range(grader.num_classes)])
    for label, images, asked in rows:
        p1, p2 = judges.grade_proba(images), predict_proba(grader, images)
        g1, g2 = (" / ".join(f"{v:.3f}" for v in groups(p, asked)) for p in (p1, p2))
        same = float((group_of[p1.argmax(1)] == group_of[p2.argmax(1)]).mean())
        lines.append(f"| {label} | {g1} | {g2} | {same:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=1000, help="generated images per checkpoint (equal per grade)")
    ap.add_argument("--steps", type=int, default=1000, help="the second grader's training steps")
    ap.add_argument("--resolution", type=int, default=32, help="the judges' resolution")
    ap.add_argument("--held-out", type=int, default=1000, help="held-out real fundi scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--judges-dir", type=Path, default=None,
                    help="where judges are cached (default: the shipped judges, then RETINAGEN_JUDGES_DIR)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(report(args.checkpoints, jm.JudgeSpec(resolution=args.resolution), args.judges_dir, args.n, args.steps,
                 args.held_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
