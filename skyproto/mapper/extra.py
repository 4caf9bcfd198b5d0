"""What a skyproto node puts in the EPMD ``Extra`` field: a pure CBOR codec.

Always a small CBOR map, ``{"harbor": id}``, plus ``"endpoint": "<client endpoint>"``
when the node's harbor endpoint is not a plain TCP port (``unix:``, ``ssl:``,
``loopback:``, any plugin). The harbor id is always there so that a resolver can tell a
skyproto registration from an Erlang one and check it reached the harbor it wanted.
A registration that is not a harbor (the master: ``skymaster``) carries a role instead,
``{"role": "master"}``, plus the endpoint under the same rule.
Genuine epmd stores Extra untouched (up to 1020 bytes) and echoes it in PORT2_RESP;
Erlang nodes ignore it. :func:`decode_extra` is strict and total: an Extra that is not
exactly ours (an Erlang node's empty one, another program's bytes, a malformed map)
decodes to None, and such a node is dialled at its ALIVE2 port.
"""

from __future__ import annotations

from typing import Final

import attrs

from ..address import HARBOR_MAX, HARBOR_MIN, check_harbor
from ..errors import ProtocolError
from ..wire.codec import decode_cbor, encode_cbor
from .epmd import MAX_EXTRA_BYTES

__all__ = [
    "EXTRA_ENDPOINT",
    "EXTRA_HARBOR",
    "EXTRA_ROLE",
    "MASTER_NAME",
    "ROLE_MASTER",
    "MapperExtra",
    "decode_extra",
    "encode_extra",
]

#: Extra-field key of the registering node's harbor id (always present in ours).
EXTRA_HARBOR: Final = "harbor"
#: Extra-field key of the client endpoint to dial, when that is not ``tcp:<ip>:<port>``.
EXTRA_ENDPOINT: Final = "endpoint"
#: Extra-field key of what a registration without a harbor id is (``"master"``).
EXTRA_ROLE: Final = "role"
#: The role of a master's registration.
ROLE_MASTER: Final = "master"
#: The name a master registers with its host's mapper unless told (``--name``).
MASTER_NAME: Final = "skymaster"


@attrs.frozen
class MapperExtra:
    """A skyproto EPMD Extra field, decoded: the harbor id (None for a registration that is
    not a harbor, which has a ``role`` instead) and, maybe, the endpoint to dial."""

    harbor: int | None
    endpoint: str | None = None
    role: str | None = None


def encode_extra(harbor: int | None, endpoint: str | None = None, *,
                 role: str | None = None) -> bytes:
    """The CBOR map a skyproto process puts in ALIVE2's Extra; ValueError above 1020 bytes.

    A node gives its ``harbor``; a registration that is not a harbor (a master) gives
    ``harbor=None`` and its ``role``. A bad harbor id (AddressError), a missing or empty
    role, or a bad endpoint is the caller's mistake: ValueError.
    """
    value: dict[str, object]
    if harbor is not None:
        value = {EXTRA_HARBOR: check_harbor(harbor)}
    elif role:
        value = {EXTRA_ROLE: role}
    else:
        raise ValueError("a mapper Extra needs a harbor id or a role")
    if endpoint is not None:
        if not endpoint or "\x00" in endpoint:
            raise ValueError(f"cannot advertise the endpoint {endpoint!r}")
        value[EXTRA_ENDPOINT] = endpoint
    data = encode_cbor(value)
    if len(data) > MAX_EXTRA_BYTES:
        raise ValueError(
            f"the mapper Extra for endpoint {endpoint!r} is {len(data)} bytes; "
            f"epmd accepts at most {MAX_EXTRA_BYTES}"
        )
    return data


def decode_extra(data: bytes) -> MapperExtra | None:
    """Our Extra, or None if ``data`` is not exactly one (empty, malformed, someone else's).

    Strict and total: a CBOR map with text keys whose ``harbor`` is an int in 1..255 (or,
    with no ``harbor`` key at all, whose ``role`` is a non-empty string) and whose
    ``endpoint``, if present, is a non-empty string without NUL. Unknown keys are ignored
    (room for later versions; a harbor's ``role`` too); anything else yields None, never
    an exception.
    """
    if not data or len(data) > MAX_EXTRA_BYTES:
        return None
    try:
        value = decode_cbor(data)
    except ProtocolError:
        return None
    if type(value) is not dict:
        return None
    harbor = value.get(EXTRA_HARBOR)
    role = None
    if EXTRA_HARBOR not in value:
        role = value.get(EXTRA_ROLE)
        if type(role) is not str or not role:
            return None
    elif type(harbor) is not int or not HARBOR_MIN <= harbor <= HARBOR_MAX:
        return None
    endpoint = value.get(EXTRA_ENDPOINT)
    if endpoint is not None and (type(endpoint) is not str or not endpoint or "\x00" in endpoint):
        return None
    return MapperExtra(harbor, endpoint, role)
