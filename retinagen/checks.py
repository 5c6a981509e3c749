"""Kinds of values (pydantic ``Annotated`` types) and the one way to check a value against a kind.

The command-line options (`retinagen.options`), the grader's config and every library function that takes a
count, a seed, a rate or a choice declare it with a kind from here and check it with `check` (one value) or
`check_fields` (every field of a dataclass), so a bad value gets the same message wherever it comes from::

    check(CountAtLeast2, n, "n")           # ValueError: n must be an integer >= 2, got 1
    check(int_in(1, 16), samples, "samples", RetinagenError)

An integer kind takes Python and numpy integers and never a bool, a float or a string; a number kind takes
integers and floats, finite only.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

import numpy as np
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

from retinagen.errors import ConfigError

__all__ = [
    "Count",
    "CountAtLeast2",
    "Grade",
    "Kind",
    "Multiplier",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "Probability",
    "Seed",
    "UnitInterval",
    "check",
    "check_fields",
    "int_in",
    "kind_of",
    "number_in",
    "one_of",
]


@dataclass(frozen=True)
class Kind:
    """Marks a type with the name of its kind (tests enumerate the kinds to try bad values).

    ``expect``: what a valid value is, for the error line (``--n must be an integer >= 1, got 0``).
    """

    name: str
    expect: str | None = None


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


@functools.cache
def int_in(low: int | None = None, high: int | None = None, name: str | None = None,
           expect: str | None = None) -> Any:
    """Integers in [low, high] (None: that end is unbounded); ``expect`` overrides the wording of the error."""
    bounds = _bounds(low, high, False, False)
    return Annotated[int, Field(ge=low, le=high),
                     Kind(name or f"int {bounds}".rstrip(), expect or f"an integer {bounds}".rstrip())]


@functools.cache
def number_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False, name: str | None = None, expect: str | None = None) -> Any:
    """Finite numbers between low and high (each end closed unless ``*_open``; None: unbounded)."""
    limits = {("gt" if low_open else "ge"): low, ("lt" if high_open else "le"): high}
    bounds = _bounds(low, high, low_open, high_open)
    return Annotated[float, Field(allow_inf_nan=False, **{k: v for k, v in limits.items() if v is not None}),
                     Kind(name or f"number {bounds}".rstrip(), expect or f"a finite number {bounds}".rstrip())]


def one_of(names: Iterable[str], name: str = "choice") -> Any:
    """One of ``names`` (a registry's keys, read when the value is checked, so later entries count)."""

    def valid(value: str) -> str:
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return value

    return Annotated[str, AfterValidator(valid), Kind(name)]


Count = int_in(1, name="count")
"""A number of things (images, repeats, a batch size): >= 1."""
CountAtLeast2 = int_in(2, name="count>=2")
"""A number of values or bins along an axis, or of samples a spread is estimated from: >= 2."""
NonNegativeInt = int_in(0, name="int>=0")
Seed = int_in(0, 2**63 - 1, name="seed", expect="an integer in [0, 2**63 - 1]")
Grade = int_in(0, 999, name="grade", expect="a class index in [0, 999]")
"""A DR grade (class index); a model's own number of classes is checked once it is loaded."""
Probability = number_in(0.0, 1.0, low_open=True, high_open=True, name="probability", expect="a number in (0, 1)")
"""A rate or a share strictly between 0 and 1 (an FPR, a test fraction)."""
UnitInterval = number_in(0.0, 1.0, name="unit-interval", expect="a number in [0, 1]")
PositiveFloat = number_in(0.0, low_open=True, name="float>0")
NonNegativeFloat = number_in(0.0, name="float>=0")
Multiplier = number_in(1.0, name="float>=1")


def kind_of(tp: Any) -> Kind | None:
    """The `Kind` marking an ``Annotated`` type (None if it has none)."""
    if get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Kind)), None)
    return None


_STRICT = ConfigDict(strict=True)
_adapters: dict[int, tuple[Any, TypeAdapter[Any]]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    found = _adapters.get(id(kind))
    if found is None or found[0] is not kind:
        found = _adapters[id(kind)] = (kind, TypeAdapter(kind, config=_STRICT))
    return found[1]


def _is_int_kind(kind: Any) -> bool:
    base = get_args(kind)[0] if get_origin(kind) is Annotated else kind
    return base is int


def check(kind: Any, value: Any, name: str, error: Callable[[str], Exception] = ValueError) -> Any:
    """``value`` as ``kind`` holds it (numpy scalars become Python numbers); otherwise ``error(message)`` is
    raised (an exception class, or a function making one) with ``NAME must be EXPECTED, got VALUE`` (or the
    kind's own reason)."""
    given = value
    if isinstance(value, np.integer):
        value = int(value)
    elif isinstance(value, np.floating) and not _is_int_kind(kind):
        value = float(value)
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as exc:
        raise error(_message(kind, given, name, exc)) from None


def _message(kind: Any, value: Any, name: str, exc: ValidationError) -> str:
    k = kind_of(kind)
    if k is not None and k.expect is not None:
        return f"{name} must be {k.expect}, got {value!r}"
    reason = exc.errors()[0]["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
    return f"{name} {reason}, got {value!r}"


def check_fields(obj: Any, what: str, error: Callable[[str], Exception] = ConfigError) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotated kind (``WHAT FIELD must be ...``).

    Fields annotated with a plain type (``bool``, ``str``) are checked as that type, strictly."""
    for name, kind in _field_kinds(type(obj)):
        check(kind, getattr(obj, name), f"{what} {name}", error)


@functools.cache
def _field_kinds(cls: type) -> tuple[tuple[str, Any], ...]:
    """(field name, annotated kind) of a dataclass, resolved once per class."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
