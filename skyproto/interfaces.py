"""The protocol roles of skyproto, as zope.interface definitions.

Each role is implemented with ``@implementer`` and checked with ``verifyObject`` in the
tests. The lower layers (session, harbor link, mapper) know only these interfaces, never
the classes above them, so a node, a test double or a benchmark can stand behind any of them.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class ISessionTable(Interface):
    """31-bit session ids mapped to pending Deferreds (skynet's session layer)."""

    pending = Attribute("The number of calls still waiting for their reply.")

    def new(timeout: float | None = None, harbor: int = 0) -> tuple[int, Any]:
        """Allocate a session id and its Deferred; ``harbor`` tags it for ``fail_all``."""

    def resolve(session: int, value: object, harbor: int | None = None) -> bool:
        """Fire the call's Deferred with ``value``; an unknown id is logged, returns False.

        With ``harbor``, only a call that went to that harbor matches (a reply from
        elsewhere is dropped like an unknown id)."""

    def fail(session: int, reason: BaseException, harbor: int | None = None) -> bool:
        """Errback the call's Deferred; an unknown id is logged, returns False."""

    def fail_all(reason: BaseException, harbor: int | None = None) -> int:
        """Errback every pending call (or only those tagged ``harbor``); return how many."""


class IMessageSink(Interface):
    """What a harbor link delivers to: the node's router (or a benchmark, or a test)."""

    def link_up(link: IHarborLink) -> None:
        """The link finished its handshake and can carry data."""

    def link_down(link: IHarborLink, reason: BaseException) -> None:
        """The link is gone (closed, cut, silent for too long, or replaced)."""

    def data_received(
        link: IHarborLink, source: int, destination: int, session: int, ptype: int, payload: Any
    ) -> None:
        """One data message arrived on ``link``; ``session`` is signed as on the wire."""

    def bad_payload(
        link: IHarborLink, source: int, destination: int, session: int, error: Exception
    ) -> None:
        """A data message whose payload could not be decoded: fail that message only."""

    def link_congested(link: IHarborLink) -> None:
        """More bytes wait to go out on ``link`` than its mark: hold whoever feeds it."""

    def link_drained(link: IHarborLink) -> None:
        """``link``'s outbound queue fell back under its mark."""

    def link_retired(link: IHarborLink) -> None:
        """The peer retired ``link`` as a duplicate: send nothing new on it."""


class IHarborLink(Interface):
    """One authenticated connection between two nodes, carrying data and heartbeats."""

    local_harbor = Attribute("Our harbor id.")
    peer_harbor = Attribute("The peer's harbor id, once the handshake is done (else 0).")
    peer_incarnation = Attribute("The peer's incarnation, once the handshake is done.")
    up = Attribute("True from the end of the handshake until the link is lost.")

    retired = Attribute("True once this link is a duplicate that carries nothing new.")

    def send_data(source: int, destination: int, session: int, ptype: int, payload: Any) -> None:
        """Encode and send one data message; FrameTooLarge (nothing sent) if it is too big."""

    def write_frame(frame: bytes, must: bool) -> None:
        """Send one encoded data frame (length prefix included). Unless ``must``, raise
        QueueFull when too many bytes already wait for the peer."""

    def retire(reason: str) -> None:
        """This link is a duplicate: send nothing new on it, close it once the peer agrees."""

    def close(reason: str) -> None:
        """Drop the link, logging ``reason``."""


class IRegistry(Interface):
    """The master's state: harbor id -> node, global name -> handle. Pure: no I/O.

    Every mutating method returns the change events it caused (each with the new
    sequence number) so the protocol layer can push them; a persistent or consensus-backed
    store implements the same interface.
    """

    sequence = Attribute("The sequence number of the last change.")

    def snapshot() -> Any:
        """The whole table and its sequence number."""

    def lookup(name: str) -> int | None:
        """The handle bound to a global name, or None."""

    def join(harbor: int, node: str, endpoint: str, incarnation: int, names: Any,
             now: float) -> Any:
        """Admit a node (harbor 0: assign one) and re-bind the names it holds.

        Returns the harbor, the names refused (taken by others) and the events; raises
        RegistryRefusal if the harbor id is held by a live node."""

    def leave(harbor: int, incarnation: int, reason: str) -> Any:
        """Remove a dead harbor (that incarnation only) and its names; returns the events."""

    def bind(name: str, handle: int, requester: int) -> Any:
        """Bind a global name (first writer wins); returns the events or raises."""

    def unbind(name: str, requester: int) -> Any:
        """Remove a global name owned by the requester's harbor; returns the events."""


class IMasterService(Interface):
    """The master's side of the name service: accepts nodes, answers hellos, pushes changes."""

    registry = Attribute("The IRegistry holding the state.")

    def connected() -> int:
        """How many authenticated nodes are connected."""


class IMasterClient(Interface):
    """A node's side of the name service: a cached table and name operations."""

    def register_name(name: str, handle: int) -> Any:
        """Deferred that fires when the master accepted ``name``; errbacks on conflict."""

    def unregister_name(name: str) -> Any:
        """Deferred that fires when the master removed ``name``."""

    def lookup_name(name: str) -> Any:
        """Deferred of the handle for ``name`` (cache first, then the master), or None."""


class IMasterListener(Interface):
    """What a master client reports to (the node's cluster membership, a status tool)."""

    def master_table(table: Any, first: bool) -> None:
        """A whole table: at each welcome (``first`` for the very first) or after a gap."""

    def master_event(event: Any) -> None:
        """One change, in sequence: harbor joined/left, name bound/unbound."""

    def master_refused(reason: str) -> None:
        """The master refused us; the client has stopped trying."""

    def master_lost(reason: str) -> None:
        """The connection to the master is gone; the client is reconnecting."""


class IPortMapper(Interface):
    """The epmd-style name table of one host: node name -> port. Pure: no I/O."""

    def register(
        name: str, port: int, node_type: int, protocol: int, high: int, low: int, extra: bytes
    ) -> Any:
        """Add a live registration and return it (with its creation); None if refused."""

    def unregister(name: str) -> bool:
        """Remove a live registration (its connection closed); False if there was none."""

    def lookup(name: str) -> Any:
        """The live registration of ``name``, or None."""

    def names() -> list[Any]:
        """Every live registration, newest first (as real epmd lists them)."""


class IMapperClient(Interface):
    """Talks EPMD to a mapper (ours or a genuine epmd)."""

    def register(
        name: str,
        port: int,
        extra: bytes = b"",
        node_type: int = 77,
        high: int = 6,
        low: int = 6,
        protocol: int = 0,
    ) -> Any:
        """Deferred of a registration handle (``creation``, ``unregister()``,
        ``when_lost()``); the registration lives exactly as long as its connection."""

    def port_please(name: str) -> Any:
        """Deferred of the PORT2 record for ``name`` (no creation: the wire has none),
        or None if it is not registered."""

    def names() -> Any:
        """Deferred of the (name, port) pairs the mapper lists."""

    def names_reply() -> Any:
        """Deferred of the whole NAMES reply, including the mapper's own port."""


class IServiceBehaviour(Interface):
    """A service: what a node calls with each message addressed to it."""

    def receive(source: int, session: int, payload: Any) -> Any:
        """Handle one message. ``session`` is 0 when no reply is wanted.

        Return the reply: a value, a Deferred or a coroutine. Raising (or failing) sends
        the caller a RemoteError with the exception's type and message.
        """
