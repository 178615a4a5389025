"""Keeps several server processes alive on their sockets and stops them together.

uvicorn's own supervisor builds a plain ``uvicorn.Server`` in each child, which would lose the
drain on SIGTERM (app/process/server.py). This one runs our target in each child, forwards every
signal to the children (so a second SIGTERM still stops them at once) and replaces a child that
dies, on the same socket, unless it exited with uvicorn's start-up failure status, which a restart
would only repeat.

The target learns whether it replaces a process: a replacement loads its models before it accepts
(app/http/app.py, ``lifespan_of``). The socket stays listening meanwhile, since this process holds
it, so the connections the kernel hands it wait in its backlog instead of getting 503s; the
requests lost are those the dead process held, which its clients see as a reset connection.

With the shared feed (app/serving/feed.py) it also keeps one inference owner per GPU: started
before the server processes (which ask it to load their models), stopped after them (so that
their last requests are answered), and replaced under a new generation when it dies, which
fails the batches it held with a retryable 503 and hands it the ones it had not taken.
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
from pathlib import Path

from uvicorn.config import STARTUP_FAILURE

from app.process.topology import NOT_SERVING, Slot
from app.serving.control import NOT_APPLIED
from app.serving.feed import Feed, OwnerEnds

log = logging.getLogger("cnnserve")

POLL_SECONDS = 0.5
OWNER_YOUNG_SECONDS = 30  # an inference process that dies sooner after its start died young
OWNER_YOUNG_DEATHS = 3  # young deaths in a row that stop the deployment


class Supervisor:
    def __init__(
        self,
        target: Callable[[list[socket.socket], Slot, bool], None],
        sockets: list[socket.socket],
        on_death: Callable[[int], None] = lambda pid: None,
        models_state: Path | None = None,
        feed: Feed | None = None,
        owner: Callable[[OwnerEnds, int], None] | None = None,
    ) -> None:
        self.target = target
        self.feed, self.owner = feed, owner
        self.owners: list[BaseProcess] = []
        owners = feed.layout.owners if feed is not None else 0
        self.owner_started, self.young_deaths = [0.0] * owners, [0] * owners
        self.sockets = sockets
        self.on_death = on_death
        self.context = multiprocessing.get_context("spawn")
        self.counts = self.context.RawArray("i", len(sockets))
        self.requests = self.context.RawArray("i", len(sockets))
        self.models_applied = self.context.RawArray("i", [NOT_APPLIED] * len(sockets))
        self.models_state = models_state
        self.children: list[BaseProcess] = []
        self.stopping = threading.Event()
        self.failed = False

    def start_child(self, index: int, replacing: bool = False) -> BaseProcess:
        self.counts[index] = NOT_SERVING if replacing else 0
        self.requests[index] = 0  # a process killed with requests in flight left its count behind
        self.models_applied[index] = NOT_APPLIED  # nobody waits for a process that is starting
        lane = self.feed.lane(index) if self.feed is not None else None
        slot = Slot(self.counts, self.requests, index, self.models_applied, self.models_state, lane)
        args = ([self.sockets[index]], slot, replacing)
        child = self.context.Process(target=self.target, args=args, name="cnnserve-server")
        child.start()
        log.info("started server process %d%s", child.pid, " (it loads its models, then serves)" if replacing else "")
        return child

    def start_owner(self, index: int, generation: int = 0) -> BaseProcess:
        assert self.feed is not None and self.owner is not None  # only called with the shared feed
        args = (self.feed.owner(index), generation)
        owner = self.context.Process(target=self.owner, args=args, name="cnnserve-inference")
        owner.start()
        self.owner_started[index] = time.monotonic()
        log.info("started inference process %d for GPU %d (generation %d)", owner.pid, index, generation)
        return owner

    def forward(self, sig: int, _frame: object = None) -> None:
        self.stopping.set()
        signal_all(self.children, sig)

    def run(self) -> int:
        """Serves until SIGTERM or SIGINT; returns the exit status (1 if a child could not start)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)
        if self.feed is not None:
            self.owners = [self.start_owner(i) for i in range(self.feed.layout.owners)]
        self.children = [self.start_child(i) for i in range(len(self.sockets))]
        while not self.stopping.wait(POLL_SECONDS):
            self.replace_dead()
            self.replace_dead_owners()
        for child in self.children:
            child.join()
        signal_all(self.owners, signal.SIGTERM)
        for owner in self.owners:
            owner.join()
        if self.feed is not None:
            self.feed.close()
        return 1 if self.failed else 0

    def replace_dead_owners(self) -> None:
        """A dead inference owner is replaced under a new generation (app/serving/feed.py); one that
        keeps dying young (CUDA failing at start, say) stops the deployment instead, as a server
        process that cannot start does: its server processes would wait for it forever."""
        for i, owner in enumerate(self.owners):
            if owner.is_alive() or self.stopping.is_set() or self.feed is None:
                continue
            young = time.monotonic() - self.owner_started[i] < OWNER_YOUNG_SECONDS
            self.young_deaths[i] = self.young_deaths[i] + 1 if young else 0
            if self.young_deaths[i] >= OWNER_YOUNG_DEATHS:
                log.error(
                    "inference process %d died %d times within %d s of its start; stopping",
                    owner.pid,
                    OWNER_YOUNG_DEATHS,
                    OWNER_YOUNG_SECONDS,
                )
                self.failed = True
                self.forward(signal.SIGTERM)
                return
            log.error("inference process %d died (exit code %s); starting another", owner.pid, owner.exitcode)
            self.owners[i] = self.start_owner(i, self.feed.replaced_owner(i))

    def replace_dead(self) -> None:
        for i, child in enumerate(self.children):
            if child.is_alive() or self.stopping.is_set():
                continue
            if child.pid is not None:  # always, once started
                self.on_death(child.pid)
            if child.exitcode == STARTUP_FAILURE:
                log.error("server process %d could not start; stopping the others", child.pid)
                self.failed = True
                self.forward(signal.SIGTERM)
                return
            log.error("server process %d died (exit code %s); starting another", child.pid, child.exitcode)
            self.children[i] = self.start_child(i, replacing=True)


def signal_all(processes: list[BaseProcess], sig: int) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:  # alive, so started: pid is set
            os.kill(process.pid, sig)
