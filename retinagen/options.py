"""Command-line options: what each flag may hold, checked in one place before a command does any work.

Every parameter of every ``retinagen`` command is declared with a *kind* (numbers from `retinagen.checks`,
paths and names from this module), a pydantic ``Annotated`` type (``Count = Annotated[int, Field(ge=1), Kind("count")]``), inside the usual typer
annotation::

    n: Annotated[Count, typer.Option(help="Number of images.")] = 500

`ValidatingTyper` registers each command through `validated`, which builds one pydantic model of the
command's options from those annotations and validates every value the user gave *before* the command's
body runs: a count of 0, a probability of 1.5, a ``--device cuda`` on a machine without CUDA, a dataset
ZIP whose ``dataset.json`` is corrupt, a truncated checkpoint, a binary ``--config`` fail in milliseconds
with one ``error:`` line naming the flag (exit code 2), not after minutes of model loading or training.
Typer only sees the plain types (``int``, ``Path``), so it parses and the model validates; nothing is
checked twice.

Content checks stay cheap: headers, indexes and small JSON sidecars are read, never whole datasets or
tensors. Checks that need the model (a ``--grade`` above its classes, a ``--factor`` name) stay in the
commands, right after the model is loaded.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import os
import re
import struct
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, create_model

from retinagen.checks import (  # noqa: F401 - the kinds of numbers, re-exported for the commands
    Count,
    CountAtLeast2,
    Grade,
    Kind,
    Multiplier,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    Probability,
    Seed,
    UnitInterval,
    int_in,
)
from retinagen.errors import RetinagenError
from retinagen.run_dir import RunDir

__all__ = [
    "Kind",
    "ValidatingTyper",
    "kinds_of",
    "validated",
]


# --------------------------------------------------------------------------------------------------
# Content checks (each raises ValueError with the reason; pydantic reports it under the flag)


def _reason(exc: RetinagenError, path: Path) -> str:
    """A loader's message without its leading ``PATH:`` (the flag's line names the path already)."""
    text = str(exc)
    for prefix in (f"{path}: ", f"{path.resolve()}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _loaded(check: Callable[[Path], Any]) -> Callable[[Path], Path]:
    """Run a project loader as a check: its `RetinagenError` becomes the flag's error message."""

    @functools.wraps(check)
    def run(path: Path) -> Path:
        try:
            check(path)
        except RetinagenError as exc:
            raise ValueError(_reason(exc, path)) from None
        except OSError as exc:
            raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
        return path

    return run


def _readable_file(path: Path) -> Path:
    if not path.exists():
        raise ValueError("no such file")
    if path.is_dir():
        raise ValueError("is a folder, expected a file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    return path


def _readable_dir(path: Path) -> Path:
    if not path.exists():
        raise ValueError("no such folder")
    if not path.is_dir():
        raise ValueError("is a file, expected a folder")
    try:
        next(iter(os.scandir(path)), None)
    except OSError as exc:
        raise ValueError(f"cannot list it ({exc.strerror or exc})") from None
    return path


def _readable_path(path: Path) -> Path:
    return _readable_dir(path) if path.is_dir() else _readable_file(path)


def _writable_target(path: Path, *, want_dir: bool) -> Path:
    """``path`` can be created or replaced: not the wrong kind of thing, under a writable folder."""
    if path.exists():
        if want_dir and not path.is_dir():
            raise ValueError("is a file, expected a folder")
        if not want_dir and path.is_dir():
            raise ValueError("is a folder, expected a file path")
    parent = path if want_dir and path.is_dir() else path.parent
    # The nearest existing ancestor must be a folder we may write to (missing folders are created).
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{parent} is a file, so nothing can be written under it")
    # effective_ids: the user this process acts as (a setuid sandbox), where the platform can tell.
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if not os.access(parent, os.W_OK | os.X_OK, **effective):
        raise ValueError(f"cannot write in {parent}: permission denied")
    return path


def _output_file(path: Path) -> Path:
    return _writable_target(path, want_dir=False)


def _output_dir(path: Path) -> Path:
    return _writable_target(path, want_dir=True)


def _json_output(path: Path) -> Path:
    if path.suffix.lower() != ".json":
        raise ValueError("expected a .json report path, e.g. REPORT.json")
    return _output_file(path)


def _safetensors_file(path: Path) -> Path:
    """A complete safetensors file: the header parses and every tensor lies inside the file (no tensor read)."""
    from retinagen.artifact import check_safetensors_header
    from retinagen.errors import CheckpointError

    _readable_file(path)
    try:
        check_safetensors_header(path)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except CheckpointError as exc:
        raise ValueError(_reason(exc, path)) from None
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise ValueError("not a valid safetensors file (its header is corrupt)") from None
    if 8 + n + end > size:
        raise ValueError(f"truncated safetensors file ({size} bytes, its header needs {8 + n + end})")
    return path


def _checkpoint(path: Path) -> Path:
    """A model checkpoint (``.safetensors`` or ``.json``) or a run folder holding one."""
    from retinagen.artifact import read_artifact_meta
    from retinagen.generation import resolve_checkpoint
    from retinagen.training.checkpoint import SCHEMA_VERSION

    if not path.exists():
        raise ValueError("checkpoint or run folder not found")
    _readable_path(path)
    try:
        tensor_path = resolve_checkpoint(path)
    except RetinagenError as exc:
        raise ValueError(_reason(exc, path)) from None
    _safetensors_file(tensor_path)
    try:
        _, meta_path, meta = read_artifact_meta(tensor_path)
    except RetinagenError as exc:
        raise ValueError(_reason(exc, tensor_path)) from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{meta_path.name}: not a retinagen checkpoint of schema {SCHEMA_VERSION}")
    return path


def _dataset_zip(path: Path) -> Path:
    """A prepared dataset ZIP: its index and ``dataset.json`` read (CRC-checked), its first image's header."""
    from retinagen.data.dataset import ZipImageDataset

    if not path.exists():
        raise ValueError("dataset ZIP not found")
    _readable_file(path)
    _loaded(lambda p: ZipImageDataset(p).close())(path)
    return path


def _dataset(path: Path) -> Path:
    """``train --data``: a prepared ZIP, or a raw folder (built-in synthetic data are prepared on first use)."""
    return _readable_dir(path) if path.is_dir() else _dataset_zip(path)


def _config_yaml(path: Path) -> Path:
    from retinagen.config import read_yaml

    _readable_file(path)
    return _loaded(read_yaml)(path)


def _report_json(path: Path) -> Path:
    from retinagen.metrics.report import load_report

    _readable_file(path)
    return _loaded(load_report)(path)


def _factor_map(path: Path) -> Path:
    from retinagen.factor_map import load_factor_map

    _readable_file(path)
    return _loaded(load_factor_map)(path)


def _scorer(path: Path) -> Path:
    from clinical.anomaly import load_scorer

    return _loaded(load_scorer)(path)


def _grader(path: Path) -> Path:
    from clinical.grader import load_grader

    _readable_file(path)
    return _loaded(load_grader)(path)


def _run_folder(path: Path) -> Path:
    _readable_dir(path)
    if not RunDir(path).config.is_file():
        raise ValueError("not a run folder (no config.json)")
    return path


_DEVICE_RE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def _device(text: str) -> str:
    """cpu, cuda, cuda:N or mps, and only when this machine has it (checked before any model is built)."""
    text = text.strip()
    m = _DEVICE_RE.match(text)
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ValueError("expected cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return text
    import torch

    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("MPS is not available on this machine; use --device cpu")
        return text
    if not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine (no GPU or no CUDA build of torch); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ValueError(f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return text


def _grade_probs(text: str) -> str:
    from retinagen.data.synth_factors import check_grade_probs

    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError("must be comma-separated numbers") from None
    try:
        check_grade_probs(values)
    except RetinagenError as exc:
        raise ValueError(str(exc).replace("grade_probs ", "the grade probabilities ")) from None
    return text


def _name_list(known: Callable[[], tuple[str, ...]], what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        given = [m.strip() for m in text.split(",") if m.strip()]
        valid = known()
        unknown = [repr(m) for m in given if m.lower() not in valid]
        if unknown or not given:
            raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}")
        return text

    return check


def _known_metrics() -> tuple[str, ...]:
    from retinagen.metrics.registry import KNOWN_METRICS

    return tuple(KNOWN_METRICS)


def _known_scorers() -> tuple[str, ...]:
    from clinical.anomaly import SCORERS

    return tuple(sorted(SCORERS))


def _known_attributes() -> tuple[str, ...]:
    from retinagen.metrics.attributes import ATTRIBUTES, SYNONYMS

    return (*ATTRIBUTES, *SYNONYMS)


def parse_grades(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); an empty item (``"1,,2"``, ``"1,"``), a non-integer or a negative grade is an error."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise ValueError("expected non-negative grades, e.g. 0 or 0,1, or 'all'")
    if not all(items):
        raise ValueError(f"an empty item in {text!r} (two commas in a row, or one at an end)")
    try:
        grades = tuple(int(x) for x in items)
    except ValueError:
        raise ValueError("expected comma-separated integers or 'all'") from None
    if min(grades) < 0:
        raise ValueError("expected non-negative grades, e.g. 0 or 0,1, or 'all'")
    return grades


def _grades_or_all(text: str) -> str:
    if text.strip().lower() != "all":
        parse_grades(text)
    return text


def _rebalance_target(text: str) -> str:
    from clinical.rebalance import parse_target

    try:
        parse_target(text)
    except RetinagenError as exc:
        raise ValueError(str(exc).removeprefix("--target: ").removeprefix(f"--target {text.strip()!r}: ")) from None
    return text


def _assignment(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise ValueError("expected NAME=VALUE")
    return text


def _config_overrides(items: list[str]) -> list[str]:
    from retinagen.config import parse_overrides

    try:
        parsed = parse_overrides(items)
    except RetinagenError as exc:
        raise ValueError(str(exc)) from None
    _known_keys(parsed)
    return items


def _known_keys(tree: dict[str, Any]) -> None:
    """Every ``section.key`` of a ``--set`` names a config field (an unknown one fails before training starts)."""
    from pydantic import BaseModel

    from retinagen.config import RunConfig

    def walk(node: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
        for key, value in node.items():
            field = model.model_fields.get(key)
            if field is None:
                raise ValueError(f"unknown config key {prefix + key!r}")
            sub = field.annotation
            if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(value, sub, f"{prefix}{key}.")

    walk(tree, RunConfig, "")


def _power_of_two(n: int) -> int:
    if n & (n - 1):
        raise ValueError("must be a power of two")
    return n


# --------------------------------------------------------------------------------------------------
# The kinds


def _path(check: Callable[[Path], Path], name: str) -> Any:
    return Annotated[Path, AfterValidator(check), Kind(name)]


Port = int_in(1, 65535, name="port", expect="a port in [1, 65535]")
SynthResolution = int_in(16, 1024, name="synth-resolution")
PreparedResolution = Annotated[
    int, Field(ge=8, le=2048), AfterValidator(_power_of_two), Kind("prepared-resolution", "a power of two in [8, 2048]")
]

ReadableFile = _path(_readable_file, "file")
ReadableDir = _path(_readable_dir, "folder")
ReadablePath = _path(_readable_path, "file-or-folder")
OutputFile = _path(_output_file, "output-file")
OutputDir = _path(_output_dir, "output-folder")
JsonOutput = _path(_json_output, "output-json")
Checkpoint = _path(_checkpoint, "checkpoint")
SafetensorsFile = _path(_safetensors_file, "safetensors")
DatasetZip = _path(_dataset_zip, "dataset-zip")
Dataset = _path(_dataset, "dataset")
ConfigYaml = _path(_config_yaml, "config-yaml")
ReportJson = _path(_report_json, "report-json")
FactorMap = _path(_factor_map, "factor-map")
Scorer = _path(_scorer, "scorer")
Grader = _path(_grader, "grader")
RunFolder = _path(_run_folder, "run-folder")

Device = Annotated[str, AfterValidator(_device), Kind("device")]
GradeProbs = Annotated[str, AfterValidator(_grade_probs), Kind("grade-probs")]
MetricList = Annotated[str, AfterValidator(_name_list(_known_metrics, "metric")), Kind("metric-list")]
ScorerList = Annotated[str, AfterValidator(_name_list(_known_scorers, "scorer")), Kind("scorer-list")]
AttributeList = Annotated[
    str, AfterValidator(_name_list(_known_attributes, "attribute")), Kind("attribute-list")
]
GradesOrAll = Annotated[str, AfterValidator(_grades_or_all), Kind("grades-or-all")]
RebalanceTarget = Annotated[str, AfterValidator(_rebalance_target), Kind("rebalance-target")]
Assignment = Annotated[str, AfterValidator(_assignment), Kind("assignment")]
"""``NAME=VALUE`` (a code setting, a steering request, a scorer option)."""
ConfigOverrides = Annotated[list[str], AfterValidator(_config_overrides), Kind("config-overrides")]
"""``--set section.key=value`` items, parsed together (two items that contradict each other are an error)."""
Text = Annotated[str, Kind("text")]
"""Free text whose meaning is checked where it is used (a host name; a code name, against the model)."""
Switch = Annotated[bool, Kind("switch")]


# --------------------------------------------------------------------------------------------------
# Validation of a command's options


def _kind_of(tp: Any) -> Kind | None:
    """The `Kind` marking ``tp`` (through ``| None``, ``list[...]``); an Enum is a ``choice``; else None."""
    origin = get_origin(tp)
    if origin is Annotated:
        found = next((m for m in tp.__metadata__ if isinstance(m, Kind)), None)
        return found if found is not None else _kind_of(get_args(tp)[0])
    if origin in (Union, types.UnionType, list):
        return next((k for k in map(_kind_of, get_args(tp)) if k is not None), None)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return Kind("choice")
    return None


def _plain(tp: Any) -> Any:
    """``tp`` without pydantic constraints, as typer should see it (``Count | None`` -> ``int | None``)."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _plain(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return Union[tuple(_plain(a) for a in get_args(tp))]  # noqa: UP007 - built from a tuple
    if origin is list:
        return list[_plain(get_args(tp)[0])]  # type: ignore[misc]
    return tp


def _split(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[Kind..., typer.Option(...)]`` -> (the pydantic type, the typer parameter infos)."""
    if get_origin(annotation) is not Annotated:
        return annotation, []
    base, *meta = get_args(annotation)
    infos = [m for m in meta if isinstance(m, typer.models.ParameterInfo)]
    rest = [m for m in meta if not isinstance(m, typer.models.ParameterInfo)]
    return (Annotated[(base, *rest)] if rest else base), infos  # type: ignore[misc]


def kinds_of(command: Callable[..., Any]) -> dict[str, Kind | None]:
    """Each parameter of a command registered through `validated` -> its kind (None: undeclared)."""
    return dict(getattr(command, "__retinagen_kinds__", {}))


def run_body(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run a command's body once its options are valid (one seam, so tests can see that it was not reached)."""
    return fn(**kwargs)


def validated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every option checked against its kind before the body runs (else one ``error:`` line, exit 2)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    fields: dict[str, Any] = {}
    params = []
    flags: dict[str, str] = {}
    for name, p in sig.parameters.items():
        pyd, infos = _split(hints[name])
        fields[name] = (pyd, ...)
        typer_ann = Annotated[(_plain(pyd), *infos)] if infos else _plain(pyd)  # type: ignore[misc]
        params.append(p.replace(annotation=typer_ann))
        decls = [d for d in ((infos[0].default,) if infos and isinstance(infos[0].default, str) else ())]
        decls += list(getattr(infos[0], "param_decls", None) or ()) if infos else []
        is_argument = bool(infos) and isinstance(infos[0], typer.models.ArgumentInfo)
        long = next((d for d in decls if d.startswith("--")), None)
        flags[name] = name.upper() if is_argument else (long or "--" + name.rstrip("_").replace("_", "-"))
    kinds = {name: _kind_of(hints[name]) for name in sig.parameters}
    model = create_model(  # type: ignore[call-overload]
        f"{fn.__name__}_options", __config__=ConfigDict(arbitrary_types_allowed=True), **fields
    )

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        try:
            values = model.model_validate(kwargs)
        except ValidationError as exc:
            # Reported here, like typer's own usage errors, so `app` alone (a CliRunner) exits 2 too.
            typer.echo(f"error: {_message(exc, flags, kinds, kwargs)}", err=True)
            raise typer.Exit(code=2) from None
        return run_body(fn, {k: getattr(values, k) for k in kwargs})

    del command.__wrapped__  # typer must read the plain signature below, not fn's
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__retinagen_kinds__ = kinds  # type: ignore[attr-defined]
    command.__retinagen_flags__ = flags  # type: ignore[attr-defined]
    return command


def _message(exc: ValidationError, flags: dict[str, str], kinds: dict[str, Kind | None], given: dict[str, Any]) -> str:
    """The first error, on one line: ``--n must be an integer >= 1, got 0`` or ``--data DS.zip: reason``."""
    err = exc.errors()[0]
    name = str(err["loc"][0])
    flag, kind = flags.get(name, name), kinds.get(name)
    value = given.get(name)
    if len(err["loc"]) > 1 and isinstance(err["loc"][1], int) and isinstance(value, list | tuple):
        value = value[err["loc"][1]]
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value)
    if kind is not None and kind.expect is not None:
        text = f"{flag} must be {kind.expect}, got {value}"
    else:
        text = f"{flag} {value}: {err['msg'].removeprefix('Value error, ')}"
    return " ".join(text.split())  # one line whatever the reason held


class ValidatingTyper(typer.Typer):
    """A `typer.Typer` whose every command validates its options through `validated` before it runs."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            return register(validated(fn))

        return decorator
