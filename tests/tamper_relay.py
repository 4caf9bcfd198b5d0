"""A man in the middle, as a process of its own: forwards framed TCP connections to one
target and, when told on stdin, tampers with the next frame going one way.

    python tests/tamper_relay.py TARGET_PORT RECORD_FILE

It prints ``listening on PORT`` once ready. Each stdin line ``arm MODE WAY`` (MODE one of
flip, drop, reorder, replay; WAY ``up``, client to target, or ``down``) makes it tamper with
the next whole frame going that way, on any connection, and print ``applied MODE WAY``:
flip changes one byte in its middle, drop leaves it out, reorder sends the frame after it
first, replay sends it twice. Everything forwarded is appended to RECORD_FILE, so a test
can check what a relay could read. It exits when stdin closes.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import sys
from typing import BinaryIO


class Way:
    """One direction of one relayed connection: whole frames, maybe tampered with."""

    def __init__(self, name: str, source: socket.socket, sink: socket.socket,
                 relay: Relay) -> None:
        self.name, self.source, self.sink, self.relay = name, source, sink, relay
        self.buffer = b""
        self.held: bytes | None = None

    def received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if len(self.buffer) < 4 + length:
                break
            frame, self.buffer = self.buffer[:4 + length], self.buffer[4 + length:]
            self.forward(frame)

    def forward(self, frame: bytes) -> None:
        if self.held is not None:  # reorder: the frame after the held one goes first
            held, self.held = self.held, None
            self.send(frame + held)
            return
        mode = self.relay.armed.pop(self.name, None)
        if mode is None:
            self.send(frame)
            return
        if mode == "flip":
            middle = 4 + (len(frame) - 4) // 2
            frame = frame[:middle] + bytes([frame[middle] ^ 0x01]) + frame[middle + 1:]
            self.send(frame)
        elif mode == "replay":
            self.send(frame + frame)
        elif mode == "reorder":
            self.held = frame
        # drop: nothing is sent
        self.relay.say(f"applied {mode} {self.name}")

    def send(self, data: bytes) -> None:
        self.relay.record.write(data)
        self.relay.record.flush()
        try:
            self.sink.sendall(data)
        except OSError:
            self.relay.close(self.source, self.sink)


class Relay:
    def __init__(self, target_port: int, record: BinaryIO) -> None:
        self.target_port = target_port
        self.record = record
        self.armed: dict[str, str] = {}
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.selector.register(self.listener, selectors.EVENT_READ, self.accept)
        self.selector.register(sys.stdin, selectors.EVENT_READ, self.command)
        self.say(f"listening on {self.listener.getsockname()[1]}")

    def say(self, line: str) -> None:
        print(line, flush=True)

    def accept(self, listener: socket.socket) -> None:
        client, _ = listener.accept()
        try:
            target = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        up, down = Way("up", client, target, self), Way("down", target, client, self)
        self.selector.register(client, selectors.EVENT_READ, lambda s: self.pump(s, up))
        self.selector.register(target, selectors.EVENT_READ, lambda s: self.pump(s, down))

    def pump(self, sock: socket.socket, way: Way) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.close(way.source, way.sink)
            return
        way.received(data)

    def close(self, *socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
            sock.close()

    def command(self, stdin: object) -> None:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)
        words = line.split()
        if len(words) == 3 and words[0] == "arm":
            self.armed[words[2]] = words[1]
            self.say(f"armed {words[1]} {words[2]}")

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                key.data(key.fileobj)


if __name__ == "__main__":
    with open(sys.argv[2], "ab") as record:
        Relay(int(sys.argv[1]), record).run()
