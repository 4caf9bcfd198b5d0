"""A service group behind a gate, with real daemons: three worker nodes join group
``workers``; a gate node whose ``--gate-service`` names the group spreads its clients'
requests over all three; after ``kill -9`` of one, every later request is answered by the
other two."""

from __future__ import annotations

import re
import signal
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .processes import Daemon, daemons, wait_for, wait_for_line
from .test_examples import talk

__all__ = ["daemons"]

WORKER = '''
from skyproto.node.service import Service


class WhoAmI(Service):
    """Answers which worker took the request."""

    def receive(self, source, session, payload):
        return f"VALUE {self.handle:08x}"
'''


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_gate_spreads_over_a_group_and_survives_a_killed_member(daemons):
    (daemons.workdir / "whoami.py").write_text(WORKER)
    secret = str(daemons.secret)
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                     "--secret-file", secret, name="master")
    master_at = (await wait_for_line(master, r"skymaster listening on (\S+)")).group(1)

    def node(harbor: int, *args: str) -> Daemon:
        started: Daemon = daemons("skynode", "--harbor", str(harbor), "--name", f"n{harbor}",
                       "--master", master_at, "--secret-file", secret, "--no-mapper",
                       *args, name=f"n{harbor}")
        return started

    workers = {h: node(h, "--service", "whoami:WhoAmI", "--join-group", "workers")
               for h in (1, 2, 3)}
    gate = node(9, "--gate", "tcp:0:interface=127.0.0.1", "--gate-service", "workers")
    port = int((await wait_for_line(gate, r"gate for workers listening on "
                                          r"tcp:127\.0\.0\.1:(\d+)")).group(1))
    for daemon in (*workers.values(), gate):
        await wait_for_line(daemon, r"joined the master")

    def spread() -> Counter[str] | None:
        """Nine requests; their answerers, once all three workers took some."""
        seen = Counter(talk(port, ["WHO"] * 9))
        return seen if len(seen) == 3 else None

    # the gate node learns the three memberships from the master as they come
    seen = await wait_for(spread, "the gate to reach all three workers", 20)
    assert all(re.fullmatch(r"VALUE 0[123]000002", reply) for reply in seen), seen
    assert sorted(seen.values()) == [3, 3, 3]  # round robin: evenly

    workers[2].kill(signal.SIGKILL)
    later: list[str] = await deferToThread(talk, port, ["WHO"] * 30)
    assert all(not reply.startswith("ERROR") for reply in later), later
    assert set(later) == {"VALUE 01000002", "VALUE 03000002"}, Counter(later)
