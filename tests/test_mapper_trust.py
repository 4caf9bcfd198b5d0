"""Mapper answers are not trusted: a node dialing ``name@host`` checks in the handshake that
the peer is the harbor and the incarnation it expected; a mismatch fails the dial with a
clear error and drops the cached answer, so the mapper is asked again.

The mapper (EPMD) is unauthenticated by design: anyone on a host can register a name there,
or hold its port. It may only ever cost a failed dial, never a link to the wrong process.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from skyproto.errors import HarborDown
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.node.resolver import NodeResolver
from skyproto.services import Echo
from skyproto.testing import settle

from .cluster import SECRET, failure_of, result_of


class ScriptedMapper(NodeResolver):
    """A resolver whose answers the test sets (what a rogue or stale mapper would say)."""

    def __init__(self, clock: Clock, answers: dict[str, str]) -> None:
        super().__init__(clock)
        self.answers = answers
        self.invalidated: list[str] = []

    def resolve_node(self, node: Any) -> Deferred[str]:
        return succeed(self.answers[str(node)])

    def invalidate(self, node: Any) -> bool:
        self.invalidated.append(str(node))
        return True


def listening(clock: Clock, harbor: int, endpoint: str, incarnation: int | None = None,
              resolver: NodeResolver | None = None) -> Node:
    node = Node(harbor, clock, SECRET, incarnation=incarnation, resolver=resolver)
    node.listen(endpoint)
    return node


def test_a_mapper_pointing_at_another_harbor_fails_the_dial_and_is_asked_again() -> None:
    clock = Clock()
    mapper = ScriptedMapper(clock, {"beta@hosta": "loopback:gamma"})  # the wrong node
    alpha = listening(clock, 1, "loopback:alpha", resolver=mapper)
    beta = listening(clock, 2, "loopback:beta")
    listening(clock, 3, "loopback:gamma").spawn(Echo())
    echo = beta.spawn(Echo())
    alpha.add_peer(2, "beta@hosta")
    call = alpha.call(echo, "for beta")
    settle(clock, 0.1)
    error = failure_of(call, HarborDown)
    assert "dialed harbor 2 but harbor 3 answered" in str(error.value)
    assert mapper.invalidated == ["beta@hosta"]
    # once the mapper tells the truth, the next dial links to beta itself
    mapper.answers["beta@hosta"] = "loopback:beta"
    settle(clock, 3.0)
    again = alpha.call(echo, "for beta")
    settle(clock, 0.1)
    assert result_of(again) == "for beta"
    assert alpha.router.peers[2].link is not None
    assert alpha.router.peers[2].link.peer_incarnation == beta.incarnation


def test_a_mapper_pointing_at_another_incarnation_fails_the_dial() -> None:
    """The master says which process holds harbor 2; a mapper naming another process that
    claims harbor 2 (a stale registration, or one with the secret but not the master's
    blessing) is refused in the handshake, before any call reaches it."""
    clock = Clock()
    serverFromString(clock, "loopback:master").listen(
        MasterService(InMemoryRegistry(), clock, SECRET, auto_grace=0, name_grace=0))
    mapper = ScriptedMapper(clock, {"beta@hosta": "loopback:impostor"})
    alpha = listening(clock, 1, "loopback:alpha", resolver=mapper)
    beta = listening(clock, 2, "loopback:beta", incarnation=100)
    impostor = listening(clock, 2, "loopback:impostor", incarnation=99)
    impostor_echo = impostor.spawn(Echo())
    echo = beta.spawn(Echo())
    assert impostor_echo == echo  # the same handle: only the incarnation tells them apart
    alpha.join_master("loopback:master", "alpha@hosta", "alpha@hosta")
    beta.join_master("loopback:master", "beta@hosta", "beta@hosta")
    settle(clock, 0.5)
    assert alpha.master is not None and 2 in alpha.master.harbors
    call = alpha.call(echo, "for beta")
    settle(clock, 0.1)
    error = failure_of(call, HarborDown)
    assert "incarnation 100 but incarnation 99 answered" in str(error.value), error.value
    assert "beta@hosta" in mapper.invalidated
    mapper.answers["beta@hosta"] = "loopback:beta"
    settle(clock, 3.0)
    again = alpha.call(echo, "for beta")
    settle(clock, 0.1)
    assert result_of(again) == "for beta"


@pytest.mark.parametrize("expected", [None, 7])
def test_a_static_peer_is_checked_by_harbor_and_by_incarnation_when_known(
        expected: int | None) -> None:
    clock = Clock()
    alpha = listening(clock, 1, "loopback:alpha")
    listening(clock, 2, "loopback:beta", incarnation=8).spawn(Echo())
    if expected is not None:  # what a master would have said
        alpha._expected_incarnation = lambda harbor: expected  # type: ignore[method-assign]
        alpha.router.expected_incarnation = alpha._expected_incarnation
    alpha.add_peer(2, "loopback:beta")
    call = alpha.call(0x02000002, "hi")
    settle(clock, 0.1)
    if expected is None:
        assert result_of(call) == "hi"
    else:
        assert "incarnation 7 but incarnation 8 answered" in str(
            failure_of(call, HarborDown).value)
