"""Flow control: while a harbor link's outbound queue is over its mark, feeders stop reading.

A feeder is anything that turns input into traffic toward other harbors: a gate client, or
a link whose requests this node answers. The router tells :class:`FlowControl` when a link
becomes congested and when it drains; FlowControl tells every subscribed feeder to hold
(stop reading) while any link is congested, and to go on once none is. Nothing is dropped:
what a feeder already read is still sent, it just stops reading more.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

Feeder = Callable[[bool], object]  #: called with True to hold, False to go on


class FlowControl:
    """Which links are congested, and who is told to hold while any is."""

    log = Logger()

    def __init__(self) -> None:
        self._congested: set[int] = set()
        self._feeders: list[Feeder] = []

    @property
    def holding(self) -> bool:
        """Whether feeders are being held now."""
        return bool(self._congested)

    def subscribe(self, feeder: Feeder) -> Callable[[], None]:
        """Call ``feeder(True)`` whenever feeders must hold, ``feeder(False)`` when they may go
        on; a feeder subscribing while held is told at once. Returns the unsubscribe."""
        self._feeders.append(feeder)
        if self._congested:
            feeder(True)

        def unsubscribe() -> None:
            if feeder in self._feeders:
                self._feeders.remove(feeder)

        return unsubscribe

    def congested(self, harbor: int) -> None:
        """The link to ``harbor`` holds more than its mark."""
        first = not self._congested
        self._congested.add(harbor)
        if first:
            self.log.debug("link to harbor {harbor} is congested: holding feeders", harbor=harbor)
            self._tell(True)

    def drained(self, harbor: int) -> None:
        """The link to ``harbor`` is under its mark again (or gone)."""
        if harbor not in self._congested:
            return
        self._congested.discard(harbor)
        if not self._congested:
            self.log.debug("links drained: feeders go on")
            self._tell(False)

    def _tell(self, hold: bool) -> None:
        for feeder in list(self._feeders):
            try:
                feeder(hold)
            except Exception:
                self.log.failure("a feeder failed to {what}", what="hold" if hold else "go on")
