"""Several server processes on one port: their sockets and how they share the connections.

Each process listens on a socket of its own, bound with SO_REUSEPORT, so that the kernel spreads
connections across processes. With one shared socket (what ``uvicorn --workers`` does) whichever
process woke first accepted every connection in the backlog: in 2 of 6 runs with 8 keep-alive
clients, one process served all of them and LeNet-5's throughput halved.

The kernel picks the socket by a hash of the connection's addresses, once, when it opens: with few
keep-alive clients the split is often uneven (8 clients over 2 processes: 6/2 or worse in 29% of
runs, and such a run had p99 at 3.5 times p50). So each process publishes how many connections it
holds in memory shared by all of them, and one holding more than its share answers a response
with ``Connection: close`` (app/http/middleware/rebalance.py): the client reconnects, the kernel
hashes it afresh, and the split evens out within a few requests.

A replacement for a process that died publishes nothing until it accepts (it loads its models
first, app/process/supervisor.py); its slot reads NOT_SERVING meanwhile and counts in no share, so
that the others do not send clients to a socket that nobody accepts from yet.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.serving.feed import Lane

REBALANCE_SECONDS = 0.05  # at most one connection asked to reconnect per process per interval
NOT_SERVING = -1  # the count of a process that does not accept connections yet


@dataclass(frozen=True)
class Slot:
    """What every server process shares with the others, in ctypes arrays with one entry per
    process: its open connections (for the rebalancing above), its requests in flight (which
    tell a batch whether it is alone on the machine, app/serving/activity.py) and the models it
    applied (app/serving/control.py); and which entry is this process's."""

    connections: Any
    requests: Any
    index: int
    models_applied: Any = None  # per process, the generation of the wanted models it applied
    models_state: Path | None = None  # the wanted models, for explicit mode (app/serving/control.py)
    lane: Lane | None = None  # this process's end of the shared feed (app/serving/feed.py), if there is one


class ConnectionShare:
    """This process's connections against the others', from the shared counts."""

    def __init__(self, counts: Any, index: int, connections: Sized = ()) -> None:
        self.counts, self.index = counts, index
        self.connections = connections  # the server's own set, handed over once the server exists
        self.next_check = 0.0

    def publish(self) -> None:
        self.counts[self.index] = len(self.connections)

    def crowded(self) -> bool:
        """Whether to send one client away: this process holds more than the even share (rounded
        up) of all connections, among the processes that accept them. Asked at most once per
        REBALANCE_SECONDS, and the one sent away is discounted at once, so that a burst of
        responses does not send several."""
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + REBALANCE_SECONDS
        mine = len(self.connections)
        self.counts[self.index] = mine
        serving = [count for count in self.counts if count != NOT_SERVING]
        share = -(-sum(serving) // len(serving))
        if mine <= share:
            return False
        self.counts[self.index] = mine - 1
        return True


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to the same address, one per process (listen() is the child's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets
