"""The shared warm-up + cosine lr factor."""

from __future__ import annotations

import math

from retinagen.training.schedule import warmup_cosine


def test_warmup_then_cosine_to_zero() -> None:
    assert [warmup_cosine(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 10, 4) == 1.0  # the cosine starts at 1
    assert math.isclose(warmup_cosine(7, 10, 4), 0.5)  # half way through the 6 cosine steps
    assert warmup_cosine(10, 10, 4) == 0.0 and warmup_cosine(25, 10, 4) == 0.0  # held at 0 after the end
    assert [round(warmup_cosine(s, 4), 6) for s in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]  # no warm-up
