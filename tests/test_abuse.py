"""Abusive peers against real daemons: each loses only its own connection, with a reason.

DESIGN.md section 7 ("malformed or oversized frame: peer's connection dropped with a logged
reason; the daemon keeps serving everyone else") and EPMD.md section 7, over real sockets on
127.0.0.1. One cluster per test: a skymaster, a skymapper (--packet-timeout 2, so idle
mapper connections go within the test), node alpha (harbor 1, SIMPLEDB, a line gate) and
node beta (harbor 2, a packet gate whose requests cross the harbor link to alpha). Five
listening ports: master, harbor link (alpha's), line gate, packet gate, mapper.

After (and during) every abuse the test checks that the daemons still serve everyone else:
SET/GET through both gates, the master's table read by a fresh authenticated observer (and
``skyproto status`` at the start and end), a fresh harbor handshake proved by alpha, and
NAMES from the mapper still listing both nodes. Memory is VmRSS from /proc; every drop the
daemon makes is matched to its logged reason through the client's own port number.

The EPMD.md section 7 rules themselves (lengths 0 and >= 3058, pipelining, byte-at-a-time,
idle timeout, unknown opcodes, resets) are tested by example in tests/test_mapper_server.py
and tests/test_epmd_codec.py; here the real skymapper gets the same abuse as every port.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from skyproto.harbor.handshake import LinkHandshake
from skyproto.harbor.messages import HARBOR_CODEC, LinkChallenge
from skyproto.mapper.epmd import Alive2Request, PortPlease2Request, decode_port2_reply
from skyproto.mapper.epmd import encode_request as epmd_request
from skyproto.master.messages import MASTER_CODEC, MasterChallenge

from .abuse import (
    KnownBug,
    close_all,
    closed_by_peer,
    connect,
    deeply_nested_cbor,
    framed,
    gate_line,
    gate_packet,
    harbor_challenge,
    held,
    hello_frame_for_harbor,
    hello_frame_for_master,
    local_port,
    mapper_names,
    master_table,
    open_fds,
    open_many,
    poll_until,
    raise_fd_limit,
    read_until_closed,
    recv_exactly,
    recv_frame,
    rss_mb,
    trickle,
    wait_line,
    wait_lines,
)
from .processes import Daemon, daemons

__all__ = ["daemons"]

pytestmark = pytest.mark.process
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))

#: connections held at once on every port (scaled down if the fd limit is too low)
IDLE, HALF_OPEN = 1000, 200
#: how much a daemon's resident memory may grow over a whole test
RSS_BOUND_MB = 50.0
MAPPER_PACKET_TIMEOUT = 2
HANDSHAKE_TIMEOUT = 5  # the master's and the harbor link's default
LIMIT = r"\d+"  # before the handshake: 256 KiB (master), 4 KiB (harbor); after: --max-frame


@attrs.define
class Sky:
    """The daemons of one test, their ports, and the checks that they still serve."""

    master: Daemon
    mapper: Daemon
    alpha: Daemon
    beta: Daemon
    secret: bytes
    secret_file: Path
    master_port: int
    mapper_port: int
    harbor_port: int
    line_gate: int
    packet_gate: int
    checks: int = 0

    @property
    def all(self) -> dict[str, Daemon]:
        return {"master": self.master, "mapper": self.mapper, "alpha": self.alpha,
                "beta": self.beta}

    def daemon_for(self, port: int) -> Daemon:
        return {self.master_port: self.master, self.mapper_port: self.mapper,
                self.harbor_port: self.alpha, self.line_gate: self.alpha,
                self.packet_gate: self.beta}[port]

    def serving(self) -> None:
        """Everyone else is still served, by every daemon."""
        self.checks += 1
        key = f"k{self.checks}"
        assert gate_line(self.line_gate, f"SET {key} v{self.checks}", f"GET {key}") == [
            "OK", f"VALUE v{self.checks}"]
        assert gate_packet(self.packet_gate, f"GET {key}") == [f"VALUE v{self.checks}"]
        table = master_table(self.master_port, self.secret)
        assert [record.harbor for record in table.harbors] == [1, 2]
        assert table.names.get("SIMPLEDB") == 0x01000002
        assert harbor_challenge(self.harbor_port, self.secret, 1).harbor == 1
        names = [name for name, _ in mapper_names(self.mapper_port).nodes]
        assert "alpha" in names and "beta" in names

    def rss(self) -> dict[str, float]:
        return {name: rss_mb(d.process.pid) for name, d in self.all.items()}

    def assert_rss_bounded(self, before: dict[str, float]) -> None:
        after = self.rss()
        growth = {name: round(after[name] - before[name], 1) for name in before}
        print(f"RSS growth in MiB: {growth} (after: {after})")
        assert all(g < RSS_BOUND_MB for g in growth.values()), growth

    def status(self) -> dict[str, object]:
        """``skyproto status --json``, the user's way of asking the master."""
        result = subprocess.run(
            [SKYPROTO, "status", "--master", f"tcp:127.0.0.1:{self.master_port}",
             "--secret-file", str(self.secret_file), "--json"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        status: dict[str, object] = json.loads(result.stdout)
        return status

    def no_tracebacks(self) -> None:
        for name, daemon in self.all.items():
            output = daemon.output()
            assert "Traceback" not in output and "Unhandled" not in output, (
                f"{name} logged an unhandled error:\n{output[-4000:]}")
            assert daemon.process.poll() is None, f"{name} exited"


def start_sky(daemons: Callable[..., Daemon], *node_args: str) -> Sky:
    secret_file: Path = daemons.secret  # type: ignore[attr-defined]
    common = ["--secret-file", str(secret_file)]
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1", *common,
                     name="master")
    mapper = daemons("skymapper", "--listen", "tcp:0:interface=127.0.0.1",
                     "--packet-timeout", str(MAPPER_PACKET_TIMEOUT), name="mapper")
    master_port = int(wait_line(master, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)")[1])
    mapper_port = int(wait_line(mapper, r"skymapper listening on tcp:127\.0\.0\.1:(\d+)")[1])
    nodes = ["--master", f"tcp:127.0.0.1:{master_port}", "--mapper",
             f"tcp:127.0.0.1:{mapper_port}", "--gate", "tcp:0:interface=127.0.0.1", *common,
             *node_args]
    alpha = daemons("skynode", "--harbor", "1", "--name", "alpha", "--service", "simpledb",
                    *nodes, name="alpha")
    beta = daemons("skynode", "--harbor", "2", "--name", "beta", "--gate-framing", "packet",
                   *nodes, name="beta")
    gate = r"gate for SIMPLEDB listening on tcp:127\.0\.0\.1:(\d+)"
    sky = Sky(master, mapper, alpha, beta, secret_file.read_bytes().strip(), secret_file,
              master_port, mapper_port,
              int(wait_line(alpha, r"harbor 1, incarnation \d+, listening on "
                                   r"tcp:127\.0\.0\.1:(\d+)")[1]),
              int(wait_line(alpha, gate)[1]), int(wait_line(beta, gate)[1]))
    for node in (alpha, beta):
        wait_line(node, r"registered \w+ with the mapper")
    wait_line(beta, r"harbor 1 link up")
    wait_line(beta, r"joined the master")
    poll_until(lambda: master_table(master_port, sky.secret).names.get("SIMPLEDB"),
               "SIMPLEDB to be registered with the master", interval=0.05)
    return sky


@pytest.fixture
def sky(daemons):
    # 5 ports x (IDLE + HALF_OPEN) sockets here, and their other ends in the daemons, which
    # inherit this limit when they start
    raise_fd_limit(5 * (IDLE + HALF_OPEN) + 1024)
    sky = start_sky(daemons, "--gate-max-clients", str(2 * (IDLE + HALF_OPEN)))
    sky.serving()
    return sky


def port_pattern(sky: Sky, target: int, client: int) -> str:
    """How the daemon behind ``target`` names our connection in its log."""
    return rf"(127\.0\.0\.1:{client}\b|port={client}\))"


@attrs.frozen
class Abuse:
    """One abusive connection: what it sends, and how the daemon must answer it."""

    name: str
    port: str  #: a Sky attribute
    payload: bytes
    reason: str | None = None  #: the daemon closes, logging this (a regex)
    replies: tuple[str, ...] = ()  #: or the daemon answers with these (a gate), and stays
    then_close: bool = False  #: we close first (a truncated request)


HTTP = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: abuse\r\n\r\n"
GARBAGE = random.Random(7).randbytes(4096)
MASTER_HELLO = hello_frame_for_master()
ALIVE2_DEEP = epmd_request(Alive2Request(7777, 77, 0, 6, 5, "deep", b"\x81" * 1000 + b"\x00"))
NESTED = deeply_nested_cbor()

ABUSES = [
    # master
    Abuse("http", "master_port", HTTP, reason=rf"frame of \d+ bytes exceeds the limit of {LIMIT}"),
    Abuse("garbage frame", "master_port", framed(GARBAGE[:300]), reason="protocol error: "),
    Abuse("truncated hello", "master_port", MASTER_HELLO[:20], then_close=True),
    Abuse("huge length", "master_port", b"\xff\xff\xff\xff" + GARBAGE[:64],
          reason=rf"frame of 4294967295 bytes exceeds the limit of {LIMIT} bytes"),
    Abuse("deep CBOR", "master_port", framed(NESTED),
          reason=r"protocol error: malformed CBOR: .*depth"),
    # harbor link (alpha)
    Abuse("http", "harbor_port", HTTP, reason=rf"frame of \d+ bytes exceeds the limit of {LIMIT}"),
    Abuse("garbage frame", "harbor_port", framed(b"\x00" + GARBAGE[:300]),
          reason="protocol error: "),
    Abuse("data before the handshake", "harbor_port", framed(b"\x01" + GARBAGE[:30]),
          reason="protocol error: data before the handshake"),
    Abuse("truncated hello", "harbor_port", b"\x00\x00\x00\x40\x00\x85\x01", then_close=True),
    Abuse("huge length", "harbor_port", b"\xff\xff\xff\xff",
          reason=rf"frame of 4294967295 bytes exceeds the limit of {LIMIT} bytes"),
    Abuse("deep CBOR", "harbor_port", framed(b"\x00" + NESTED),
          reason=r"(protocol error: malformed CBOR: .*depth|exceeds the limit of 4096)"),
    # line gate (alpha): every line gets a reply, an over-long one a refusal and a close
    Abuse("http", "line_gate", HTTP + b"GET sentinel\n",
          replies=("ERROR usage: GET <key>", "ERROR unknown command Host:",
                   "ERROR unknown command User-Agent:", "ERROR empty request", "NOTFOUND")),
    Abuse("garbage", "line_gate", GARBAGE.replace(b"\n", b"") * 2 + b"\n",
          reason="request longer than 4096 bytes"),
    Abuse("binary lines", "line_gate", b"\xff\xfe\n\x00\x01\x02\nGET sentinel\n",
          replies=("ERROR requests are UTF-8 text", "ERROR unknown command \x00\x01\x02",
                   "NOTFOUND")),
    Abuse("truncated request", "line_gate", b"SET half", then_close=True),
    Abuse("huge line", "line_gate", b"x" * 5000, reason="request longer than 4096 bytes"),
    Abuse("deep nesting", "line_gate", b"SET deep " + b"[" * 4000 + b"\n", replies=("OK",)),
    # packet gate (beta): "GE" of HTTP is a 18245-byte length, over the 4096 limit
    Abuse("http", "packet_gate", HTTP, reason="request longer than 4096 bytes"),
    Abuse("huge length", "packet_gate", b"\xff\xff" + GARBAGE[:64],
          reason="request longer than 4096 bytes"),
    Abuse("garbage packets", "packet_gate",
          b"\x00\x03\xff\xfe\xfd\x00\x00\x00\x0cGET sentinel",
          replies=("ERROR requests are UTF-8 text", "ERROR empty request", "NOTFOUND")),
    Abuse("truncated packet", "packet_gate", b"\x00\x10GET", then_close=True),
    # mapper
    Abuse("http", "mapper_port", HTTP, reason=r"invalid packet size \(18245\)"),
    Abuse("garbage request", "mapper_port", struct.pack(">H", 300) + b"Q" + GARBAGE[:299],
          reason="unknown opcode 81"),
    Abuse("truncated ALIVE2", "mapper_port", ALIVE2_DEEP[:12], then_close=True),
    Abuse("huge length", "mapper_port", b"\xff\xff", reason=r"invalid packet size \(65535\)"),
    Abuse("pipelined", "mapper_port", b"\x00\x01n\x00\x01n", reason="bytes in packet"),
]


def read_replies(sky: Sky, abuse: Abuse, sock: socket.socket) -> list[str]:
    replies: list[str] = []
    if abuse.port == "packet_gate":
        for _ in abuse.replies:
            (size,) = struct.unpack(">H", recv_exactly(sock, 2))
            replies.append(recv_exactly(sock, size).decode())
        return replies
    buffer = b""
    while len(replies) < len(abuse.replies):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {replies}"
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        replies.extend(line.decode() for line in lines)
    return replies


def test_malformed_truncated_huge_and_deep_input_on_every_port(sky):
    status = sky.status()
    assert [h["id"] for h in status["harbors"]] == [1, 2]
    before = sky.rss()
    for abuse in ABUSES:
        port = getattr(sky, abuse.port)
        daemon = sky.daemon_for(port)
        with connect(port) as sock:
            client = local_port(sock)
            sock.sendall(abuse.payload)
            sky.serving()  # during: the abusive connection is still open (or being dropped)
            if abuse.then_close:
                pass
            elif abuse.reason is not None:
                data, closed = read_until_closed(sock)
                assert closed, f"{abuse.port} {abuse.name}: still open, got {data[:100]!r}"
                line = wait_line(daemon, port_pattern(sky, port, client) + ".*" + abuse.reason
                                 + ".*")
                print(f"{abuse.port} {abuse.name}: dropped, logged: {line[0][-110:]}")
                if "gate" in abuse.port:  # told, too
                    assert b"ERROR request longer than 4096 bytes" in data
            else:
                assert read_replies(sky, abuse, sock) == list(abuse.replies), abuse.name
                print(f"{abuse.port} {abuse.name}: answered, connection kept")
        sky.serving()  # after

    # the mapper carries any Extra it is given (deeply nested CBOR here) as opaque bytes
    with connect(sky.mapper_port) as registration:
        registration.sendall(ALIVE2_DEEP)
        assert recv_exactly(registration, 6)[:2] == b"v\x00"  # registered
        assert "deep" in [name for name, _ in mapper_names(sky.mapper_port).nodes]
        with connect(sky.mapper_port) as lookup:
            lookup.sendall(epmd_request(PortPlease2Request("deep")))
            reply = decode_port2_reply(read_until_closed(lookup)[0])
            assert reply.extra == b"\x81" * 1000 + b"\x00"
    sky.serving()
    assert sky.status() == status  # the same harbors and names as before it all
    sky.assert_rss_bounded(before)
    sky.no_tracebacks()


def test_slow_senders_are_served_and_others_are_not_held_up(sky):
    """Byte-at-a-time requests (1 byte per 10 ms, all five ports at once) are answered;
    meanwhile every daemon serves everyone else at full speed."""
    assert gate_line(sky.line_gate, "SET slow yes") == ["OK"]
    before = sky.rss()
    harbor_hello = LinkHandshake(sky.secret, 201, 1, dialer=True, expect_harbor=1)
    hello = harbor_hello.start()
    streams = {
        "master": (sky.master_port, MASTER_HELLO),
        "harbor": (sky.harbor_port, framed(b"\x00" + HARBOR_CODEC.encode(hello))),
        "line gate": (sky.line_gate, b"GET slow\n"),
        "packet gate": (sky.packet_gate, b"\x00\x08GET slow"),
        "mapper names": (sky.mapper_port, b"\x00\x01n"),
        "mapper port": (sky.mapper_port, epmd_request(PortPlease2Request("alpha"))),
    }
    sockets = {name: connect(port) for name, (port, _) in streams.items()}
    with held(list(sockets.values())):
        pairs = [(sockets[name], data) for name, (_, data) in streams.items()]
        half = max(len(data) for _, data in pairs) // 2
        started = time.monotonic()
        trickle([(sock, data[:half]) for sock, data in pairs])
        checked = time.monotonic()
        sky.serving()  # while every slow sender is half way through
        served_in = time.monotonic() - checked
        trickle([(sock, data[half:]) for sock, data in pairs])
        print(f"trickled {max(len(d) for _, d in pairs)} bytes in "
              f"{time.monotonic() - started:.2f} s; meanwhile everyone else was served in "
              f"{served_in * 1000:.0f} ms")

        challenge = MASTER_CODEC.decode(recv_frame(sockets["master"]))
        assert isinstance(challenge, MasterChallenge)
        frame = recv_frame(sockets["harbor"])
        link_challenge = HARBOR_CODEC.decode(frame[1:])
        assert isinstance(link_challenge, LinkChallenge)
        harbor_hello.receive(link_challenge)  # alpha proved the secret to the slow dialer
        assert recv_exactly(sockets["line gate"], 10) == b"VALUE yes\n"
        assert recv_exactly(sockets["packet gate"], 11) == b"\x00\x09VALUE yes"
        names, closed = read_until_closed(sockets["mapper names"])
        assert closed and b"name alpha at port" in names
        found, closed = read_until_closed(sockets["mapper port"])
        assert closed and decode_port2_reply(found).port == sky.harbor_port
    sky.serving()
    sky.assert_rss_bounded(before)
    sky.no_tracebacks()


def half_open_payloads(sky: Sky) -> dict[int, bytes]:
    """Half of a valid request, per port: the connection then stays silent."""
    return {
        sky.master_port: MASTER_HELLO[:len(MASTER_HELLO) // 2],
        sky.harbor_port: hello_frame_for_harbor(sky.secret, 1)[:30],
        sky.line_gate: b"SET half-open",
        sky.packet_gate: b"\x00\x10GET",
        sky.mapper_port: epmd_request(PortPlease2Request("alpha"))[:4],
    }


def test_idle_and_half_open_connections_held_at_once(sky):
    soft = raise_fd_limit(5 * (IDLE + HALF_OPEN) + 1024)
    scale = min(1.0, (soft - 1024) / (5 * (IDLE + HALF_OPEN)))
    idle, half_open = int(IDLE * scale), int(HALF_OPEN * scale)
    if scale < 1.0:
        print(f"NOTE: RLIMIT_NOFILE is {soft}: holding {idle} idle and {half_open} half-open "
              f"connections per port instead of {IDLE} and {HALF_OPEN}")
    ports = {"master": sky.master_port, "harbor": sky.harbor_port, "line gate": sky.line_gate,
             "packet gate": sky.packet_gate, "mapper": sky.mapper_port}
    pids = {name: sky.daemon_for(port).process.pid for name, port in ports.items()}
    fds_before = {name: open_fds(pid) for name, pid in pids.items()}
    before = sky.rss()
    payloads = half_open_payloads(sky)
    opened: dict[str, list[socket.socket]] = {}
    slow: dict[str, socket.socket] = {}
    try:
        started = time.monotonic()
        for name, port in ports.items():
            opened[name] = (open_many(port, idle, pids[name])
                            + open_many(port, half_open, pids[name], payloads[port]))
        # slow senders that keep sending (a byte every 0.1 s) a frame they never finish:
        # activity does not extend the master's and the harbor link's handshake deadline
        slow = {"master": connect(sky.master_port), "harbor": connect(sky.harbor_port)}
        slow_since = time.monotonic()
        for sock in slow.values():
            sock.sendall(b"\x00\x00\x10\x00")
        print(f"{sum(map(len, opened.values()))} connections open in "
              f"{time.monotonic() - started:.2f} s")
        held_fds = {name: open_fds(pid) for name, pid in pids.items()}
        print(f"daemon fds before: {fds_before}, while held: {held_fds}")
        for name in ports:  # really held at once, by the daemons too
            assert held_fds[name] - fds_before[name] >= idle + half_open - 5, name

        sky.serving()  # with every connection held
        sky.assert_rss_bounded(before)

        # the master and the harbor link drop all of theirs at the handshake deadline, the
        # mapper at its packet timeout; each drop logged (the gate keeps its clients: see
        # test_idle_gate_clients_do_not_lock_out_new_ones)
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + 10
        while time.monotonic() < deadline and any(
                sock.fileno() != -1 for sock in slow.values()):
            for name, sock in slow.items():
                if sock.fileno() == -1:
                    continue
                try:
                    sock.sendall(b"x")
                    dropped = closed_by_peer([sock], 0.05) > 0
                except OSError:  # reset by the daemon
                    dropped = True
                if dropped:
                    sock.close()
                    after = time.monotonic() - slow_since
                    print(f"slow sender to the {name} dropped after {after:.1f} s")
                    assert after < HANDSHAKE_TIMEOUT + 3, "activity extended the deadline"
        assert all(sock.fileno() == -1 for sock in slow.values()), "slow senders not dropped"
        for name in ("master", "harbor", "mapper"):
            closed = closed_by_peer(opened[name], 10.0)
            assert closed == idle + half_open, f"{name}: {closed} closed"
        wait_lines(sky.master, rf"no handshake within {HANDSHAKE_TIMEOUT} s", idle + half_open + 1)
        wait_lines(sky.alpha, rf"no handshake within {HANDSHAKE_TIMEOUT} s", idle + half_open + 1)
        wait_lines(sky.mapper, rf"no complete request within {MAPPER_PACKET_TIMEOUT} s "
                               r"\(0 bytes buffered\)", idle)
        wait_lines(sky.mapper, rf"no complete request within {MAPPER_PACKET_TIMEOUT} s "
                               r"\(4 bytes buffered\)", half_open)
        sky.serving()
    finally:
        for sockets in opened.values():
            close_all(sockets)
        close_all(slow.values())
    for name, pid in pids.items():  # every connection is gone on the daemon's side too
        budget = fds_before[name] + 5
        poll_until(lambda pid=pid, budget=budget: open_fds(pid) <= budget or None,
                   f"{name}'s connections to close", 15.0)
    sky.serving()
    sky.assert_rss_bounded(before)
    sky.no_tracebacks()


def test_unauthenticated_partial_frames_do_not_grow_memory_without_bound(daemons):
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1", "--secret-file",
                     str(daemons.secret), name="master")
    port = int(wait_line(master, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)")[1])
    secret = daemons.secret.read_bytes().strip()
    pid = master.process.pid
    assert master_table(port, secret).harbors == ()
    before = rss_mb(pid)
    chunk = b"\x00" * 65536
    dropped = 0
    with held([connect(port) for _ in range(12)]) as sockets:
        for sock in sockets:  # a 16 MiB - 1 frame each: over the limit before the handshake
            try:
                sock.sendall(struct.pack(">I", (1 << 24) - 1))
                for _ in range(128):
                    sock.sendall(chunk)
            except (ConnectionResetError, BrokenPipeError):
                dropped += 1  # dropped at the length prefix, as it should be
        assert master_table(port, secret).harbors == ()  # still serving (hard check)
        growth = rss_mb(pid) - before
        print(f"12 unauthenticated connections x 8 MiB: master RSS grew {growth:.0f} MiB; "
              f"{dropped} senders were cut off mid-send")
        assert growth < RSS_BOUND_MB, (f"master RSS grew {growth:.0f} MiB for 12 connections "
                                       f"that never authenticated (bound {RSS_BOUND_MB:g} MiB)")
        assert master.search(r"frame of 16777215 bytes exceeds the limit of 262144 bytes")


def test_idle_gate_clients_do_not_lock_out_new_ones(daemons):
    raise_fd_limit(IDLE + 1024)
    node = daemons("skynode", "--harbor", "1", "--no-mapper", "--service", "simpledb",
                   "--gate", "tcp:0:interface=127.0.0.1", "--secret-file",
                   str(daemons.secret), name="gated")
    port = int(wait_line(node, r"gate for SIMPLEDB listening on tcp:127\.0\.0\.1:(\d+)")[1])
    with connect(port) as first:
        first.sendall(b"SET k v\n")
        assert first.makefile("rb").readline() == b"OK\n"
        # measured now, not at start-up: the reactor opens descriptors of its own later
        while_connected = open_fds(node.process.pid)
    poll_until(lambda: open_fds(node.process.pid) < while_connected or None,
               "the first client to go")
    with held(open_many(port, IDLE, node.process.pid)):  # the default --gate-max-clients
        with connect(port) as newcomer:
            newcomer.sendall(b"GET k\n")
            reply, _ = read_until_closed(newcomer, limit=64)
        node_log = node.output()
        if reply.startswith(b"ERROR too many clients"):
            assert "gate refusing" in node_log  # refused clearly, and logged (hard check)
            raise KnownBug("1000 idle gate clients lock out a new client: " + reply.decode())
        assert reply == b"VALUE v\n"
