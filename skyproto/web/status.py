"""The master's table as one JSON object: ``skyproto status --json`` and ``/status.json``."""

from __future__ import annotations

from typing import Any

from ..master.registry import Table

__all__ = ["status_object"]


def status_object(table: Table, store: str = "memory") -> dict[str, Any]:
    """The ``--json`` form of the master's table: harbors (id, node name, endpoint,
    incarnation, up since in seconds of the epoch), global names (name -> handle, plain
    32-bit integers, sorted by name), the groups (name -> member handles), the table's
    sequence number, what keeps the state
    (``store``: memory or etcd) and its ``revision`` (the sequence: etcd's revision with
    the etcd store, so any master of one cluster answers comparably)."""
    return {
        "harbors": [
            {"id": r.harbor, "name": r.node, "endpoint": r.endpoint,
             "incarnation": r.incarnation, "up": True, "up_since": r.up_since}
            for r in table.harbors
        ],
        "names": dict(sorted(table.names.items())),
        "groups": {group: list(members) for group, members in sorted(table.groups.items())},
        "sequence": table.sequence,
        "store": store,
        "revision": table.sequence,
    }
