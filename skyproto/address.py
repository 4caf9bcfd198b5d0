"""Handles and node names.

A handle is a plain ``int`` of 32 bits: the high 8 bits are the harbor id (1..255, one
per node; 0 is reserved) and the low 24 bits the service's local id on that node
(1..2**24-1; 0 is reserved). Its text form is ``:`` followed by 8 hex digits, as in
skynet (``:0100002a`` is local id 42 on harbor 1). Plain ints keep the data path fast;
these functions do the checking.
"""

from __future__ import annotations

import re
import socket
from typing import Final

import attrs

from .errors import AddressError

HARBOR_MIN: Final = 1
HARBOR_MAX: Final = 255
LOCAL_MIN: Final = 1
LOCAL_MAX: Final = (1 << 24) - 1
HARBOR_SHIFT: Final = 24
LOCAL_MASK: Final = LOCAL_MAX
_HANDLE_TEXT: Final = re.compile(r":[0-9a-fA-F]{8}")


def check_harbor(harbor: int) -> int:
    """Return ``harbor`` if it is a valid harbor id (1..255), else raise AddressError."""
    if type(harbor) is not int or not HARBOR_MIN <= harbor <= HARBOR_MAX:
        raise AddressError(f"harbor id must be an integer from 1 to 255, not {harbor!r}")
    return harbor


def check_local(local: int) -> int:
    """Return ``local`` if it is a valid local id (1..2**24-1), else raise AddressError."""
    if type(local) is not int or not LOCAL_MIN <= local <= LOCAL_MAX:
        raise AddressError(f"local id must be an integer from 1 to {LOCAL_MAX}, not {local!r}")
    return local


def make_handle(harbor: int, local: int) -> int:
    """Build the 32-bit handle for local id ``local`` on harbor ``harbor``."""
    return (check_harbor(harbor) << HARBOR_SHIFT) | check_local(local)


def check_handle(handle: int) -> int:
    """Return ``handle`` if both its parts are in range, else raise AddressError."""
    if type(handle) is not int or not 0 <= handle <= 0xFFFFFFFF:
        raise AddressError(f"a handle is a 32-bit unsigned integer, not {handle!r}")
    check_harbor(handle >> HARBOR_SHIFT)
    check_local(handle & LOCAL_MASK)
    return handle


def harbor_of(handle: int) -> int:
    """The harbor id in the top 8 bits of ``handle`` (no range check: the fast path)."""
    return handle >> HARBOR_SHIFT


def local_of(handle: int) -> int:
    """The local id in the low 24 bits of ``handle``."""
    return handle & LOCAL_MASK


def format_handle(handle: int) -> str:
    """The text form, ``:`` and 8 lowercase hex digits."""
    return f":{check_handle(handle):08x}"


def parse_handle(text: str) -> int:
    """Parse the text form (``:0100002a``) back to a handle, checking both parts."""
    if not _HANDLE_TEXT.fullmatch(text):
        raise AddressError(f"a handle is written ':' and 8 hex digits, not {text!r}")
    return check_handle(int(text[1:], 16))


@attrs.frozen
class NodeName:
    """An Erlang-style node name ``name@host``."""

    name: str
    host: str

    def __str__(self) -> str:
        return f"{self.name}@{self.host}"

    @classmethod
    def parse(cls, text: str, default_host: str | None = None) -> NodeName:
        """Parse ``name@host``; a bare ``name`` takes ``default_host`` (the short host name)."""
        name, at, host = text.partition("@")
        if not at:
            host = default_host if default_host is not None else short_hostname()
        if not name or not host or "@" in host:
            raise AddressError(f"a node name is written name@host, not {text!r}")
        if len(name.encode("utf-8")) > 255 or "\x00" in name or any(c.isspace() for c in name):
            raise AddressError(f"node name part {name!r} is empty, too long or has spaces/NUL")
        return cls(name, host)


def short_hostname() -> str:
    """The host part Erlang's ``-sname`` would use: the host name up to its first dot."""
    return socket.gethostname().split(".", 1)[0] or "localhost"
