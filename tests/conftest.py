"""Fixtures shared by the test files."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.procs import DigitsRuns, Jobs


def pytest_configure(config: pytest.Config) -> None:
    # Started in the background by a non-interactive shell (`make test &`, nohup), pytest
    # inherits SIGINT ignored, and so would every process a test starts: the Ctrl-C tests
    # would wait in vain. A handler (unlike "ignore") is reset to the default in a child.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    """A ``Jobs`` whose processes (and their workers) are killed when the test ends."""
    j = Jobs()
    try:
        yield j
    finally:
        j.cleanup()


@pytest.fixture(scope="session")
def digits_runs() -> Iterator[DigitsRuns]:
    """Digits training runs shared by the tests of a session (see ``DigitsRuns``)."""
    runs = DigitsRuns()
    try:
        yield runs
    finally:
        runs.jobs.cleanup()
