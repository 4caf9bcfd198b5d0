"""Every exception skyproto raises or errbacks with.

Decoders raise only :class:`ProtocolError`; callers of the cluster see one of the
:class:`CallError` subclasses, each saying plainly what went wrong.
"""

from __future__ import annotations


class SkyprotoError(Exception):
    """Base of every skyproto exception."""


class ProtocolError(SkyprotoError):
    """Bytes from a peer that do not follow the protocol: the connection is dropped."""


class CallError(SkyprotoError):
    """Base of everything a ``call`` can errback with."""


class FrameTooLarge(CallError, ValueError):
    """A frame to be sent is larger than the configured limit; nothing was sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class AddressError(SkyprotoError, ValueError):
    """A handle, harbor id, local id or node name is malformed or out of range."""


class AuthenticationFailed(SkyprotoError):
    """The peer could not prove the cluster secret (or we could not prove it to the peer)."""


class ConfigurationError(SkyprotoError):
    """A user mistake in options or configuration; its message is shown as one line."""


class NoSuchService(CallError):
    """No service answers to that handle or name."""


class CallTimeout(CallError):
    """No reply arrived within the call's timeout; the session has been freed."""


class HarborDown(CallError):
    """The link to the destination's harbor is down, or went down with the call pending."""


class QueueFull(CallError):
    """A bounded outbound queue (to a harbor whose link is coming up) is full."""


class MasterUnavailable(CallError):
    """The master could not be reached within the bounded wait; nothing was changed."""


class ServicesUnavailable(CallError):
    """The master could not list a harbor's services: no such harbor, or its node did not
    answer in time (``skyproto services``)."""


class NameConflict(SkyprotoError):
    """The master refused a name operation (taken by another handle, not ours, ...)."""


class JoinRefused(SkyprotoError):
    """The master refused this node (harbor id held by a live node, bad secret, version)."""


class RemoteError(CallError):
    """The remote handler raised; carries the remote exception's type name and message."""

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message
