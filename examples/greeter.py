"""GREETER: a custom service that awaits another service (SIMPLEDB) before it replies.

Requests, as a gate sends them (``GREET name`` becomes ``["GREET", "name"]``):

* ``["GREET", key]`` -> ``"Hello, <value>!"`` where ``<value>`` is SIMPLEDB's value for
  ``key`` (``"NOTFOUND"`` when SIMPLEDB has none);
* anything else is passed to SIMPLEDB unchanged and its reply returned, so one gate in
  front of GREETER serves ``SET`` and ``GET`` too.

SIMPLEDB may live on this node or on any other node of the cluster: ``self.call`` finds it
by its global name, and ``await`` suspends only this request while the call is out.
Run it (from the repository root, which must be on ``sys.path``: twistd does not add the
current directory)::

    PYTHONPATH=. twistd -n --pidfile= skynode --standalone \
        --service examples.greeter:Greeter --gate-service GREETER
"""

from __future__ import annotations

from typing import Any

from skyproto.node.service import Service

__all__ = ["Greeter"]


class Greeter(Service):
    """``GREET <key>`` -> ``Hello, <value>!``, with the value looked up in SIMPLEDB."""

    default_name = "GREETER"

    #: the key-value service this one reads from (a global name, or a handle)
    database: str | int = "SIMPLEDB"

    async def receive(self, source: int, session: int, payload: Any) -> str:
        match payload:
            case ["GREET", str(key)]:
                found = await self.lookup(key)
                return "NOTFOUND" if found is None else f"Hello, {found}!"
            case ["GREET", *_]:
                raise ValueError("usage: GREET <key>")
            case _:
                # SET, GET and the rest are SIMPLEDB's business: forward, reply with its reply
                return await self.ask_database(payload)

    async def lookup(self, key: str) -> str | None:
        """SIMPLEDB's value for ``key``, or None if it has none."""
        reply = await self.ask_database(["GET", key])
        if reply.startswith("VALUE "):
            return reply.removeprefix("VALUE ")
        if reply == "NOTFOUND":
            return None
        raise ValueError(f"unexpected reply from {self.database}: {reply!r}")

    async def ask_database(self, payload: Any) -> str:
        # A failure (no SIMPLEDB yet, its harbor down, a timeout) raises here; the caller
        # gets it as a RemoteError, a gate client as one "ERROR <reason>" line.
        reply = await self.call(self.database, payload)
        if not isinstance(reply, str):
            raise ValueError(f"unexpected reply from {self.database}: {reply!r}")
        return reply
