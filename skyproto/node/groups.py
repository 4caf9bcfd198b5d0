"""Which member of a service group takes a call: the pick policies of ``call_group``.

Pure (no I/O, no reactor): a :class:`GroupPicker` is handed the group's live members and
a way to read load, and answers one handle. The policies, as the seed thread's author put
it ("random choice or CPU pressure"), and what Consul and Erlang's pg users reach for:

- ``round_robin`` (default): each member in turn, per group;
- ``random``: any member, from the node's injected random source;
- ``local_first``: a member on this harbor if there is one (in turn), else round robin;
- ``least_loaded``: the member whose harbor reports the fewest requests in progress and
  queued (piggybacked on heartbeats), counting the calls this node still waits on there,
  so a slow or frozen member is steered around before its heartbeats stop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Final

from ..address import harbor_of
from ..errors import ConfigurationError

POLICIES: Final = ("round_robin", "random", "local_first", "least_loaded")


class GroupPicker:
    """Picks members; keeps only each group's round-robin position."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._turn: dict[str, int] = {}

    def pick(self, group: str, members: Sequence[int], policy: str, local_harbor: int,
             load_of: Callable[[int], float]) -> int:
        """One of ``members`` (sorted, non-empty) by ``policy``; ``load_of(handle)``."""
        if not members:
            raise ValueError("no member to pick from")
        if policy == "round_robin":
            return self._next(group, members)
        if policy == "random":
            return self.rng.choice(list(members))
        if policy == "local_first":
            local = [m for m in members if harbor_of(m) == local_harbor]
            return self._next(group, local or members)
        if policy == "least_loaded":
            lowest = min(load_of(m) for m in members)
            return self._next(group, [m for m in members if load_of(m) == lowest])
        raise ConfigurationError(
            f"unknown pick policy {policy!r}; choose from {', '.join(POLICIES)}")

    def _next(self, group: str, members: Sequence[int]) -> int:
        turn = self._turn.get(group, 0)
        self._turn[group] = turn + 1
        return members[turn % len(members)]
