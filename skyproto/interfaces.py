"""The protocol roles of skyproto, as zope.interface definitions.

Each role is implemented with ``@implementer`` and checked with ``verifyObject`` in the
tests. The lower layers (session, harbor link, mapper) know only these interfaces, never
the classes above them, so a node, a test double or a benchmark can stand behind any of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from .wire.codec import Frame


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

    def reply_received(session: int, payload: Any, harbor: int) -> bool:
        """A successful reply (session above 0, type NORMAL) from ``harbor`` arrived: the
        node's session table completes the call (False: no such call waits)."""

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

    def write_frame(frame: Frame, must: bool) -> None:
        """Send one encoded data frame (length prefix included). Unless ``must``, raise
        QueueFull when too many bytes already wait for the peer."""

    def retire(reason: str) -> None:
        """This link is a duplicate: send nothing new on it, close it once the peer agrees."""

    def close(reason: str) -> None:
        """Drop the link, logging ``reason``."""


class IRegistry(Interface):
    """The master's state behind one interface: harbor id -> node, global name -> handle,
    service group -> member handles.

    The master's protocol code (``master/server.py``) knows only this and the classes of
    ``master/records.py``. A store may need I/O to decide a change (etcd), so every change
    is asynchronous: it returns a Deferred (the in-memory store's have fired already),
    failing with ``RegistryRefusal`` (refused, with the reason), ``RegistryUnavailable``
    (cannot decide now; nothing granted) or anything else (a bug, logged by the caller).

    Reads are synchronous and answer from the store's current view. Every change, whoever
    made it (this master, another master sharing the store, an expired lease), reaches
    each subscriber (:class:`IRegistryListener`) in sequence order, before the Deferred of
    the change that caused it fires: a master pushes changes from its subscription only.
    Sequence numbers only grow; each event has its own (etcd: the revision of its change),
    but they need not be contiguous.
    """

    kind = Attribute("What keeps the state, for status output: 'memory' or 'etcd'.")
    sequence = Attribute("The sequence number of the last change in the view.")

    def snapshot() -> Any:
        """The whole table (a ``Table``) and its sequence number."""

    def lookup(name: str) -> int | None:
        """The handle bound to a global name, or None."""

    def members(group: str) -> tuple[int, ...]:
        """The member handles of a service group, sorted (empty if it has none)."""

    def harbor(harbor: int) -> Any:
        """The live ``HarborRecord`` of a harbor id, or None."""

    def subscribe(listener: IRegistryListener) -> Any:
        """Tell ``listener`` every change from now on; returns the function that stops it."""

    def start() -> Any:
        """Deferred that fires once the store can answer (its view loaded)."""

    def stop() -> Any:
        """Deferred that fires once the store has let go of its resources. What the
        sessions of this master hold is not released: it lives on for its time (a lease)
        so its nodes can re-join another master without leaving the table."""

    def admit(harbor: int, node: str, endpoint: str, incarnation: int, names: Any,
              now: float) -> Any:
        """Deferred of a ``Joined``: admit a node (harbor 0: assign an id) and bind the
        names it holds (those held by others are refused one by one).

        Fails with ``HarborHeld`` (a ``RegistryRefusal``) if a live node holds the id."""

    def depart(harbor: int, incarnation: int, reason: str) -> Any:
        """Deferred of the events: remove a harbor (that incarnation only), its names and
        its group memberships (``HarborLeft``, then each ``NameUnbound``, then each
        ``GroupLeft``)."""

    def claim_name(name: str, handle: int, requester: int) -> Any:
        """Deferred of the events: bind a global name to a handle on the requester's
        harbor; first writer wins, and the same binding again changes nothing."""

    def release_name(name: str, requester: int) -> Any:
        """Deferred of the events: remove a global name the requester's harbor holds."""

    def join_group(group: str, handle: int, requester: int) -> Any:
        """Deferred of the events: make a handle on the requester's (joined) harbor a
        member of a service group; a member joining again changes nothing. Refused: a
        group name that is empty, has whitespace or is over 255 bytes of UTF-8, or a
        handle on another harbor."""

    def leave_group(group: str, handle: int, requester: int) -> Any:
        """Deferred of the events: take a handle on the requester's harbor out of a group;
        a handle that is not a member changes nothing."""


class IRegistryListener(Interface):
    """What a registry reports to: the master's server."""

    def registry_changed(events: Any) -> None:
        """Changes in sequence (a tuple of events), whoever made them."""

    def registry_lost(harbor: int, incarnation: int, reason: str) -> None:
        """What this store registered for a harbor's session is gone without a ``depart``
        (its lease expired while the store was cut off, another master took it over):
        the session must end, and its node re-join."""


class IMasterService(Interface):
    """The master's side of the name service: accepts nodes, answers hellos, pushes changes."""

    registry = Attribute("The IRegistry holding the state.")

    def connected() -> int:
        """How many authenticated nodes are connected."""


class IMasterClient(Interface):
    """A node's side of the name service: a cached table, name and group operations."""

    def register_name(name: str, handle: int) -> Any:
        """Deferred that fires when the master accepted ``name``; errbacks on conflict."""

    def unregister_name(name: str) -> Any:
        """Deferred that fires when the master removed ``name``."""

    def lookup_name(name: str) -> Any:
        """Deferred of the handle for ``name`` (cache first, then the master), or None."""

    def join_group(group: str, handle: int) -> Any:
        """Deferred that fires when the master has ``handle`` in ``group``."""

    def leave_group(group: str, handle: int) -> Any:
        """Deferred that fires when the master took ``handle`` out of ``group``."""


class IMasterListener(Interface):
    """What a master client reports to (the node's cluster membership, a status tool)."""

    def master_table(table: Any, first: bool) -> None:
        """A whole table: at each welcome (``first`` for the very first) or after a gap."""

    def master_event(event: Any) -> None:
        """One change, in sequence: harbor joined/left, name bound/unbound, group
        joined/left."""

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
