"""Cluster membership: what the master tells a node, turned into links and names.

The master client (protocol layer) keeps the master's view; this listener (node layer)
decides what it means for the node: on its own welcome the node dials every harbor it
learned (the newcomer dials), a harbor announced later is only recorded (it dials us), a
harbor that left is unlinked and its pending calls fail. After a master restart the new
table may not yet list nodes that are alive: a harbor missing from it is kept while our
link to it is up (it will re-join), and dropped otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from zope.interface import implementer

from ..errors import ConfigurationError
from ..interfaces import IMasterListener
from ..master.registry import (
    Event,
    HarborJoined,
    HarborLeft,
    HarborRecord,
    NameBound,
    NameUnbound,
    Table,
)

if TYPE_CHECKING:
    from .node import Node

Subscriber = Callable[[Event], object]


@implementer(IMasterListener)
class ClusterMembership:
    """The node's view of the cluster, fed by the master; subscribers see every change."""

    log = Logger()

    def __init__(self, node: Node, on_refused: Callable[[str], object] | None = None) -> None:
        self.node = node
        self.on_refused = on_refused
        self.on_joined: Callable[[int], object] | None = None
        self.harbors: dict[int, HarborRecord] = {}
        #: harbors a restarted master does not list yet, kept while our link to them is up
        self.kept: set[int] = set()
        self.names: dict[str, int] = {}
        self.subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every HarborJoined/HarborLeft/NameBound/NameUnbound
        (Erlang's monitor_nodes, plus names). Returns the function that unsubscribes."""
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback) if callback in self.subscribers else None

    # --- IMasterListener ---------------------------------------------------------------

    def master_table(self, table: Table, first: bool) -> None:
        """A whole table (a welcome or a resync): dial the harbors it lists, keep the ones still
        linked, forget the others, and publish what changed."""
        router = self.node.router
        master = self.node.master
        if not self.node.harbor and master is not None:
            self.node.assign_harbor(master.harbor)
        listed = {record.harbor: record for record in table.harbors}
        for harbor, record in listed.items():
            if harbor == self.node.harbor:
                continue
            known = self.harbors.get(harbor)
            if not self._add_peer(record, dial=True):
                continue
            if known is None or known.incarnation != record.incarnation:
                self._publish(HarborJoined(table.sequence, record))
            self.harbors[harbor] = record
        self.kept.clear()  # recomputed from this table
        for harbor in [h for h in self.harbors if h not in listed]:
            if router.state(harbor) == "up":
                self.kept.add(harbor)  # alive, and will re-join the restarted master
                continue
            self._forget(harbor, table.sequence, "not in the master's table")
        for harbor, peer in list(router.peers.items()):
            if harbor not in listed and harbor not in self.harbors and peer.link is None:
                router.remove_peer(harbor, "not in the master's table")  # never announced
        kept = {name: handle for name, handle in self.names.items()
                if handle >> 24 in self.harbors and handle >> 24 not in listed}
        new_names = {**kept, **table.names}
        for name, handle in self.names.items():
            if new_names.get(name) != handle:
                self._publish(NameUnbound(table.sequence, name, handle))
        for name, handle in new_names.items():
            if self.names.get(name) != handle:
                self._publish(NameBound(table.sequence, name, handle))
        self.names = new_names
        if first and self.on_joined is not None:
            self.on_joined(self.node.harbor)

    def master_event(self, event: Any) -> None:
        """One pushed change: record a harbor, unlink one that left, or update a name; then publish
        it."""
        if isinstance(event, HarborJoined):
            record = event.record
            if record.harbor == self.node.harbor:
                return
            self.kept.discard(record.harbor)
            if not self._add_peer(record, dial=False):
                return
            self.harbors[record.harbor] = record
        elif isinstance(event, HarborLeft):
            left = self.harbors.get(event.harbor)
            if left is not None and left.incarnation == event.incarnation:
                del self.harbors[event.harbor]
            if event.harbor != self.node.harbor:
                self.node.router.remove_peer(event.harbor, event.reason, event.incarnation)
        elif isinstance(event, NameBound):
            self.names[event.name] = event.handle
        elif isinstance(event, NameUnbound) and self.names.get(event.name) == event.handle:
            del self.names[event.name]
        self._publish(event)

    def _add_peer(self, record: HarborRecord, dial: bool) -> bool:
        """Tell the router where a harbor listens; one bad record must not cut us off."""
        try:
            self.node.router.add_peer(record.harbor, record.endpoint, dial=dial)
        except ConfigurationError as e:
            self.log.error("cannot reach harbor {harbor} ({node}): {error}",
                           harbor=record.harbor, node=record.node, error=e)
            return False
        return True

    def link_lost(self, harbor: int) -> None:
        """A kept harbor (alive, not yet re-joined) whose link died will not re-join."""
        if harbor in self.kept and self.node.master is not None and self.node.master.connected:
            self.kept.discard(harbor)
            self._forget(harbor, self.node.master.sequence, "link lost before it re-joined")

    def _forget(self, harbor: int, sequence: int, reason: str) -> None:
        record = self.harbors.pop(harbor)
        self.kept.discard(harbor)
        self.node.router.remove_peer(harbor, reason, record.incarnation)
        self._publish(HarborLeft(sequence, harbor, record.incarnation, reason))
        for name, handle in list(self.names.items()):
            if handle >> 24 == harbor:
                del self.names[name]
                self._publish(NameUnbound(sequence, name, handle))

    def name_refused(self, name: str, handle: int, reason: str) -> None:
        """The master gave a name this node claimed to another node: it is not ours."""
        if self.node.names.get(name) == handle:
            self.log.info("name {name} is not this node's: {reason}", name=name, reason=reason)
            del self.node.names[name]

    def master_refused(self, reason: str) -> None:
        """The master refused this node: tell ``on_refused``."""
        if self.on_refused is not None:
            self.on_refused(reason)

    def master_lost(self, reason: str) -> None:
        """Nothing to undo: links and calls between nodes go on without the master."""

    def _publish(self, event: Event) -> None:
        for subscriber in list(self.subscribers):
            try:
                subscriber(event)
            except Exception:
                self.log.failure("a cluster subscriber failed on {event}", event=event)
