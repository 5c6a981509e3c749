"""Fixtures shared by the metrics tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture()
def two_threads() -> Iterator[None]:
    """A build is deterministic for a given thread count: rebuilds use the 2 the judges were built with (the
    session's tiny judges too, tests/conftest.py). Scoring needs no particular count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
