"""Helpers for tests/test_abuse.py: raw sockets against real daemons, and what to watch.

Everything here is blocking and bounded: every socket has a timeout, every wait a deadline,
and the only sleeps are the pacing of deliberately slow senders and the short polls of a
condition that cannot be waited on otherwise (a daemon's /proc entries, its log file).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, TypeVar

from skyproto.harbor.handshake import LinkHandshake
from skyproto.harbor.messages import HARBOR_CODEC, LinkChallenge
from skyproto.mapper.epmd import NamesResponse, decode_names_reply
from skyproto.master.handshake import Authenticated, NodeHandshake
from skyproto.master.messages import (
    MASTER_CODEC,
    PROTOCOL_VERSION,
    GetTable,
    MasterChallenge,
    MasterHello,
    Table,
    TableReply,
)
from skyproto.testing import wait_until
from skyproto.wire.heartbeat import HeartbeatTiming

from .processes import Daemon
from .sealed import Wire

T = TypeVar("T")
HOST: Final = "127.0.0.1"
#: how long one blocking socket operation may take (the test machine may be busy)
IO_TIMEOUT: Final = 10.0


class KnownBug(AssertionError):
    """A failed check that documents a reported bug (its test is ``xfail(strict=True,
    raises=KnownBug)``, so any other failure in the same test still fails the suite)."""


# --------------------------------------------------------------------------- waiting


def poll_until(condition: Callable[[], T | None], what: str, timeout: float = 15.0,
               interval: float = 0.01) -> T:
    """:func:`skyproto.testing.wait_until` (blocking: these tests run outside the reactor)
    with this module's defaults; WaitTimeout after ``timeout`` seconds."""
    return wait_until(condition, what, timeout, interval=interval)


def wait_line(daemon: Daemon, pattern: str, timeout: float = 20.0) -> re.Match[str]:
    """The first match of ``pattern`` in the daemon's log, waiting for it to appear."""

    def found() -> re.Match[str] | None:
        match = daemon.search(pattern)
        if match is None and daemon.process.poll() is not None:
            raise AssertionError(f"{daemon.name} exited:\n{daemon.output()}")
        return match

    return poll_until(found, f"{pattern!r} in {daemon.name}'s log", timeout, interval=0.02)


def wait_lines(daemon: Daemon, pattern: str, count: int, timeout: float = 20.0) -> list[str]:
    """At least ``count`` matches of ``pattern`` in the daemon's log."""

    def enough() -> list[str] | None:
        found = daemon.search_all(pattern)
        return found if len(found) >= count else None

    return poll_until(enough, f"{count} x {pattern!r} in {daemon.name}'s log", timeout,
                      interval=0.05)


# --------------------------------------------------------------------------- processes


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors a process holds (each accepted connection is one)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (daemons started later
    inherit it) and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


# --------------------------------------------------------------------------- sockets


def connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def local_port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def read_until_closed(sock: socket.socket, timeout: float = IO_TIMEOUT,
                      limit: int = 1 << 20) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (or ``timeout``): (data, closed by peer)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        poller = select.poll()  # not select(): our descriptors go far beyond 1024
        poller.register(sock, select.POLLIN)
        if not poller.poll(left * 1000):
            return data, False
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def recv_exactly(sock: socket.socket, size: int, timeout: float = IO_TIMEOUT) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def framed(payload: bytes) -> bytes:
    """A skyproto frame: 4-byte big-endian length, then the payload."""
    return struct.pack(">I", len(payload)) + payload


def recv_frame(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    (size,) = struct.unpack(">I", recv_exactly(sock, 4, timeout))
    return recv_exactly(sock, size, timeout)


def recv_frame_raw(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """One frame with its length prefix, as it came (a sealed record, for a :class:`Wire`)."""
    head = recv_exactly(sock, 4, timeout)
    return head + recv_exactly(sock, struct.unpack(">I", head)[0], timeout)


def open_many(port: int, count: int, pid: int, first: bytes = b"", batch: int = 40,
              timeout: float = 30.0, slack: int = 4) -> list[socket.socket]:
    """``count`` connections to ``port``, each sending ``first``, all held open.

    Opened in batches, each waiting until the daemon ``pid`` has accepted it (its fd count
    grew, give or take ``slack`` for connections of others it is closing meanwhile), so the
    listen backlog never overflows (an overflow costs a 1 s SYN retry)."""
    sockets: list[socket.socket] = []
    base = open_fds(pid)
    deadline = time.monotonic() + timeout
    try:
        while len(sockets) < count:
            for _ in range(min(batch, count - len(sockets))):
                sock = socket.socket()
                sock.setblocking(False)
                sockets.append(sock)
                sock.connect_ex((HOST, port))
            want = base + len(sockets) - slack

            def accepted(want: int = want) -> bool | None:
                return open_fds(pid) >= want or None

            poll_until(accepted, f"{len(sockets)} connections accepted",
                       max(0.1, deadline - time.monotonic()), interval=0.002)
        for sock in sockets:
            sock.setblocking(True)
            sock.settimeout(IO_TIMEOUT)
            if first:
                sock.sendall(first)
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def closed_by_peer(sockets: Sequence[socket.socket], timeout: float) -> int:
    """How many of ``sockets`` the peer closes (EOF or reset) within ``timeout``."""
    waiting = {sock.fileno(): sock for sock in sockets}
    closed = 0
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(left * 1000):
            sock = waiting.pop(fd, None)
            if sock is None:
                continue
            poller.unregister(fd)
            with contextlib.suppress(OSError):
                sock.recv(65536)  # a reply before the close is fine; we only count closes
            closed += 1
    return closed


@contextlib.contextmanager
def held(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        close_all(sockets)


def trickle(streams: Sequence[tuple[socket.socket, bytes]], interval: float = 0.01) -> None:
    """Send every stream one byte per ``interval``, all at once (bounded by the longest)."""
    longest = max((len(data) for _, data in streams), default=0)
    for index in range(longest):
        for sock, data in streams:
            if index < len(data):
                sock.sendall(data[index:index + 1])
        time.sleep(interval)


# --------------------------------------------------------------------------- the services


def gate_line(port: int, *requests: str) -> list[str]:
    """Send line requests to a line-framed gate; return one reply per request."""
    with connect(port) as sock:
        sock.sendall(b"".join(r.encode() + b"\n" for r in requests))
        replies: list[str] = []
        buffer = b""
        while len(replies) < len(requests):
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"gate closed after {replies}")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            replies.extend(line.decode() for line in lines)
        return replies


def gate_packet(port: int, *requests: str) -> list[str]:
    """Send packet requests (2-byte length) to a packet-framed gate; return the replies."""
    with connect(port) as sock:
        sock.sendall(b"".join(struct.pack(">H", len(r.encode())) + r.encode() for r in requests))
        replies = []
        for _ in requests:
            (size,) = struct.unpack(">H", recv_exactly(sock, 2))
            replies.append(recv_exactly(sock, size).decode())
        return replies


def mapper_names(port: int) -> NamesResponse:
    """NAMES_REQ to a mapper: every live registration."""
    with connect(port) as sock:
        sock.sendall(b"\x00\x01n")
        data, closed = read_until_closed(sock)
        assert closed, "the mapper did not close after its NAMES reply"
        return decode_names_reply(data)


def master_table(port: int, secret: bytes) -> Table:
    """Authenticate to the master as an observer (``skyproto status``'s way) and read the
    table; also checks the master's proof of the secret."""
    handshake = NodeHandshake(secret, HeartbeatTiming(), None)
    wire = Wire(MASTER_CODEC)
    with connect(port) as sock:
        sock.sendall(wire.encode(handshake.start()))
        challenge = MASTER_CODEC.decode(recv_frame(sock))
        assert isinstance(challenge, MasterChallenge)
        step = handshake.receive(challenge)
        assert isinstance(step.outcome, Authenticated), step.outcome  # the master's proof
        assert step.keys is not None
        wire.seal(step.keys, initiator=True)
        sock.sendall(b"".join(wire.encode(m) for m in (*step.sealed, GetTable(1))))
        while True:
            for reply in wire.decode(recv_frame_raw(sock)):
                if isinstance(reply, TableReply):
                    table: Table = reply.table
                    return table


def harbor_challenge(port: int, secret: bytes, expect_harbor: int) -> LinkChallenge:
    """Open a harbor link as harbor 200 and check the node's proof; close before ours."""
    handshake = LinkHandshake(secret, 200, 1, dialer=True, expect_harbor=expect_harbor)
    hello = handshake.start()
    with connect(port) as sock:
        sock.sendall(framed(b"\x00" + HARBOR_CODEC.encode(hello)))
        frame = recv_frame(sock)
        assert frame[:1] == b"\x00"
        challenge = HARBOR_CODEC.decode(frame[1:])
        assert isinstance(challenge, LinkChallenge), challenge
        handshake.receive(challenge)  # raises unless the node proved the secret
        return challenge


def hello_frame_for_master() -> bytes:
    return framed(MASTER_CODEC.encode(MasterHello(PROTOCOL_VERSION, os.urandom(32))))


def hello_frame_for_harbor(secret: bytes, expect_harbor: int) -> bytes:
    hello = LinkHandshake(secret, 200, 1, dialer=True, expect_harbor=expect_harbor).start()
    return framed(b"\x00" + HARBOR_CODEC.encode(hello))


def deeply_nested_cbor(depth: int = 100_000) -> bytes:
    """One CBOR item nested ``depth`` arrays deep (well-formed, far beyond any limit)."""
    return b"\x81" * depth + b"\x00"
