"""REPORT.md from an evaluation report, reading reports back, and comparing several side by side.

`render_markdown` turns what `retinagen.metrics.evaluate.evaluate_checkpoint` measured into Markdown;
`load_report` reads a REPORT.json (refusing one that is not an evaluation report); `compare_reports` renders
several as one table (e.g. InfoStyleGAN MSI(1,1,0) against InfoGAN MSI(0,1,0)), with notes when fd_fundus
values come from different encoders or the reports used different data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinagen.errors import BadInputError
from retinagen.fileio import read_json

REPORT_SCHEMA = "retinagen.evaluation/1"


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


# ============================================================================================ Markdown
def _quality_cell(sec: Mapping[str, Any] | None) -> str:
    if not sec:
        return "not run"
    if sec.get("status") != "ok":
        return "skipped¹" if "FID/KID" in str(sec.get("reason", "")) else "skipped"
    return _fmt(sec["mean"], sec["std"], 4)


def render_markdown(report: Mapping[str, Any]) -> str:
    """REPORT.md for a report from `evaluate_checkpoint` (image links relative to the report's folder)."""
    m = report["model"]
    d = report["data"]
    lines = [
        f"# Evaluation: {m['msi']}",
        "",
        f"- checkpoint: `{Path(m['checkpoint']).name}` (sha256 `{m['checkpoint_sha256'][:16]}…`, step {m['step']}, "
        f"{m['kimg']} kimg, {m['resolution']} px, trained on {m['dataset']})",
        f"- data: `{Path(d['path']).name}` ({d['n_images']} images, {d['resolution']} px"
        f"{', synthetic with ground-truth factors' if d['synthetic'] else ''})",
        f"- created {report['created']} by retinagen {report['retinagen_version']}; evaluation took "
        f"{report['total_seconds']:.1f} s",
        "",
    ]
    for part in (_md_quality, _md_mig, _md_acm, _md_linfo, _md_traversals, _md_timings):
        lines += part(report)
    return "\n".join(lines)


def _md_quality(report: Mapping[str, Any]) -> list[str]:
    """Table 1: FID, KID and fd_fundus, and which encoder fd_fundus used."""
    s, sec, name = report["settings"], report["metrics"], report["model"]["msi"]
    fdf = sec.get("fd_fundus")
    lines = [
        "## Image quality (Table 1 style)",
        "",
        f"Mean ± std over {s['repeats']} estimates of {s['n_samples']} generated images each (seeds "
        f"{s['seed']}..{s['seed'] + s['repeats'] - 1}), against all real images. Lower is better.",
        "",
        "| Model | FID | KID | fd_fundus FD | fd_fundus KID |",
        "|---|---|---|---|---|",
        f"| {name} | {_quality_cell(sec.get('fid'))} | {_quality_cell(sec.get('kid'))} | "
        f"{_quality_cell(fdf['fd'] if fdf else None)} | {_quality_cell(fdf['kid'] if fdf else None)} |",
        "",
    ]
    for key in ("fid", "kid"):
        if key in sec and sec[key].get("status") != "ok":
            lines += [f"¹ {key.upper()} skipped: {sec[key]['reason']}", ""]
            break
    if fdf:
        e = fdf["encoder"]
        val = e.get("validation") or {}
        secs = e.get("train_seconds")
        trained = "" if secs is None else f" in {secs:.1f} s"
        val_txt = ", ".join(f"{k} {v:.3g}" for k, v in val.items() if isinstance(v, int | float))
        lines += [
            f"fd_fundus uses the project's fundus encoder `{Path(e['path']).name}` (sha256 "
            f"`{e['weights_sha256'][:16]}…`, {e['feature_dim']}-d features at {e['input_size']} px, objective "
            f"{', '.join(e.get('objective') or [])}; {e['source']}"
            f"{trained}"
            f"{'; held-out ' + val_txt if val_txt else ''}). Values are comparable only between reports that "
            "used the same encoder.",
            "",
        ]
    return lines


def _md_mig(report: Mapping[str, Any]) -> list[str]:
    """Table 2: MIG and max I, and the best code per attribute."""
    sec, name = report["metrics"], report["model"]["msi"]
    lines: list[str] = []
    mig = sec.get("mig")
    if mig is not None:
        lines += ["## Disentanglement: MIG and max I (Table 2 style)", ""]
        if mig["status"] != "ok":
            lines += [f"Skipped: {mig['reason']}", ""]
        else:
            lines += [
                f"Q run on {mig['n_images']} real images; attributes V_k: {', '.join(mig['attributes'])}. "
                f"Continuous factors are cut into {mig['factor_bins']} equal-count (quantile) bins, uniform codes "
                f"into {mig['uniform_bins']} bins of [-1, 1]. MI in nats; the normalised estimator uses the "
                "empirical marginal of Q instead of the prior entropy (see retinagen.metrics.mig).",
                "",
                "| Model | MIG | max I(V_k; C_i) | MIG (normalised) | max I (normalised) |",
                "|---|---|---|---|---|",
                f"| {name} | {mig['mig']:.4f} | {mig['max_mi']:.4g} | {mig['mig_normalized']:.4f} | "
                f"{mig['max_mi_normalized']:.4g} |",
                "",
                "| Attribute V_k | H(V_k) | best code | I(V_k; C_best) |",
                "|---|---|---|---|",
            ]
            codes = mig["codes"]
            for k, a in enumerate(mig["attributes"]):
                row = mig["mi_paper"][k]
                best = int(np.argmax(row))
                lines.append(
                    f"| {a} | {abs(mig['label_entropies'][k]):.3f} | {codes[best]} | {row[best]:.4g} |"
                )
            lines += ["", f"![mutual information between attributes and codes]({mig['plot']})", ""]
    return lines


def _md_acm(report: Mapping[str, Any]) -> list[str]:
    """Table 3: ACM per attribute with its 95 % margin."""
    acm = report["metrics"].get("acm")
    lines: list[str] = []
    if acm is not None:
        lines += ["## Attribute control: ACM (Table 3 style)", ""]
        if acm["status"] != "ok":
            lines += [f"Skipped: {acm['reason']}", ""]
        else:
            fm = acm.get("factor_map") or {}
            lines += [
                f"Factor map: `{fm.get('path')}` ({'discovered in this run' if fm.get('discovered_now') else 'given'}"
                f"{'; ' + fm['warning'] if fm.get('warning') else ''}). ACM over {acm['n']} latents (seed "
                f"{acm['seed']}, not the discovery's), {acm['steps']} values per uniform code; a sample counts when "
                f"its attribute moves monotonically in the majority direction by at least {acm['min_effect_sd']:g} "
                "standard deviations. Unassigned rows score the code that discovery ranked best for the attribute.",
                "",
                "| Attribute | Code | Assigned | ACM (%) | 95 % margin | direction | discovery score |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in acm["rows"]:
                score = (r.get("discovery") or {}).get("score")
                lines.append(
                    f"| {r['attribute']} | {r['code']} ({r['kind']}) | {'yes' if r['assigned'] else 'no'} | "
                    f"{r['percent']:.1f} | {r['margin95']:.1f} | {r['direction']:+d} | "
                    f"{'n/a' if score is None else f'{score:.3g}'} |"
                )
            for ns in acm.get("not_scored", []):
                lines.append(f"| {ns['attribute']} | – | – | not scored: {ns['reason']} | | | |")
            lines += ["", f"![ACM per attribute]({acm['plot']})", ""]
    return lines


def _md_linfo(report: Mapping[str, Any]) -> list[str]:
    """Figure 10: L_info of the discrete codes against its bound H(C)."""
    lin = report.get("linfo") or {}
    lines = ["## L_info against its bound H(C) (Figure 10 style)", ""]
    if lin.get("status") == "ok":
        frac = lin.get("tail_fraction_of_bound")
        lines += [
            f"{lin['n_points']} logged steps up to this checkpoint ({lin['kimg_last']:g} kimg"
            f"{'; later log lines left out' if lin.get('later_points_left_out') else ''}); last L_info of the discrete codes "
            f"{lin['L_info_discrete_last']:.3f} nats (mean of the last 10 %: {lin['L_info_discrete_tail_mean']:.3f}"
            f"{'' if frac is None else f', {100 * frac:.1f} % of the bound'}), bound H(C) = {lin['H_discrete']:.3f} nats.",
            "",
            f"![L_info and H(C) during training]({lin['file']})",
            "",
        ]
    else:
        lines += [f"Skipped: {lin.get('reason', 'not run')}", ""]
    return lines


def _md_traversals(report: Mapping[str, Any]) -> list[str]:
    tr = report.get("traversals") or {}
    lines = ["## Traversals of the top factors", ""]
    if tr.get("status") == "ok":
        lines += [
            "Rows: the code's values (top to bottom); columns: 8 latents with the other codes and noise fixed.",
            "",
        ]
        for g in tr["grids"]:
            label = g.get("attribute") or (
                f"best: {g['best']}, unassigned" if g.get("best") else "no attribute"
            )
            extra = ""
            if g.get("effect") is not None:
                extra = f" (effect {g['effect']:+.2f} sd, consistency {g['consistency']:.2f})"
            lines += [
                f"### {g['code']} ({g['kind']}) → {label}{extra}",
                "",
                f"![traversal of {g['code']}]({g['file']})",
                "",
            ]
    else:
        lines += [f"Skipped: {tr.get('reason', 'not run')}", ""]
    return lines


def _md_timings(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Run time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("timings_s", {}).items()]
    return lines + [f"| total | {report['total_seconds']:.1f} |", ""]


# ============================================================================================ comparing
def load_report(path: str | Path) -> dict[str, Any]:
    """Read a REPORT.json written by `evaluate_checkpoint` (schema checked)."""
    p = Path(path)
    data = read_json(p, "report")
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise BadInputError(p, f"not a retinagen evaluation report (schema must be {REPORT_SCHEMA!r})")
    missing = _missing_report_keys(data)
    if missing:
        raise BadInputError(p, f"incomplete evaluation report: no {', '.join(missing)}")
    return data


# The keys `compare_reports` and the CLI summary read: always, and in a metric section whose status is "ok".
_REPORT_KEYS = (("model", "msi"), ("model", "checkpoint_sha256"), ("model", "step"), ("data", "fingerprint"),
                ("metrics",))
_OK_SECTION_KEYS = {
    "fid": (("mean",), ("std",)),
    "kid": (("mean",), ("std",)),
    "mig": (("mig",), ("max_mi",)),
    "acm": (("rows",),),
    "fd_fundus": (("fd", "mean"), ("fd", "std"), ("encoder", "weights_sha256")),
}
_ACM_ROW_KEYS = ("attribute", "code", "percent", "margin95", "assigned")


def _missing_report_keys(data: Mapping[str, Any]) -> list[str]:
    """Dotted names of the keys a report lacks (``model.step``, ``metrics.mig.max_mi``); empty when complete."""

    def lacks(node: Any, keys: Sequence[str]) -> bool:
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                return True
            node = node[k]
        return False

    missing = [".".join(keys) for keys in _REPORT_KEYS if lacks(data, keys)]
    metrics = data.get("metrics")
    if not isinstance(metrics, Mapping):
        return missing
    for name, required in _OK_SECTION_KEYS.items():
        sec = metrics.get(name)
        if isinstance(sec, Mapping) and sec.get("status") == "ok":
            missing += [".".join(("metrics", name, *keys)) for keys in required if lacks(sec, keys)]
    acm = metrics.get("acm")
    if isinstance(acm, Mapping) and acm.get("status") == "ok" and isinstance(acm.get("rows"), list):
        for i, row in enumerate(acm["rows"]):
            missing += [f"metrics.acm.rows[{i}].{k}" for k in _ACM_ROW_KEYS if not isinstance(row, Mapping) or k not in row]
    return missing


def _best_acm(acm: Mapping[str, Any] | None) -> str:
    if not acm or acm.get("status") != "ok" or not acm.get("rows"):
        return "n/a"
    rows = sorted(acm["rows"], key=lambda r: (not r["assigned"], -r["percent"]))
    r = rows[0]
    return f"{r['percent']:.1f} ± {r['margin95']:.1f} % ({r['attribute']}, {r['code']}{'' if r['assigned'] else '*'})"


def compare_reports(reports: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table comparing models side by side, one row per report from `evaluate_checkpoint`.

    Columns: model (MSI name), checkpoint, FID, fd_fundus FD (mean ± std), MIG, max I, best ACM (the highest ACM
    among attributes discovery assigned; ``*`` marks an unassigned best code when none was assigned). Notes
    below the table flag fd_fundus values from different encoders or data, which are not comparable.
    """
    if not reports:
        raise ValueError("compare_reports needs at least one report")
    for i, r in enumerate(reports):
        if not isinstance(r, Mapping) or r.get("schema") != REPORT_SCHEMA:
            raise ValueError(f"report {i} is not a retinagen evaluation report (schema {REPORT_SCHEMA!r})")
    lines = [
        "| Model | Checkpoint | FID ↓ | fd_fundus ↓ | MIG ↑ | max I ↑ (nats) | best ACM ↑ |",
        "|---|---|---|---|---|---|---|",
    ]
    encoders: set[str] = set()
    datasets: set[str] = set()
    for r in reports:
        sec = r["metrics"]
        fdf = sec.get("fd_fundus")
        if fdf and fdf.get("status") == "ok":
            encoders.add(fdf["encoder"]["weights_sha256"])
        datasets.add(r["data"]["fingerprint"])
        mig = sec.get("mig")
        ok = mig is not None and mig.get("status") == "ok"
        mig_cell = f"{mig['mig']:.4f}" if ok else "n/a"  # type: ignore[index]
        max_i_cell = f"{mig['max_mi']:.4g}" if ok else "n/a"  # type: ignore[index]
        lines.append(
            f"| {r['model']['msi']} | `{r['model']['checkpoint_sha256'][:10]}` (step {r['model']['step']}) | "
            f"{_quality_cell(sec.get('fid'))} | {_quality_cell(fdf['fd'] if fdf else None)} | "
            f"{mig_cell} | {max_i_cell} | {_best_acm(sec.get('acm'))} |"
        )
    notes = []
    if any(_quality_cell(r["metrics"].get("fid")) == "skipped¹" for r in reports):
        notes.append("¹ FID skipped: no Inception-v3 weights file was available (see each REPORT.md).")
    if len(encoders) > 1:
        notes.append("fd_fundus values come from different encoders and are not comparable.")
    if len(datasets) > 1:
        notes.append("The reports were computed against different datasets.")
    if any("*" in _best_acm(r["metrics"].get("acm")) for r in reports):
        notes.append("* no attribute was assigned by discovery; the best-scoring code is shown.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
