"""``echo`` replies with what it got; ``relay`` calls on behalf of its caller."""

from __future__ import annotations

from typing import Any

from ..address import parse_handle
from ..node.service import Service


class Echo(Service):
    """Replies with the payload: smoke tests and benchmarks."""

    default_name = "ECHO"

    def receive(self, source: int, session: int, payload: Any) -> Any:
        """Reply with the payload itself."""
        return payload


class Relay(Service):
    """Payload ``[destination, inner]``: calls ``destination`` with ``inner``, replies with
    its reply. The destination is a name or a handle (an int or its ``:0100002a`` text)."""

    default_name = "RELAY"

    async def receive(self, source: int, session: int, payload: Any) -> Any:
        """Call ``destination`` with ``payload`` (from ``[destination, payload]``) and reply with
        its reply."""
        if not isinstance(payload, list) or len(payload) != 2:
            raise ValueError("relay takes [destination, payload]")
        destination, inner = payload
        if isinstance(destination, str) and destination.startswith(":"):
            destination = parse_handle(destination)
        return await self.call(destination, inner)
