"""Placeholder replaced by the loopback transport."""

from __future__ import annotations


class LoopbackServerParser:
    prefix = "loopback"


class LoopbackClientParser:
    prefix = "loopback"
