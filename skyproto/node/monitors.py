"""Monitors, as Erlang's ``erlang:monitor(process, Pid)``: a Deferred that fires, once, with
the reason when a service exits or its harbor goes down or restarts.

A monitor of a local service is kept here. A monitor of a service on another harbor is
kept here *and* at that harbor's node, which it is told of by a SYSTEM message from this
node to that one (``["monitor", ref, target]``); when the service exits that node answers
``["down", ref, reason]``, and ``["demonitor", ref]`` takes a monitor back. A harbor that
goes down (its link lost, or a new incarnation) fires every monitor of its services here,
with why, and that node forgets the monitors this one held there. A monitor of a service
that does not exist fires at once with ``"no such service"``, like Erlang's ``noproc``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..address import format_handle, harbor_of

#: the reason a monitor of a service that does not exist fires with
NO_SUCH_SERVICE: Final = "no such service"
SendSystem = Callable[[int, list[Any]], None]


class Monitors:
    """Who watches which service, on this node and for other nodes."""

    log = Logger()

    def __init__(self, harbor: Callable[[], int], exists: Callable[[int], bool],
                 send_system: SendSystem) -> None:
        self._harbor = harbor
        self._exists = exists
        self._send = send_system
        self._next_ref = 1
        #: ref -> (target, deferred): this node's monitors
        self._mine: dict[int, tuple[int, Deferred[str]]] = {}
        #: target -> refs of this node's monitors of it
        self._of_target: dict[int, set[int]] = {}
        #: local target -> {(watcher harbor, their ref)}: other nodes' monitors here
        self._theirs: dict[int, set[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self._mine)

    # --- this node's monitors -------------------------------------------------------------

    def monitor(self, target: int) -> Deferred[str]:
        """A Deferred that fires with the reason ``target`` went away (cancel it, or
        :meth:`demonitor` it, to stop watching: it then never fires)."""
        ref = self._next_ref
        self._next_ref += 1
        def cancelled(_: Deferred[str]) -> None:
            self._forget(ref, tell=True)

        watching: Deferred[str] = Deferred(cancelled)
        harbor = harbor_of(target)
        if harbor == self._harbor():
            if not self._exists(target):
                watching.callback(NO_SUCH_SERVICE)
                return watching
            self._add(ref, target, watching)
            return watching
        self._add(ref, target, watching)
        try:
            self._send(harbor, ["monitor", ref, target])
        except Exception as e:  # the harbor is down, or its queue full: nothing to watch
            self._fire(ref, f"harbor {harbor} down: {e}")
        return watching

    def demonitor(self, watching: Deferred[str]) -> bool:
        """Stop a monitor from :meth:`monitor`; False if it already fired or was stopped."""
        for ref, (_, deferred) in self._mine.items():
            if deferred is watching:
                self._forget(ref, tell=True)
                return True
        return False

    def _add(self, ref: int, target: int, watching: Deferred[str]) -> None:
        self._mine[ref] = (target, watching)
        self._of_target.setdefault(target, set()).add(ref)

    def _forget(self, ref: int, tell: bool) -> tuple[int, Deferred[str]] | None:
        entry = self._mine.pop(ref, None)
        if entry is None:
            return None
        target = entry[0]
        refs = self._of_target.get(target)
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self._of_target[target]
        harbor = harbor_of(target)
        if tell and harbor != self._harbor():
            with contextlib.suppress(Exception):  # a harbor that is down forgets it anyway
                self._send(harbor, ["demonitor", ref])
        return entry

    def _fire(self, ref: int, reason: str) -> None:
        entry = self._forget(ref, tell=False)
        if entry is not None:
            entry[1].callback(reason)

    # --- what happens ---------------------------------------------------------------------

    def service_exited(self, target: int, reason: str) -> None:
        """A local service is gone: fire the monitors of it, here and on other nodes."""
        for ref in list(self._of_target.get(target, ())):
            self._fire(ref, reason)
        for harbor, ref in sorted(self._theirs.pop(target, ())):
            try:
                self._send(harbor, ["down", ref, reason])
            except Exception as e:  # that harbor is down: its node fired the monitor itself
                self.log.debug("cannot tell harbor {harbor} that {target} exited: {why}",
                               harbor=harbor, target=format_handle(target), why=str(e))

    def harbor_lost(self, harbor: int, reason: str) -> None:
        """The link to ``harbor`` went down (or a new incarnation replaced it): every
        monitor of its services fires, and its monitors here are forgotten."""
        for target in [t for t in self._of_target if harbor_of(t) == harbor]:
            for ref in list(self._of_target.get(target, ())):
                self._fire(ref, reason)
        for target in list(self._theirs):
            watchers = {w for w in self._theirs[target] if w[0] != harbor}
            if watchers:
                self._theirs[target] = watchers
            else:
                del self._theirs[target]

    def stop(self) -> None:
        """This node is stopping: its own monitors end without firing."""
        for ref in list(self._mine):
            self._forget(ref, tell=False)
        self._theirs.clear()

    def system_message(self, harbor: int, payload: Any) -> None:
        """A SYSTEM message from ``harbor``'s node (a monitor request, a demonitor, a down)."""
        match payload:
            case ["monitor", int(ref), int(target)]:
                if harbor_of(target) == self._harbor() and self._exists(target):
                    self._theirs.setdefault(target, set()).add((harbor, ref))
                else:
                    self._send(harbor, ["down", ref, NO_SUCH_SERVICE])
            case ["demonitor", int(ref)]:
                for target in list(self._theirs):
                    self._theirs[target].discard((harbor, ref))
                    if not self._theirs[target]:
                        del self._theirs[target]
            case ["down", int(ref), str(reason)]:
                entry = self._mine.get(ref)
                if entry is not None and harbor_of(entry[0]) == harbor:
                    self._fire(ref, reason)
            case _:
                self.log.warn("ignoring an unknown system message from harbor {harbor}",
                              harbor=harbor)
