"""Nodes, services and harbor links over loopback: every failure semantic, deterministically."""

import gc

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from skyproto.address import make_handle
from skyproto.errors import (
    CallTimeout,
    FrameTooLarge,
    HarborDown,
    NoSuchService,
    QueueFull,
    RemoteError,
)
from skyproto.interfaces import IHarborLink, IMessageSink, IServiceBehaviour
from skyproto.node.node import Node
from skyproto.services import Echo, Relay

from .cluster import (
    SECRET,
    Collector,
    Failing,
    Parked,
    failure_of,
    make_node,
    mesh,
    network,
    result_of,
)


def test_interfaces():
    _clock, (a, _b) = mesh(2)
    link = a.router.peers[2].link
    assert verifyObject(IHarborLink, link)
    assert verifyObject(IMessageSink, a.router)
    assert verifyObject(IServiceBehaviour, Echo())


def test_local_call_is_asynchronous_and_touches_no_socket():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(Echo())
    d = node.call("ECHO", {"k": [1, 2]})
    assert not d.called
    clock.advance(0)
    assert result_of(d) == {"k": [1, 2]}
    assert network(clock).connections == ()


def test_local_messages_keep_per_sender_order():
    clock = Clock()
    node = Node(1, clock, SECRET)
    sink = Collector()
    node.spawn(sink, ".sink")
    for i in range(50):
        node.send(".sink", i)
    clock.advance(0)
    assert [payload for _, _, payload in sink.received] == list(range(50))
    assert all(session == 0 for _, session, _ in sink.received)


def test_remote_call_by_handle_and_name():
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    assert echo == make_handle(2, 2)
    d = a.call(echo, ["hello", b"\x00\xff", 3.5])
    clock.advance(0)
    assert result_of(d) == ["hello", b"\x00\xff", 3.5]
    a.register_name("REMOTE_ECHO", echo)
    d = a.call("REMOTE_ECHO", "again")
    clock.advance(0)
    assert result_of(d) == "again"


def test_remote_one_way_send_is_fifo():
    clock, (a, b) = mesh(2)
    sink = Collector()
    handle = b.spawn(sink)
    for i in range(100):
        a.send(handle, i)
    clock.advance(0)
    assert [p for _, _, p in sink.received] == list(range(100))
    assert all(source == a.handle for source, _, _ in sink.received)


def test_local_names_never_leave_the_node_but_resolve_locally():
    clock, (a, b) = mesh(2)
    b.spawn(Collector(), ".private")
    failure_of(a.call(".private", 1), NoSuchService)
    d = b.call(".private", 1)
    clock.advance(0)
    assert result_of(d) == "ok"


def test_unknown_name_and_unknown_handle():
    clock, (a, _b) = mesh(2)
    failure = failure_of(a.call("NOBODY", 1), NoSuchService)
    assert "NOBODY" in str(failure.value)
    failure_of(a.call(make_handle(1, 999), 1), NoSuchService)  # local, at once
    d = a.call(make_handle(2, 999), 1)  # remote: the other node says so
    clock.advance(0)
    assert "02000" in str(failure_of(d, NoSuchService).value).replace("0x", "")


def test_remote_error_carries_type_and_message_and_link_stays_up():
    clock, (a, b) = mesh(2)
    bad = b.spawn(Failing())
    echo = b.spawn(Echo())
    d = a.call(bad, "x")
    clock.advance(0)
    error = failure_of(d, RemoteError).value
    assert error.remote_type == "ValueError"
    assert error.message == "bad payload 'x'"
    d = a.call(echo, "still up")
    clock.advance(0)
    assert result_of(d) == "still up"


def test_timeout_frees_the_session_and_late_reply_is_dropped():
    clock, (a, b) = mesh(2)
    parked = Parked()
    handle = b.spawn(parked)
    d = a.call(handle, "x", timeout=2)
    clock.advance(0)
    assert a.sessions.pending == 1
    clock.advance(2)
    failure_of(d, CallTimeout)
    assert a.sessions.pending == 0
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        parked.waiting[0].callback("too late")
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("unknown or expired session" in e.get("log_format", "") for e in events)


def test_default_timeout_per_node():
    clock, (a, b) = mesh(2, default_timeout=1.5)
    d = a.call(b.spawn(Parked()), "x")
    clock.advance(1.5)
    failure_of(d, CallTimeout)


def test_cancel_frees_the_session():
    clock, (a, b) = mesh(2)
    d = a.call(b.spawn(Parked()), "x")
    clock.advance(0)
    d.cancel()
    failure_of(d, CancelledError)
    assert a.sessions.pending == 0


def test_cut_link_fails_every_pending_call_at_once_and_spares_others():
    clock, (a, b, c) = mesh(3)
    to_b = [a.call(b.spawn(Parked()), i) for i in range(3)]
    to_c_service = c.spawn(Parked())
    to_c = a.call(to_c_service, "c")
    clock.advance(0)
    link = a.router.peers[2].link
    link.transport.connection.cut()
    clock.advance(0)
    for d in to_b:
        assert "harbor 2" in str(failure_of(d, HarborDown).value)
    assert not to_c.called
    failure_of(a.call(make_handle(2, 2), "now"), HarborDown)  # down: fails at once


def test_silent_peer_is_declared_down_by_heartbeats_then_relinks():
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    pending = a.call(b.spawn(Parked()), "x", timeout=60)
    clock.advance(0)
    a.router.peers[2].link.transport.connection.pause()
    for _ in range(40):
        clock.advance(0.1)
        if pending.called:
            break
    assert "silent for 3.0 s" in str(failure_of(pending, HarborDown).value)
    assert 3.0 <= clock.seconds() <= 3.1
    for _ in range(100):  # the router redials with backoff
        clock.advance(0.1)
    d = a.call(echo, "back")
    clock.advance(0)
    assert result_of(d) == "back"


def test_bad_frame_drops_only_that_link():
    clock, (a, b, c) = mesh(3)
    pending = a.call(b.spawn(Parked()), "x")
    echo_c = c.spawn(Echo())
    clock.advance(0)
    b.router.peers[1].link.transport.write(b"\x00\x00\x00\x02\x07\x07")  # unknown frame kind
    clock.advance(0)
    failure_of(pending, HarborDown)
    d = a.call(echo_c, "fine")
    clock.advance(0)
    assert result_of(d) == "fine"


def test_oversized_payload_fails_the_call_not_the_link():
    clock, (a, b) = mesh(2, max_message=1024)
    echo = b.spawn(Echo())
    failure_of(a.call(echo, b"x" * 2000), FrameTooLarge)
    d = a.call(echo, b"x" * 500)
    clock.advance(0)
    assert result_of(d) == b"x" * 500


def test_unencodable_payload_is_a_type_error():
    _clock, (a, b) = mesh(2)
    failure_of(a.call(b.spawn(Echo()), object()), TypeError)


def test_unreturnable_reply_is_a_remote_error():
    class Bad(Echo):
        def receive(self, source, session, payload):
            return object()

    clock, (a, b) = mesh(2)
    d = a.call(b.spawn(Bad()), 1)
    clock.advance(0)
    assert failure_of(d, RemoteError).value.remote_type == "TypeError"


def test_async_handler_awaits_a_call():
    clock, (a, b, c) = mesh(3)
    echo = c.spawn(Echo())
    relay = b.spawn(Relay())
    d = a.call(relay, [echo, "via b"])
    clock.advance(0)
    assert result_of(d) == "via b"
    d = a.call(relay, [make_handle(3, 77), "nobody"])
    clock.advance(0)
    assert failure_of(d, RemoteError).value.remote_type == "NoSuchService"


def test_messages_queue_while_the_link_comes_up_and_overflow_is_an_error():
    clock = Clock()
    frame_size = 4 + 14 + 1  # length prefix, data header, a small CBOR int
    a = make_node(clock, 1, max_queue_bytes=2 * frame_size)
    b = make_node(clock, 2)
    echo = b.spawn(Echo())
    a.add_peer(2, "loopback:h2")
    assert a.router.state(2) == "dialing"
    first, second = a.call(echo, 1), a.call(echo, 2)
    refused = failure_of(a.call(echo, 3), QueueFull)
    assert f"{2 * frame_size} bytes already wait" in str(refused.value)
    clock.advance(0)
    assert (result_of(first), result_of(second)) == (1, 2)


def test_unreachable_peer_fails_queued_calls_and_retries():
    clock = Clock()
    a = make_node(clock, 1)
    a.add_peer(2, "loopback:h2")
    d = a.call(make_handle(2, 2), "x")
    clock.advance(0)
    assert "unreachable" in str(failure_of(d, HarborDown).value)
    assert a.router.state(2) == "backoff"
    b = make_node(clock, 2)
    echo = b.spawn(Echo())
    for _ in range(20):
        clock.advance(0.1)
    d = a.call(echo, "up now")
    clock.advance(0)
    assert result_of(d) == "up now"


def test_unknown_harbor_fails_at_once():
    _clock, (a, _) = mesh(2)
    assert "not known" in str(failure_of(a.call(make_handle(9, 2), "x"), HarborDown).value)


def test_wrong_secret_is_refused_and_nothing_links():
    clock = Clock()
    a = make_node(clock, 1)
    b = make_node(clock, 2, secret=b"another secret, 16+")
    echo = b.spawn(Echo())
    a.add_peer(2, "loopback:h2")
    d = a.call(echo, "x")
    clock.advance(0)
    assert "secret" in str(failure_of(d, HarborDown).value)
    assert a.router.state(2) == "backoff"
    assert 1 not in b.router.peers or b.router.peers[1].link is None


def test_a_restarted_harbor_links_again_as_its_new_incarnation():
    clock, (a, b) = mesh(2)
    pending = a.call(b.spawn(Parked()), "x")
    clock.advance(0)
    # harbor 2 crashes (its link drops) and a new process, a new incarnation, dials harbor 1
    b.router.stopping = True
    for port in b._ports:
        port.stopListening()
    a.router.peers[2].link.transport.connection.cut("crash")
    clock.advance(0)
    assert "harbor 2" in str(failure_of(pending, HarborDown).value)
    b2 = Node(2, clock, SECRET, incarnation=b.incarnation + 1)
    b2.listen("loopback:h2b")
    echo = b2.spawn(Echo())
    b2.add_peer(1, "loopback:h1")
    clock.advance(0)
    assert a.router.peers[2].link.peer_incarnation == b2.incarnation
    d = a.call(echo, "new")
    clock.advance(0)
    assert result_of(d) == "new"


def test_an_impostor_cannot_take_a_live_harbor_id_over_a_link():
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    impostor = Node(2, clock, SECRET, incarnation=b.incarnation + 1)
    impostor.listen("loopback:impostor")
    impostor.add_peer(1, "loopback:h1")
    clock.advance(0)
    link = a.router.peers[2].link
    assert link.peer_incarnation == b.incarnation  # the live node keeps its link
    assert "held by live incarnation" in impostor.router.peers[1].last_error
    d = a.call(echo, "still the real one")
    clock.advance(0)
    assert result_of(d) == "still the real one"


def test_calls_to_a_down_harbor_say_why():
    clock = Clock()
    a = make_node(clock, 1)
    b = make_node(clock, 2, secret=b"another secret, 16+")
    a.add_peer(2, "loopback:h2")
    clock.advance(0)
    for _ in range(2):  # queued during the dial, and made while waiting to redial
        failure = failure_of(a.call(make_handle(2, 2), "x"), HarborDown)
        assert "secret" in str(failure.value)
        clock.advance(0)
    del b


def test_both_sides_dial_and_keep_one_link_per_pair():
    clock, nodes = mesh(4)
    for _ in range(5):
        clock.advance(0.1)
    up = {(n.harbor, p.harbor) for n in nodes for p in n.router.peers.values() if p.link}
    assert len(up) == 4 * 3
    assert len(network(clock).connections) == 4 * 3 // 2
    for node in nodes:
        for peer in node.router.peers.values():
            other = nodes[peer.harbor - 1].router.peers[node.harbor].link
            assert peer.link.transport.connection is other.transport.connection


def test_stop_fails_pending_calls_and_closes_links():
    clock, (a, b) = mesh(2)
    pending = a.call(b.spawn(Parked()), "x")
    clock.advance(0)
    a.stop()
    clock.advance(0)
    failure_of(pending, HarborDown)
    assert network(clock).connections == ()


def test_handler_returning_a_deferred():
    clock, (a, b) = mesh(2)
    parked = Parked()
    d = a.call(b.spawn(parked), "x")
    clock.advance(0)
    assert not d.called
    parked.waiting[0].callback("later")
    clock.advance(0)
    assert result_of(d) == "later"


def test_deferred_failure_in_handler_becomes_remote_error():
    clock, (a, b) = mesh(2)
    parked = Parked()
    d = a.call(b.spawn(parked), "x")
    clock.advance(0)
    parked.waiting[0].errback(KeyError("k"))
    clock.advance(0)
    assert failure_of(d, RemoteError).value.remote_type == "KeyError"


def test_kill_removes_service_and_names():
    clock = Clock()
    node = Node(1, clock, SECRET)
    handle = node.spawn(Echo())
    node.kill(handle)
    failure_of(node.call("ECHO", 1), NoSuchService)
    failure_of(node.call(handle, 1), NoSuchService)
    second = node.spawn(Echo())
    assert second != handle  # never reused while... and not even right after
    assert isinstance(Deferred(), Deferred)


def test_payload_the_receiver_cannot_read_fails_that_call_only():
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    d = a.call(echo, {1, 2})  # cbor2 encodes a set with a tag, which peers refuse
    clock.advance(0)
    error = failure_of(d, RemoteError).value
    assert error.remote_type == "ProtocolError" and "unreadable payload" in error.message
    d = a.call(echo, "link still up")
    clock.advance(0)
    assert result_of(d) == "link still up"


def test_unreadable_reply_fails_the_call():
    class SetReply(Echo):
        def receive(self, source, session, payload):
            return frozenset([1])

    clock, (a, b) = mesh(2)
    d = a.call(b.spawn(SetReply()), 1)
    clock.advance(0)
    assert failure_of(d, RemoteError).value.remote_type == "ProtocolError"


def test_oversized_reply_is_an_error_not_a_timeout():
    class Big(Echo):
        def receive(self, source, session, payload):
            return b"x" * 4096

    clock, (a, b) = mesh(2, max_message=1024)
    d = a.call(b.spawn(Big()), 1, timeout=5)
    clock.advance(0)
    assert failure_of(d, RemoteError).value.remote_type == "FrameTooLarge"


def test_a_reply_only_completes_a_call_to_its_own_harbor():
    clock, (a, b, c) = mesh(3)
    pending = a.call(b.spawn(Parked()), "x")
    clock.advance(0)
    session = next(iter(a.sessions._pending))
    # harbor 3 forges a reply to the call that went to harbor 2
    c.router.peers[1].link.send_data(c.handle, a.handle, session, 0, "forged")
    clock.advance(0)
    assert not pending.called
    assert a.sessions.pending == 1


def test_killing_a_foreign_handle_leaves_local_services_alone():
    clock = Clock()
    node = Node(1, clock, SECRET)
    local = node.spawn(Echo())
    failure = None
    try:
        node.kill(make_handle(2, local & 0xFFFFFF))
    except NoSuchService as e:
        failure = e
    assert failure is not None
    d = node.call("ECHO", "alive")
    clock.advance(0)
    assert result_of(d) == "alive"


def test_a_peer_that_does_not_read_makes_calls_fail_with_queue_full_not_memory():
    clock, (a, b) = mesh(2, max_outbound=64 * 1024)
    echo = b.spawn(Echo())
    b.router.peers[1].link.transport.pauseProducing()  # b stops reading from a
    payload = b"x" * 4096
    outcomes = []
    for _ in range(200):
        d = a.call(echo, payload, timeout=30)
        d.addBoth(outcomes.append)
        clock.advance(0)
    refused = [o for o in outcomes if isinstance(o, Failure) and o.check(QueueFull)]
    assert refused, "a slow peer must make calls fail, not grow the buffer forever"
    assert "wait for a slow peer" in str(refused[0].value)
    link = a.router.peers[2].link
    assert link.transport.unsent < 64 * 1024 + 64 * 1024 + 8192  # transport mark + our limit
    b.router.peers[1].link.transport.resumeProducing()
    clock.advance(0)
    assert not link.congested
    d = a.call(echo, "flowing again")
    clock.advance(0)
    assert result_of(d) == "flowing again"


def test_calls_in_flight_on_a_duplicate_link_get_their_replies():
    """Both dial at once: calls sent on the link that is retired still get their replies (the
    duplicate is drained, not dropped). Before, the closed duplicate lost them until their
    10 s timeout."""
    clock = Clock()
    a, b = make_node(clock, 1), make_node(clock, 2)
    echo_a, echo_b = a.spawn(Echo()), b.spawn(Echo())
    a.add_peer(2, "loopback:h2")
    b.add_peer(1, "loopback:h1")
    calls = []
    for step in range(6):  # calls keep going while the two links come up and one retires
        calls.append(a.call(echo_b, f"a{step}", timeout=30))
        calls.append(b.call(echo_a, f"b{step}", timeout=30))
        clock.advance(0)
    for _ in range(10):
        clock.advance(0.1)
    outcomes = [result_of(d) for d in calls]
    assert outcomes == [f"{side}{step}" for step in range(6) for side in "ab"]
    assert len(network(clock).connections) == 1
    assert a.router.state(2) == b.router.state(1) == "up"


def test_an_endpoint_is_parsed_once_for_every_node_on_a_reactor(monkeypatch):
    """A full mesh of N nodes in one process parsed each endpoint N-1 times (a plugin
    lookup each: 65,000 of them at 255 nodes); now once per reactor, and the kept
    endpoints stay bounded (each restart of a peer on tcp:0 brings a new string)."""
    from skyproto import endpoints

    parsed = []
    real = endpoints.clientFromString

    def counting(reactor, description):
        parsed.append(description)
        return real(reactor, description)

    monkeypatch.setattr(endpoints, "clientFromString", counting)
    clock = Clock()
    nodes = [make_node(clock, harbor) for harbor in (1, 2, 3, 4)]
    for node in nodes:
        for harbor in (5, 6):
            node.router.add_peer(harbor, f"loopback:h{harbor}", dial=False)
    assert sorted(parsed) == ["loopback:h5", "loopback:h6"]
    assert nodes[0].router.client_endpoint("loopback:h5") is nodes[3].router.client_endpoint(
        "loopback:h5")
    monkeypatch.setattr(endpoints, "MAX_PARSED_ENDPOINTS", 10)
    for restart in range(50):
        nodes[0].router.add_peer(7, f"loopback:h7-{restart}", dial=False)
    assert len(endpoints._parsed[clock]) <= 10


def test_a_dial_to_a_silent_endpoint_gives_up_at_the_handshake_timeout_and_backs_off_briefly():
    """A peer that accepts and never answers: the dial fails at the handshake timeout (not
    Twisted's 30 s connect timeout), and redials stay within the 2 s backoff cap (they grew
    to 33 s before)."""
    clock = Clock()
    a = make_node(clock, 1)
    serverFromString(clock, "loopback:silent").listen(Factory.forProtocol(Protocol))
    a.add_peer(2, "loopback:silent")
    clock.advance(0)
    assert a.router.state(2) == "handshaking"
    clock.advance(5.0)
    assert a.router.state(2) == "backoff"
    assert a.router.peers[2].last_error.endswith("unreachable: no handshake within 5 s")
    delays = []
    for _ in range(8):
        retry = a.router.peers[2].core.retry
        assert retry is not None
        delays.append(retry.getTime() - clock.seconds())
        clock.advance(delays[-1])
        assert a.router.state(2) == "handshaking"
        clock.advance(5.0)
    assert max(delays) <= 2.0 * 1.2


def test_a_node_dials_at_most_max_dials_peers_at_once(events):
    """A node told of a whole cluster at once dials a few peers at a time (255 in one
    process never formed a mesh: every handshake of a wave started in one reactor pass and
    timed out); the rest wait their turn, and a peer removed while waiting is never dialed
    (nor is its cancelled turn logged as an unhandled error)."""
    clock = Clock()
    hub = make_node(clock, 1)
    hub.router.max_dials = 3
    others = [make_node(clock, harbor) for harbor in range(2, 12)]
    started = []
    dial_now = hub.router._dial_now

    def counted(core):
        started.append(core.harbor)
        return dial_now(core)

    hub.router._dial_now = counted
    for other in others:
        hub.add_peer(other.harbor, f"loopback:h{other.harbor}")
    assert hub.router._dials_in_progress == 3 and len(started) == 3
    hub.router.remove_peer(11, "gone before its turn")
    gc.collect()
    assert not [e for e in events if e.get("log_level") == LogLevel.critical]
    most = 0
    for _ in range(200):
        clock.advance(0.01)
        most = max(most, hub.router._dials_in_progress)
    assert most <= 3
    assert sorted(started) == list(range(2, 11))  # 11 was removed while it waited
    assert all(hub.router.state(h) == "up" for h in range(2, 11))
    assert hub.router._dials_in_progress == 0 and not hub.router._dial_queue
