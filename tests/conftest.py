"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

# Real etcd clusters (tests/etcd.py): defined here once, so that one session-wide cluster
# serves every module that only reads and writes keys.
from .etcd import etcd_cluster, fresh_etcd

__all__ = ["etcd_cluster", "events", "fresh_etcd"]


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
