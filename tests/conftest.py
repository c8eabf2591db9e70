"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import Jobs


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    """A ``Jobs`` whose processes (and their workers) are killed when the test ends."""
    j = Jobs()
    try:
        yield j
    finally:
        j.cleanup()
