"""Every option of every command, given a bad value: exit 2, one `error:` line naming it, no traceback, no work.

The table is built from the app: each command of the typer app (groups included) and each of its parameters
with the *kind* `retinagen.options` declares for it. Every kind has a row of bad values below, or an entry in
`NO_BAD_VALUE` saying why none exists; a parameter whose kind has neither fails the test, so a new flag is
covered or the test says it is not. The other required parameters get valid values (a real smoke run, its
dataset, factor map, anomaly scorer and evaluation report), so the error can only come from the value tried,
and the command body is replaced by a recorder: a bad value that reaches it fails the test.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

import retinagen.options as options
from retinagen.cli import app, main
from retinagen.options import kinds_of

# -------------------------------------------------------------------------------------------- the app


def walk_commands(t: typer.Typer = app, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(command path, registered callback) for every command of the app, sub-apps included."""
    for info in t.registered_commands:
        yield (*prefix, info.name or info.callback.__name__.replace("_", "-")), info.callback
    for group in t.registered_groups:
        yield from walk_commands(group.typer_instance, (*prefix, group.name))


def click_command(path: tuple[str, ...]) -> Any:
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid inputs of every kind a required parameter has, and damaged files to try."""
    from tests.retinagen.test_dashboard_api import build_dashboard_run

    base = tmp_path_factory.mktemp("cli_bad")
    run = build_dashboard_run(synth_zip_16, base / "run")
    images = base / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    plain = base / "plain.txt"
    plain.write_text("just text\n")
    binary = base / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    empty_dir = base / "empty"
    empty_dir.mkdir()
    not_json = base / "bad.json"
    not_json.write_text("{not json")
    wrong_json = base / "wrong.json"
    wrong_json.write_text('{"schema": "something else"}')
    bad_yaml = base / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    list_yaml = base / "list.yaml"
    list_yaml.write_text("- a\n- b\n")
    ck = sorted((run / "checkpoints").glob("*.safetensors"))[-1]
    truncated = base / "trunc" / "ckpt-000001.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    (truncated.with_suffix(".json")).write_bytes(ck.with_suffix(".json").read_bytes())
    garbage_st = base / "garbage.safetensors"
    garbage_st.write_bytes(b"\xff" * 64)
    corrupt_zip = base / "corrupt.zip"
    _corrupt_member_zip(synth_zip_16, corrupt_zip)
    return {
        "run": run, "checkpoint": ck, "data": synth_zip_16, "images": images, "plain": plain, "binary": binary,
        "empty_dir": empty_dir, "not_json": not_json, "wrong_json": wrong_json, "bad_yaml": bad_yaml,
        "list_yaml": list_yaml, "truncated_ck": truncated, "garbage_st": garbage_st, "corrupt_zip": corrupt_zip,
        "report": run / "eval" / "REPORT.json", "factors": run / "factors.json",
        "scorer": run / "anomaly" / "scorer.json", "missing": base / "does-not-exist" / "x",
        "base": base,
    }


def _corrupt_member_zip(src: Path, out: Path) -> None:
    """A copy of a dataset ZIP whose compressed dataset.json has flipped bytes (a zlib error when read)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
    data = bytearray(out.read_bytes())
    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("dataset.json")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 2, start + min(info.compress_size, 40)):
        data[i] ^= 0x5A
    out.write_bytes(bytes(data))


# -------------------------------------------------------------------------------------------- the table

A = dict[str, Path]
Bad = Callable[[A], list[str]] | list[str]  # one value, or several for a repeatable option

_not_numbers = ["abc"]
BAD_VALUES: dict[str, list[Bad]] = {
    "count": [["0"], ["-3"], ["1.5"], _not_numbers],
    "count>=2": [["1"], ["0"], _not_numbers],
    "int>=0": [["-1"], _not_numbers],
    "seed": [["-1"], [str(2**63)], _not_numbers],
    "grade": [["-1"], ["1000"], _not_numbers],
    "port": [["0"], ["65536"], _not_numbers],
    "synth-resolution": [["8"], ["4096"], _not_numbers],
    "prepared-resolution": [["100"], ["4096"], ["4"], _not_numbers],
    "probability": [["0"], ["1"], ["nan"], ["-0.5"], _not_numbers],
    "unit-interval": [["-0.1"], ["1.5"], ["nan"]],
    "float>0": [["0"], ["-1"], ["inf"], ["nan"], _not_numbers],
    "float>=0": [["-1"], ["nan"]],
    "float>=1": [["0.5"], ["nan"]],
    "file": [lambda a: [str(a["missing"])], lambda a: [str(a["empty_dir"])]],
    "folder": [lambda a: [str(a["missing"])], lambda a: [str(a["plain"])]],
    "file-or-folder": [lambda a: [str(a["missing"])]],
    "output-file": [lambda a: [str(a["plain"] / "under-a-file.out")], lambda a: [str(a["empty_dir"])]],
    "output-folder": [lambda a: [str(a["plain"] / "under-a-file")], lambda a: [str(a["plain"])]],
    "output-json": [lambda a: [str(a["base"] / "report.txt")], lambda a: [str(a["plain"] / "x.json")]],
    "checkpoint": [lambda a: [str(a["missing"])], lambda a: [str(a["truncated_ck"])],
                   lambda a: [str(a["garbage_st"])], lambda a: [str(a["empty_dir"])]],
    "safetensors": [lambda a: [str(a["missing"])], lambda a: [str(a["garbage_st"])],
                    lambda a: [str(a["truncated_ck"])]],
    "dataset-zip": [lambda a: [str(a["missing"])], lambda a: [str(a["plain"])], lambda a: [str(a["corrupt_zip"])]],
    "dataset": [lambda a: [str(a["missing"])], lambda a: [str(a["binary"])], lambda a: [str(a["corrupt_zip"])]],
    "config-yaml": [lambda a: [str(a["missing"])], lambda a: [str(a["binary"])], lambda a: [str(a["bad_yaml"])],
                    lambda a: [str(a["list_yaml"])]],
    "report-json": [lambda a: [str(a["missing"])], lambda a: [str(a["not_json"])], lambda a: [str(a["wrong_json"])]],
    "factor-map": [lambda a: [str(a["missing"])], lambda a: [str(a["not_json"])], lambda a: [str(a["wrong_json"])]],
    "scorer": [lambda a: [str(a["missing"])], lambda a: [str(a["not_json"])], lambda a: [str(a["garbage_st"])]],
    "grader": [lambda a: [str(a["missing"])], lambda a: [str(a["not_json"])], lambda a: [str(a["garbage_st"])]],
    "run-folder": [lambda a: [str(a["missing"])], lambda a: [str(a["plain"])], lambda a: [str(a["empty_dir"])]],
    "device": [["bogus"], ["cuda"], ["cuda:99"], ["cpu:x"]],
    "grade-probs": [["a,b"], ["-1,2"], ["0,0"]],
    "metric-list": [["bogus"], ["fid,bogus"]],
    "scorer-list": [["bogus"]],
    "attribute-list": [["bogus"]],
    "grades-or-all": [["x"], ["-1"], ["1,,2"], ["1,"], [","]],
    "rebalance-target": [["bogus"], ["ratio:x"]],
    "assignment": [["novalue"], ["=1"]],
    "config-overrides": [["noequals"], ["train.nosuchkey=1"], ["model.a.b=1", "model.a.b.c=2"], ["train.kimg=1", "train.kimg=2"]],
    "choice": [["bogus"]],
}
NO_BAD_VALUE = {
    "switch": "an on/off flag takes no value",
    "text": "free text checked where it is used (a host name; a code name, once the model is loaded)",
}


def valid_value(kind: str, name: str, param: Any, a: A) -> list[str]:
    """A value that passes the up-front checks, for the parameters not under test."""
    if kind == "choice":  # the first member of the option's Enum
        return [next(iter(param.type_descriptor.annotation)).value]
    table: dict[str, Callable[[], list[str]]] = {
        "output-folder": lambda: [str(a["base"] / "new-folder")],
        "output-file": lambda: [str(a["base"] / "new-file.png")],
        "output-json": lambda: [str(a["base"] / "new-report.json")],
        "folder": lambda: [str(a["images"])],
        "file-or-folder": lambda: [str(a["images"])],
        "prepared-resolution": lambda: ["16"],
        "checkpoint": lambda: [str(a["run"])],
        "count": lambda: ["2"],
        "text": lambda: ["c0"],
        "report-json": lambda: [str(a["report"])],
        "dataset-zip": lambda: [str(a["data"])],
        "rebalance-target": lambda: ["uniform"],
        "scorer": lambda: [str(a["scorer"])],
    }
    return table[kind]()


def _argv(path: tuple[str, ...], cmd: Any, values: dict[str, list[str]]) -> list[str]:
    argv, positional = list(path), []
    for p in cmd.params:
        if p.name not in values:
            continue
        if p.param_type_name == "argument":
            positional += values[p.name]
        else:
            flag = next(o for o in p.opts if o.startswith("--"))
            for v in values[p.name]:
                argv += [flag, v]
    return argv + positional


def _cases(a: A) -> Iterator[tuple[tuple[str, ...], Any, str, str, list[str], dict[str, list[str]]]]:
    """(command path, click command, parameter, its flag, bad value(s), the valid required values)."""
    unclassified = []
    for path, callback in walk_commands():
        kinds = kinds_of(callback)
        flags = callback.__retinagen_flags__
        cmd = click_command(path)
        by_name = {p.name: p for p in cmd.params}
        for name, kind in kinds.items():
            if kind is None or (kind.name not in BAD_VALUES and kind.name not in NO_BAD_VALUE):
                unclassified.append(f"{' '.join(path)} {flags[name]} (kind {kind.name if kind else None})")
        if unclassified:
            continue
        required = {n: valid_value(k.name, n, by_name[n], a) for n, k in kinds.items() if by_name[n].required}
        yield path, cmd, "", "", [], required  # the baseline: valid required values reach the body
        for name, kind in kinds.items():
            for bad in BAD_VALUES.get(kind.name, []):
                value = bad(a) if callable(bad) else bad
                yield path, cmd, name, flags[name], value, {**required, name: value}
    assert not unclassified, "parameters without a bad-value row or a NO_BAD_VALUE reason: " + "; ".join(unclassified)


def test_every_command_refuses_every_bad_value_up_front(
    assets: A, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(options, "run_body", lambda fn, kwargs: ran.append(fn.__name__))
    failures, walked, commands = [], 0, set()
    for path, cmd, name, flag, value, values in _cases(assets):
        commands.add(path)
        ran.clear()
        capsys.readouterr()
        code = main(_argv(path, cmd, values))
        out, err = capsys.readouterr()
        where = f"{' '.join(path)} {flag} {' '.join(value)}".strip()
        if not name:  # the baseline
            if code != 0 or len(ran) != 1:
                failures.append(f"{where}: valid values did not reach the body (exit {code}): {err.strip()[:300]}")
            continue
        walked += 1
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if ran:
            problems.append("the command body ran")
        if "Traceback" in out + err:
            problems.append("traceback")
        if len(lines) != 1:
            problems.append(f"{len(lines)} error lines")
        elif flag not in lines[0] and not any(v in lines[0] for v in value) and name.replace("_", "-") not in lines[0]:
            problems.append(f"the error names neither {flag} nor the value: {lines[0]!r}")
        if problems:
            failures.append(f"{where}: {', '.join(problems)}; stderr: {err.strip()[:300]!r}")
    print(f"walked {walked} (command, option, bad value) cases over {len(commands)} commands")
    assert not failures, f"{len(failures)} of {walked} cases:\n" + "\n".join(failures)
    assert len(commands) == len(list(walk_commands())) >= 15 and walked >= 300, (len(commands), walked)


def test_a_parameter_without_a_row_fails_the_walk(assets: A, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard itself: drop one kind's row and the walk refuses to pass it silently."""
    monkeypatch.delitem(BAD_VALUES, "device")
    with pytest.raises(AssertionError, match=r"evaluate --device \(kind device\)"):
        list(_cases(assets))
