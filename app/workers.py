"""Several server processes on one port, kept alive and stopped together.

Each process listens on a socket of its own, bound with SO_REUSEPORT, so that the kernel spreads
connections across processes. With one shared socket (what ``uvicorn --workers`` does) whichever
process woke first accepted every connection in the backlog: in 2 of 6 runs with 8 keep-alive
clients, one process served all of them and LeNet-5's throughput halved.

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
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("cnnserve")

POLL_SECONDS = 0.5


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
        target: Callable[[list[socket.socket]], None],
        sockets: list[socket.socket],
        on_death: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self.target = target
        self.sockets = sockets
        self.on_death = on_death
        self.context = multiprocessing.get_context("spawn")
        self.children: list[BaseProcess] = []
        self.stopping = threading.Event()
        self.failed = False

    def start_child(self, sock: socket.socket) -> BaseProcess:
        child = self.context.Process(target=self.target, args=([sock],), name="cnnserve-server")
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
        self.children = [self.start_child(sock) for sock in self.sockets]
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
            self.children[i] = self.start_child(self.sockets[i])
