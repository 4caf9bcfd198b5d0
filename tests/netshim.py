"""A user-space link between a test host and its switch that delays and drops frames.

This kernel has no ``sch_netem``, so ``tc qdisc ... netem delay 50ms loss 1%`` is not
available. For a host created with a shim (``hosts(..., shim=["hostb"])`` in
tests/hosts.py), the cable between the host and the switch is not a veth pair but two TAP
devices, one in each namespace (``eth0`` in the host, ``pN`` on the switch's bridge), and
this process carries every Ethernet frame from one to the other. Each frame in each
direction is dropped with probability ``loss`` and otherwise delivered ``delay`` seconds
after it was read (one way: a round trip takes ``2 * delay``), in order. With both at 0 it
is a plain, slower cable. ``tc tbf`` still shapes the rate on either device.

Run by the fixture as::

    python tests/netshim.py HOST_NS HOST_DEV SWITCH_NS SWITCH_DEV [SEED]

It opens HOST_DEV inside the namespace HOST_NS and SWITCH_DEV inside SWITCH_NS
(``/run/netns/NAME``), prints ``ready`` once both exist, and then reads commands on its
standard input, one a line, answering each on standard output:

* ``set DELAY LOSS`` (seconds, probability 0..1): ``ok DELAY LOSS``;
* ``stats``: ``stats FORWARDED DROPPED``.

It exits when its standard input closes (the test process went away), and the TAP
devices, which only live while it holds them open, go with it. Standard library only.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import random
import selectors
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536
MAX_QUEUED = 20000  #: frames in flight at most (a long delay on a fast link): beyond it, drop


def enter_namespace(name: str) -> None:
    """Move this (single-threaded) process into the network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({name}): {os.strerror(error)}")
    finally:
        os.close(fd)


def open_tap(name: str) -> int:
    """A TAP device called ``name`` in the current namespace, created for this process."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Shim:
    """Two TAP file descriptors and the frames in flight between them."""

    def __init__(self, host_fd: int, switch_fd: int, seed: int) -> None:
        self.peer = {host_fd: switch_fd, switch_fd: host_fd}
        self.delay = 0.0
        self.loss = 0.0
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, int, bytes]] = []
        self.sequence = 0
        self.forwarded = 0
        self.dropped = 0

    def receive(self, fd: int) -> None:
        """Read every frame waiting on ``fd``; drop, deliver or queue each."""
        while True:
            try:
                frame = os.read(fd, MAX_FRAME)
            except BlockingIOError:
                return
            if not frame:
                return
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            if self.delay <= 0 and not self.queue:
                self.deliver(self.peer[fd], frame)
            elif len(self.queue) >= MAX_QUEUED:
                self.dropped += 1
            else:
                self.sequence += 1
                heapq.heappush(self.queue, (time.monotonic() + self.delay, self.sequence,
                                            self.peer[fd], frame))

    def deliver(self, fd: int, frame: bytes) -> None:
        try:
            os.write(fd, frame)
            self.forwarded += 1
        except (BlockingIOError, OSError):  # a full or downed device drops, like a wire
            self.dropped += 1

    def due(self) -> float | None:
        """Deliver what is due; seconds until the next frame is (None: nothing queued)."""
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, _, fd, frame = heapq.heappop(self.queue)
            self.deliver(fd, frame)
        return max(0.0, self.queue[0][0] - now) if self.queue else None

    def command(self, line: str) -> str:
        words = line.split()
        if len(words) == 3 and words[0] == "set":
            delay, loss = float(words[1]), float(words[2])
            if delay < 0 or not 0 <= loss <= 1:
                return f"error: delay must be >= 0 and loss within 0..1, not {line!r}"
            self.delay, self.loss = delay, loss
            return f"ok {delay:g} {loss:g}"
        if words == ["stats"]:
            return f"stats {self.forwarded} {self.dropped}"
        return f"error: unknown command {line!r}"


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    host_ns, host_dev, switch_ns, switch_dev = argv[:4]
    seed = int(argv[4]) if len(argv) == 5 else 0
    enter_namespace(host_ns)
    host_fd = open_tap(host_dev)
    enter_namespace(switch_ns)
    switch_fd = open_tap(switch_dev)
    shim = Shim(host_fd, switch_fd, seed)
    selector = selectors.DefaultSelector()
    selector.register(host_fd, selectors.EVENT_READ)
    selector.register(switch_fd, selectors.EVENT_READ)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    selector.register(stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    pending = b""
    while True:
        for key, _ in selector.select(shim.due()):
            if key.fd != stdin:
                shim.receive(key.fd)
                continue
            try:
                data = os.read(stdin, 4096)
            except BlockingIOError:
                continue
            if not data:
                return 0
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                print(shim.command(line.decode()), flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
