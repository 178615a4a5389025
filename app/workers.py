"""Several server processes on one port, kept alive and stopped together.

Each process listens on a socket of its own, bound with SO_REUSEPORT, so that the kernel spreads
connections across processes. With one shared socket (what ``uvicorn --workers`` does) whichever
process woke first accepted every connection in the backlog: in 2 of 6 runs with 8 keep-alive
clients, one process served all of them and LeNet-5's throughput halved.

The kernel picks the socket by a hash of the connection's addresses, once, when it opens: with few
keep-alive clients the split is often uneven (8 clients over 2 processes: 6/2 or worse in 29% of
runs, and such a run had p99 at 3.5 times p50). So each process publishes how many connections it
holds in memory shared by all of them, and one holding more than its share answers a response
with ``Connection: close``: the client reconnects, the kernel hashes it afresh, and the split
evens out within a few requests.

uvicorn's own supervisor also builds a plain ``uvicorn.Server`` in each child, which would lose the
drain on SIGTERM (``DrainingServer``). This one runs our target in each child, forwards every
signal to the children (so a second SIGTERM still stops them at once) and replaces a child that
dies, on the same socket, unless it exited with uvicorn's start-up failure status, which a restart
would only repeat.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("cnnserve")

POLL_SECONDS = 0.5
REBALANCE_SECONDS = 0.05  # at most one connection asked to reconnect per process per interval

Slot = tuple[Any, int]
"""The connection counts shared by every server process (a ctypes array), and this one's index."""


class ConnectionShare:
    """This process's connections against the others', from the shared counts."""

    def __init__(self, slot: Slot, connections: set) -> None:
        self.counts, self.index = slot
        self.connections = connections
        self.next_check = 0.0

    def publish(self) -> None:
        self.counts[self.index] = len(self.connections)

    def crowded(self) -> bool:
        """Whether to send one client away: this process holds more than the even share (rounded
        up) of all connections. Asked at most once per REBALANCE_SECONDS, and the one sent away is
        discounted at once, so that a burst of responses does not send several."""
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + REBALANCE_SECONDS
        mine = len(self.connections)
        self.counts[self.index] = mine
        share = -(-sum(self.counts) // len(self.counts))
        if mine <= share:
            return False
        self.counts[self.index] = mine - 1
        return True


class Rebalance:
    """ASGI middleware: ``Connection: close`` on a response when this process is crowded."""

    def __init__(self, app: ASGIApp, share: ConnectionShare, counter: Counter) -> None:
        self.app = app
        self.share = share
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and self.share.crowded():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                self.counter.inc()
            await send(message)

        await self.app(scope, receive, sending)


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


class Supervisor:
    def __init__(
        self,
        target: Callable[[list[socket.socket], Slot], None],
        sockets: list[socket.socket],
        on_death: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self.target = target
        self.sockets = sockets
        self.on_death = on_death
        self.context = multiprocessing.get_context("spawn")
        self.counts = self.context.RawArray("i", len(sockets))
        self.children: list[BaseProcess] = []
        self.stopping = threading.Event()
        self.failed = False

    def start_child(self, index: int) -> BaseProcess:
        self.counts[index] = 0
        slot = (self.counts, index)
        child = self.context.Process(target=self.target, args=([self.sockets[index]], slot), name="cnnserve-server")
        child.start()
        log.info("started server process %d", child.pid)
        return child

    def forward(self, sig: int, _frame: object = None) -> None:
        self.stopping.set()
        for child in self.children:
            if child.is_alive():
                os.kill(child.pid, sig)

    def run(self) -> int:
        """Serves until SIGTERM or SIGINT; returns the exit status (1 if a child could not start)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)
        self.children = [self.start_child(i) for i in range(len(self.sockets))]
        while not self.stopping.wait(POLL_SECONDS):
            self.replace_dead()
        for child in self.children:
            child.join()
        return 1 if self.failed else 0

    def replace_dead(self) -> None:
        for i, child in enumerate(self.children):
            if child.is_alive() or self.stopping.is_set():
                continue
            self.on_death(child.pid)
            if child.exitcode == STARTUP_FAILURE:
                log.error("server process %d could not start; stopping the others", child.pid)
                self.failed = True
                self.forward(signal.SIGTERM)
                return
            log.error("server process %d died (exit code %s); starting another", child.pid, child.exitcode)
            self.children[i] = self.start_child(i)
