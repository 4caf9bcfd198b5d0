"""The mapper's name table: node name -> registration, with epmd's creation rules. Pure state.

:class:`MapperTable` implements :class:`skyproto.interfaces.IPortMapper`. It knows
nothing of sockets: the server calls :meth:`MapperTable.register` when an ALIVE2_REQ
arrives and :meth:`MapperTable.unregister` when that connection ends. Creation numbers
follow EPMD.md section 2 exactly, so a node that registers again always gets a new one,
and the time source is injected so tests choose the starting value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from attrs import define, frozen
from zope.interface import implementer

from ..interfaces import IPortMapper
from .epmd import (
    MAX_EXTRA_BYTES,
    MAX_NAME_BYTES,
    MAX_NAME_CHARS,
    X_RESP_MIN_VERSION,
    DumpEntry,
    Port2Error,
    Port2Response,
    encode_reply,
)

__all__ = ["DEBUG_UNREGISTERED_MEMORY", "UNREGISTERED_MEMORY", "MapperTable", "Registration"]

#: How many unregistered names epmd remembers (MAX_UNREG_COUNT; 5 in its ``-d`` mode).
UNREGISTERED_MEMORY: Final = 1000
DEBUG_UNREGISTERED_MEMORY: Final = 5

_U32_MASK: Final = 0xFFFFFFFF
_PORT2_ERROR: Final = encode_reply(Port2Error())


@frozen
class Registration:
    """One live node: what its ALIVE2_REQ said, and the creation it was given.

    ``creation`` is the value sent back to the node: the 32-bit counter for nodes with
    HighVsn >= 6, else ``counter % 3 + 1`` (1..3) for the 16-bit ALIVE2_RESP.
    """

    name: str
    port: int
    node_type: int
    protocol: int
    high: int
    low: int
    extra: bytes
    creation: int

    def to_port2(self) -> Port2Response:
        """The PORT2_RESP that describes this registration."""
        return Port2Response(
            self.port, self.node_type, self.protocol, self.high, self.low, self.name, self.extra
        )


@define
class _Remembered:
    """An unregistered name in the FIFO: its last counter, port and descriptor."""

    counter: int
    port: int
    fd: int


@define
class _Live:
    registration: Registration
    counter: int
    fd: int
    port2_reply: bytes


def _bump(counter: int) -> int:
    """epmd's ``++c; if (c < 4) c = 4`` on an unsigned 32-bit counter."""
    counter = (counter + 1) & _U32_MASK
    return max(counter, 4)


@implementer(IPortMapper)
class MapperTable:
    """Live registrations (newest first) and a FIFO memory of unregistered names.

    ``time_source`` returns seconds (``time.time`` or a clock's ``seconds``); a new name's
    counter starts from it. ``memory`` bounds the FIFO of unregistered names whose
    counters are kept (1000 as in epmd).
    """

    def __init__(self, time_source: Callable[[], float], memory: int = UNREGISTERED_MEMORY) -> None:
        if memory < 0:
            raise ValueError("memory must be >= 0")
        self._time = time_source
        self._memory = memory
        self._live: dict[str, _Live] = {}
        self._old: OrderedDict[str, _Remembered] = OrderedDict()
        #: UTF-8 name -> its PORT2_RESP, for lookups straight from the request's bytes
        self._by_bytes: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, name: object) -> bool:
        return name in self._live

    def register(
        self,
        name: str,
        port: int,
        node_type: int,
        protocol: int,
        high: int,
        low: int,
        extra: bytes,
        fd: int = -1,
    ) -> Registration | None:
        """Add a live registration and return it; None if the name is live or invalid.

        ``fd`` is only reported by :meth:`dump` (epmd shows its socket descriptor).
        """
        if name in self._live or not _valid(name, extra):
            return None
        old = self._old.pop(name, None)
        start = old.counter if old is not None else int(self._time()) & _U32_MASK
        counter = _bump(start)
        creation = counter if high >= X_RESP_MIN_VERSION else counter % 3 + 1
        registration = Registration(name, port, node_type, protocol, high, low, extra, creation)
        port2_reply = encode_reply(registration.to_port2())
        self._live[name] = _Live(registration, counter, fd, port2_reply)
        self._by_bytes[name.encode("utf-8")] = port2_reply
        return registration

    def unregister(self, name: str) -> bool:
        """Remove ``name``'s registration and remember its counter; False if it was not live."""
        live = self._live.pop(name, None)
        if live is None:
            return False
        del self._by_bytes[name.encode("utf-8")]
        if self._memory:
            self._old[name] = _Remembered(live.counter, live.registration.port, live.fd)
            while len(self._old) > self._memory:
                self._old.popitem(last=False)
        return True

    def lookup(self, name: str) -> Registration | None:
        """The live registration of ``name``, or None."""
        live = self._live.get(name)
        return None if live is None else live.registration

    def port2_reply(self, name: str) -> bytes:
        """The PORT2_RESP bytes for ``name`` (encoded once, at registration)."""
        live = self._live.get(name)
        return _PORT2_ERROR if live is None else live.port2_reply

    def port2_reply_by_bytes(self, raw: bytes) -> bytes | None:
        """The PORT2_RESP bytes for the live name whose UTF-8 is exactly ``raw``, or None.

        None says nothing about validity: decode the name and use :meth:`port2_reply`.
        """
        return self._by_bytes.get(raw)

    def names(self) -> list[Registration]:
        """Every live registration, newest first (as real epmd lists them)."""
        return [live.registration for live in reversed(self._live.values())]

    def name_ports(self) -> list[tuple[str, int]]:
        """(name, port) of every live registration, newest first: NAMES_RESP's body."""
        return [(name, live.registration.port) for name, live in reversed(self._live.items())]

    def dump(self) -> tuple[list[DumpEntry], list[DumpEntry]]:
        """DUMP_RESP's lines: live names newest first, remembered ones oldest first."""
        active = [
            DumpEntry(name, live.registration.port, live.fd)
            for name, live in reversed(self._live.items())
        ]
        unused = [DumpEntry(name, old.port, old.fd) for name, old in self._old.items()]
        return active, unused

    def remembered(self) -> list[str]:
        """The unregistered names whose counters are kept, oldest first."""
        return list(self._old)


def _valid(name: str, extra: bytes) -> bool:
    if not name or "\0" in name or len(name) > MAX_NAME_CHARS or len(extra) > MAX_EXTRA_BYTES:
        return False
    try:
        return len(name.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False
