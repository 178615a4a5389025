"""How many requests are in flight, in this server process and in the others sharing its CPUs.

A batch that finds itself alone (no other request admitted anywhere, so every other core is idle)
runs on a session with every core's threads instead of its one-core share: EfficientNet-Lite0 on 2
cores took 3.5 ms an image instead of 6.3 ms, which is what one user at a time waits for. Under
load the one-thread sessions keep one busy thread per core, which serves more (app/sizing.py).

The count is what admission counts (``Batcher.admission``): from before a request's body is read
until it is answered, so a request still decoding elsewhere already counts. With several server
processes each writes its own slot of an array in shared memory (set up by the supervisor) and
reads all of them; alone, a private array of one slot does.
"""

from __future__ import annotations

import threading
from collections.abc import MutableSequence


class Activity:
    def __init__(self, counts: MutableSequence[int] | None = None, index: int = 0) -> None:
        self.counts: MutableSequence[int] = counts if counts is not None else [0]
        self.index = index
        self.counts[index] = 0
        self.lock = threading.Lock()  # admissions may come from more than one thread (tests, gRPC)

    def enter(self) -> None:
        with self.lock:
            self.counts[self.index] += 1

    def leave(self) -> None:
        with self.lock:
            self.counts[self.index] -= 1

    def alone(self, requests: int) -> bool:
        """Whether ``requests`` (a batch about to run) are all that is in flight anywhere."""
        return sum(self.counts) <= requests
