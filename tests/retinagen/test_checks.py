"""retinagen.checks: the one way a value is checked against its kind, for options, config fields and arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from retinagen.checks import (
    Count,
    CountAtLeast2,
    PositiveFloat,
    Probability,
    Seed,
    UnitInterval,
    check,
    check_fields,
    int_in,
    number_in,
    one_of,
)
from retinagen.errors import ConfigError, RetinagenError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (Count, 0, "n must be an integer >= 1, got 0"),
        (Count, True, "n must be an integer >= 1, got True"),
        (Count, 2.0, "n must be an integer >= 1, got 2.0"),
        (Count, "3", "n must be an integer >= 1, got '3'"),
        (CountAtLeast2, 1, "n must be an integer >= 2, got 1"),
        (Seed, -1, "n must be an integer in [0, 2**63 - 1], got -1"),
        (int_in(1, 16), 17, "n must be an integer in [1, 16], got 17"),
        (PositiveFloat, 0, "n must be a finite number > 0, got 0"),
        (PositiveFloat, float("inf"), "n must be a finite number > 0, got inf"),
        (PositiveFloat, float("nan"), "n must be a finite number > 0, got nan"),
        (PositiveFloat, False, "n must be a finite number > 0, got False"),
        (Probability, 1.0, "n must be a number in (0, 1), got 1.0"),
        (number_in(0.0, 1.0, high_open=True), 1.0, "n must be a finite number in [0, 1), got 1.0"),
        (one_of(["a", "b"]), "c", "n must be one of a, b, got 'c'"),
    ],
)
def test_a_bad_value_gets_one_message_naming_it(kind, value, message) -> None:
    with pytest.raises(ValueError) as info:
        check(kind, value, "n")
    assert str(info.value) == message


def test_good_values_come_back_as_python_numbers_and_the_error_type_is_the_callers() -> None:
    assert check(Count, np.int64(3), "n") == 3 and type(check(Count, np.int64(3), "n")) is int
    assert check(UnitInterval, np.float32(0.5), "p") == 0.5 and type(check(UnitInterval, np.float32(0.5), "p")) is float
    assert check(PositiveFloat, 2, "lr") == 2.0
    with pytest.raises(RetinagenError, match="samples must be an integer in"):
        check(int_in(1, 16), 0, "samples", RetinagenError)
    assert int_in(1, 16) is int_in(1, 16)  # one kind per range, so checks do not build a validator each call


def test_check_fields_checks_every_field_of_a_dataclass() -> None:
    @dataclass(frozen=True)
    class Options:
        steps: Count = 1
        rate: Probability = 0.5
        augment: bool = True

        def __post_init__(self) -> None:
            check_fields(self, "options")

    Options(steps=np.int64(2))
    for kwargs, fragment in (({"steps": 0}, "options steps must be an integer >= 1"),
                             ({"rate": 1.5}, "options rate must be a number in (0, 1)"),
                             ({"augment": 1}, "options augment must be a valid boolean, got 1")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            Options(**kwargs)


def test_product_code_has_no_hand_written_integer_checks() -> None:
    """Counts, seeds and ranges go through `check`; a hand-written `isinstance(x, bool) or not isinstance(x, int)`
    is the second way this test keeps out."""
    pattern = re.compile(r"isinstance\((\w+), bool\) or not isinstance\(\1,|not isinstance\((\w+), int[^)]*\) or isinstance\(\2, bool\)")
    found = [f"{p.relative_to(ROOT)}:{i}" for folder in ("retinagen", "clinical", "apps")
             for p in sorted((ROOT / folder).rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []
