"""The ``retinagen`` command line: the app, its shared option kinds and helpers, and ``main``.

Exit codes: 0 success, 2 bad usage or bad input (a `RetinagenError`), 1 internal error (a bug).
Heavy imports (torch, monai) happen inside the commands, so ``retinagen --help`` is instant.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterable
from enum import Enum
from typing import Any, NoReturn

import typer

from retinagen.config import DATASETS, PRESETS
from retinagen.data.sources import SOURCES, SPLIT_NAMES
from retinagen.errors import RetinagenError
from retinagen.options import (
    ValidatingTyper,
)

# Every command's options are validated by their kinds (retinagen.options) before the command runs.
app = ValidatingTyper(
    name="retinagen",
    help="InfoStyleGAN for retinal fundus images: discover and control attributes, rebalance DR data, score anomalies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
anomaly_app = ValidatingTyper(help="Anomaly scoring from Q-encoder and discriminator features.", no_args_is_help=True)
app.add_typer(anomaly_app, name="anomaly")


def _choices(name: str, names: Iterable[str]) -> type[Enum]:
    """A typer choice built from a registry's names (so a new entry is a new choice, in registry order)."""
    return Enum(name, {n: n for n in names}, type=str)  # type: ignore[return-value]


PrepareDataset = _choices("PrepareDataset", SOURCES)
TrainDataset = _choices("TrainDataset", DATASETS)
Preset = _choices("Preset", PRESETS)
Split = _choices("Split", SPLIT_NAMES)


class AnomalyScorerName(str, Enum):
    # Not built from clinical.anomaly.SCORERS: that registry imports torch, which every command would then
    # wait for (`--help` too). tests/retinagen/test_cli.py checks that these are the registry's names.
    mahalanobis = "mahalanobis"
    knn = "knn"
    fanogan = "fanogan"


def parse_grades(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise RetinagenError(f"--grades must be comma-separated numbers, got {text!r}") from None
    return values


def usage_error(message: str) -> NoReturn:
    """One line on stderr and exit code 2 (the format `main` uses for a RetinagenError)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


# --------------------------------------------------------------------------------------------------


def _usage_error_line(exc: Exception) -> str:
    """A typer/click usage error (unknown option, bad choice, missing option) as one ``error:`` line."""
    ctx = getattr(exc, "ctx", None)
    message = " ".join(str(exc.format_message()).split()).replace("Value error, ", "")  # type: ignore[attr-defined]
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"error: {message}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad usage and project errors exit 2 with one ``error:`` line, bugs exit 1 with a traceback.

    Exit codes: 0 success; 1 internal error (a bug); 2 bad usage or bad input; 130 / 143 a `train` stopped by
    SIGINT (Ctrl-C) / SIGTERM after writing its snapshot (128 + the signal's number, as a shell reports it).
    """
    click_exceptions = _click_exceptions()
    try:
        # standalone_mode=False: usage errors come back here as exceptions, so they get the same one-line
        # format as every other bad input instead of click's multi-line box.
        result = app(args=argv, prog_name="retinagen", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except click_exceptions.NoArgsIsHelpError as exc:
        typer.echo(exc.format_message(), err=True)
        return 2
    except click_exceptions.ClickException as exc:
        typer.echo(_usage_error_line(exc), err=True)
        return exc.exit_code if exc.exit_code else 2
    except typer.Abort:
        typer.echo("interrupted", err=True)
        return 130
    except RetinagenError as exc:
        first, *rest = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        typer.echo(f"error: {first} {'; '.join(rest)}".rstrip(), err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as such
        from retinagen.fileio import storage_error_message

        # A full disk or an unwritable output is the machine's state, not a bug: one line, exit 2.
        # A failed write() names no file; then the command's --out is named instead.
        args = list(sys.argv[1:] if argv is None else argv)
        out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None) or next(
            (nxt for a, nxt in zip(args, args[1:], strict=False) if a == "--out"), None
        )
        if (message := storage_error_message(exc, writing=out)) is not None:
            typer.echo(f"error: {message}", err=True)
            return 2
        traceback.print_exc()
        typer.echo("internal error (a bug in retinagen; please report it with the traceback above)", err=True)
        return 1
    # A command's exit code: typer.Exit(code) comes back as the return value in non-standalone mode.
    return result if isinstance(result, int) else 0


def _click_exceptions() -> Any:
    """The click exception module typer uses: its vendored copy (typer >= 0.2x) or click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer depends on click
        from click import exceptions
    if not hasattr(exceptions, "NoArgsIsHelpError"):  # click < 8.2 prints the help itself
        exceptions.NoArgsIsHelpError = type("NoArgsIsHelpError", (Exception,), {})
    return exceptions
