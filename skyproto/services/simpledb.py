"""SIMPLEDB, skynet's reference example: a key-value store behind a global name."""

from __future__ import annotations

from typing import Any

from ..node.service import Service


class SimpleDB(Service):
    """``["SET", key, value]`` -> ``"OK"``; ``["GET", key]`` -> ``"VALUE <value>"`` or
    ``"NOTFOUND"``. Replies are the gate's reply lines; anything else raises, which the
    caller (and a gate client) sees as an error."""

    default_name = "SIMPLEDB"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def receive(self, source: int, session: int, payload: Any) -> Any:
        """``["SET", key, value]`` stores a value (reply ``OK``); ``["GET", key]`` replies ``VALUE
        v`` or ``NOTFOUND``; anything else raises ValueError with the usage."""
        match payload:
            case ["SET", str(key), str(value)]:
                self.data[key] = value
                return "OK"
            case ["GET", str(key)]:
                found = self.data.get(key)
                return "NOTFOUND" if found is None else f"VALUE {found}"
            case ["SET", *_]:
                raise ValueError("usage: SET <key> <value>")
            case ["GET", *_]:
                raise ValueError("usage: GET <key>")
            case [str(command), *_]:
                raise ValueError(f"unknown command {command}")
            case _:
                raise ValueError("a request is [command, arguments...]")
