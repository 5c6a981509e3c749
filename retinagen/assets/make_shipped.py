"""Build the shipped model folder from a finished run: ``python -m retinagen.assets.make_shipped --run RUN``.

What goes in (everything data only; RECIPE.md records its size):
    checkpoints/<name>.safetensors + .json        G_ema and D (with Q) of the run's newest checkpoint (or
                                                  its best snapshot, or a named one: ``--checkpoint``); the
                                                  training-only tensors (G, optimizer moments, RNG) are
                                                  dropped, so it generates and scores but cannot resume
    config.json, metrics.jsonl                    the run's resolved config and training log
    samples/                                      the newest fixed-seed sample grid and the reals grid
    data/<name>.zip                               the run's prepared synthetic training data
    factors.json                                  `retinagen discover` on the shipped checkpoint
    anomaly/scorer.safetensors + .json            `retinagen anomaly fit` (Mahalanobis) on that data
    RECIPE.md                                     the commands, the run's time and the sizes

The run must be an InfoStyleGAN trained on the built-in synthetic data (that is what the README
documents); the discovery and the scorer are recomputed here, so they always match the shipped tensors.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from retinagen.artifact import is_complete
from retinagen.config import load_run_config
from retinagen.errors import RetinagenError
from retinagen.fileio import atomic_write_text
from retinagen.run_dir import RunDir
from retinagen.training.checkpoint import (
    checkpoint_stem,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from retinagen.training.snapshots import BEST_PREFIX

KEEP_PREFIXES = ("G_ema.", "D.")
TRAINING_ONLY_META = ("opt_G", "opt_D", "param_groups")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def pick_checkpoint(src: RunDir, which: str = "latest") -> Path:
    """The checkpoint of run ``src`` to ship: "latest" (the newest complete one), "best" (the snapshot kept
    as the run's lowest fd_fundus) or a checkpoint's name (``ckpt-002500``) in its checkpoints folder."""
    if which == "latest":
        found = latest_valid_checkpoint(src.checkpoints)
    elif which == "best":
        found = next((p for p in sorted(src.checkpoints.glob(f"{BEST_PREFIX}*.json"), reverse=True)
                      if is_complete(p)), None)
    else:
        name = Path(which).name.removesuffix(".json").removesuffix(".safetensors")
        candidate = src.checkpoints / f"{name}.json"
        found = candidate if candidate.is_file() and is_complete(candidate) else None
    if found is None:
        what = {"latest": "no complete checkpoint", "best": "no complete best snapshot (best-*)"}
        raise RetinagenError(f"{src.root}: {what.get(which, f'no complete checkpoint named {which!r}')}")
    return found


def train_command(config: dict[str, Any], run_name: str) -> str:
    """The `retinagen train` command that gives a run ``config`` (its resolved config.json): the cpu preset
    on the built-in data, plus one ``--set`` per setting that differs from it."""
    base = load_run_config("synthfundus", preset="cpu").model_dump(mode="json")
    flags: list[str] = []

    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> None:
        for key in sorted(a):
            dotted, value = prefix + key, a[key]
            if isinstance(value, dict) and isinstance(b.get(key), dict):
                walk(value, b[key], dotted + ".")
            elif (key not in b or value != b[key]) and dotted not in ("data.path", "train.kimg", "train.max_minutes"):
                text = (json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict)
                        else yaml.safe_dump(value).strip().removesuffix("...").strip())
                flags.append(f"--set {shlex.quote(f'{dotted}={text}')}")

    walk(config, base, "")
    train = config.get("train", {})
    minutes = train.get("max_minutes")
    return " ".join([
        "retinagen train --dataset synthfundus --preset cpu", f"--kimg {train.get('kimg'):g}",
        "--minutes " + ("null" if minutes is None else f"{minutes:g}"), *flags, f"--out runs/{run_name}",
    ])


def make_shipped(run: Path, out: Path, *, discover_n: int = 48, checkpoint: str = "latest") -> Path:
    """Write the shipped folder ``out`` from ``run`` (replaced whole, via a sibling temporary folder);
    ``checkpoint``: which of the run's checkpoints (`pick_checkpoint`)."""
    from clinical.anomaly import fit_scorer
    from retinagen.generation import load_model
    from retinagen.metrics.discovery import discover_factors, format_table, save_factor_map

    src, run = RunDir(run), Path(run)
    ck_json = pick_checkpoint(src, checkpoint)
    zips = sorted(src.data.glob("*.zip"))
    if len(zips) != 1:
        raise RetinagenError(f"{run}/data: expected the one prepared ZIP of the built-in data, found {len(zips)}")
    ck = load_checkpoint(ck_json)
    if ck.meta.get("config", {}).get("data", {}).get("dataset") != "synthfundus":
        raise RetinagenError(f"{run}: the shipped model must be trained on the built-in synthetic data")

    tmp = out.parent / f".{out.name}.building"
    dst = RunDir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    dst.checkpoints.mkdir(parents=True)
    tensors = {k: v for k, v in ck.tensors.items() if k.startswith(KEEP_PREFIXES)}
    meta = {k: v for k, v in ck.meta.items() if k not in TRAINING_ONLY_META and k not in
            ("schema_version", "tensors_file", "tensors_sha256", "created", "torch_version")}
    meta["inference_only"] = True
    meta["source_checkpoint_sha256"] = ck.meta.get("tensors_sha256")
    # Named ckpt-<step> whichever checkpoint it came from (a best-<step> snapshot too): the loaders look for those.
    name = checkpoint_stem(ck.meta["step"])
    save_checkpoint(dst.checkpoints / name, tensors, meta)

    _copy(src.config, dst.config)
    _copy(src.metrics, dst.metrics)
    fakes = sorted(src.samples.glob("fakes-*.png"))
    for p in [*fakes[-1:], src.samples / "reals.png"]:
        if p.is_file():
            _copy(p, dst.samples / p.name)
    _copy(zips[0], dst.data / zips[0].name)
    report = zips[0].with_suffix(".report.json")
    if report.is_file():
        _copy(report, dst.data / report.name)

    t0 = time.perf_counter()
    model = load_model(tmp, with_discriminator=True)
    result = discover_factors(model, n=discover_n, seed=0, progress=True)
    save_factor_map(result, dst.factors)
    t_discover = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = fit_scorer(model, dst.data / zips[0].name)
    json_path = scorer.save(tmp / "anomaly" / "scorer")
    # Record the checkpoint relative to the scorer, so the folder works wherever it is installed.
    sj = json.loads(json_path.read_text(encoding="utf-8"))
    sj["checkpoint_path"] = f"../checkpoints/{name}.safetensors"
    atomic_write_text(json_path, json.dumps(sj, indent=2) + "\n")
    t_scorer = time.perf_counter() - t0

    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    cfg = ck.meta["config"]
    quality = ck.meta.get("quality") or {}
    judged = (f"; scored during training: fd_fundus {quality['fd_fundus']:.1f} (judges {quality.get('judge')})"
              if isinstance(quality.get("fd_fundus"), int | float) else "")
    recipe = f"""# The shipped model

Built {time.strftime('%Y-%m-%d', time.gmtime())} by
`python -m retinagen.assets.make_shipped --run {run.name} --checkpoint {checkpoint}` from the run made with:

```bash
{train_command(json.loads(src.config.read_text(encoding="utf-8")), run.name)}
```

- Model: {ck.meta.get('msi')} at {cfg['model']['resolution']} px, checkpoint {Path(ck_json).stem} (step
  {ck.meta.get('step')}, {ck.meta.get('kimg'):g} kimg){judged}; G_ema and D (with Q) only (training state dropped).
- Factor map: `retinagen discover --n {discover_n}` on the shipped checkpoint ({t_discover:.0f} s).
- Anomaly scorer: Mahalanobis (Ledoit-Wolf) on the grade-0 training images ({t_scorer:.0f} s).
- Size: {size / 2**20:.1f} MiB in all.

Assigned factors:

```
{format_table(result, top=None, assigned_only=True)}
```
"""
    atomic_write_text(tmp / "RECIPE.md", recipe)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from retinagen.assets import __file__ as assets_init

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="finished run folder (synthfundus, cpu preset)")
    ap.add_argument("--out", type=Path, default=Path(assets_init).parent / "shipped")
    ap.add_argument("--discover-n", type=int, default=48)
    ap.add_argument("--checkpoint", default="latest",
                    help="latest (default), best (the run's lowest-fd_fundus snapshot) or a checkpoint's name")
    args = ap.parse_args(argv)
    try:
        out = make_shipped(args.run, args.out, discover_n=args.discover_n, checkpoint=args.checkpoint)
    except RetinagenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
