"""The base class of services: something with a handle that receives and calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..interfaces import IServiceBehaviour

if TYPE_CHECKING:
    from .node import Node


@implementer(IServiceBehaviour)
class Service:
    """Subclass and override :meth:`receive` (plain, returning a Deferred, or ``async def``).

    ``node`` and ``handle`` are set by :meth:`Node.spawn`; ``call`` and ``send`` then speak
    with this service's handle as the source, as skynet's ``skynet.call`` does.
    """

    #: the name :meth:`Node.spawn` registers the service under when none is given
    default_name: ClassVar[str | None] = None

    node: Node
    handle: int = 0

    def receive(self, source: int, session: int, payload: Any) -> Any:
        """Handle one message from ``source``: the return value (or what a Deferred or coroutine
        gives) is the reply when ``session`` is not 0. Override it."""
        raise NotImplementedError(f"{type(self).__name__} does not handle messages")

    def call(self, destination: int | str, payload: Any,
             timeout: float | None = None) -> Deferred[Any]:
        """Request/response to a handle or a name; the Deferred fires with the reply."""
        return self.node.call(destination, payload, timeout=timeout, source=self.handle)

    def send(self, destination: int | str, payload: Any) -> None:
        """One-way message (session 0): no reply, no Deferred."""
        self.node.send(destination, payload, source=self.handle)

    def stopped(self) -> None:
        """Called once when the service is removed from its node (or the node stops)."""
