"""Loopback ports for test servers, safe with pytest-xdist workers and other test sessions on the same machine.

``free_port()`` picks a random port below Linux's ephemeral range (32768-60999), so the many outgoing client
connections of concurrent tests (which the kernel gives ephemeral ports) can never take it between the pick and
the server's bind; it checks that nothing listens there and never hands the same port out twice in one process.
A server that still loses the race (another session picked the same port) fails to bind: ``LiveServer.start``
then retries on a new port.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32000
_handed_out: set[int] = set()


def free_port() -> int:
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_LOW, _HIGH)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_LOW}-{_HIGH}")
