"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Every log event emitted during the test, in order."""
    captured: list[LogEvent] = []
    observer = cast(ILogObserver, captured.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)
