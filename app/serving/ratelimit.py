"""Token buckets per client, shared by every server process.

A limit of R requests a second with a burst of B is one bucket per credential: it holds up to B
tokens, refills at R a second, and each request takes one; a request that finds less than one is
refused (429) with the time until one is back. Several server processes share the port, so a
bucket kept per process would let a client through N times its rate (the kernel spreads its
connections over the N processes): the buckets live in one memory-mapped table that every process
maps, changed under an exclusive ``flock`` (two system calls, about 2 us a request). A lone process
maps anonymous memory and takes no lock (its HTTP and gRPC share one event loop).

The table has a fixed number of slots, found by a hash of the client's name with a few probes; when
every probed slot is taken, the one touched longest ago is reused: it belongs to a client that has
been quiet for the longest, whose bucket has most likely refilled to full, which is what a new
bucket starts as anyway.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

SLOT = struct.Struct("<Qdd")  # the client's hash (0: free), tokens, when they were counted (CLOCK_MONOTONIC)
SLOTS = 8192
PROBES = 16


@dataclass(frozen=True)
class Limit:
    """``rate`` requests a second, ``burst`` at once."""

    rate: float
    burst: float

    @property
    def window_s(self) -> int:
        """The seconds an empty bucket takes to refill: the window of the IETF RateLimit-Policy."""
        return max(1, math.ceil(self.burst / self.rate))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int  # whole tokens left after this request
    retry_after_s: int  # when refused: seconds until a token is back (at least 1)
    reset_s: int  # seconds until the bucket is full again


class FileLock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class Buckets:
    """The table of buckets: in ``path`` (shared by the processes that map it) or in this process's memory."""

    def __init__(self, path: Path | None = None) -> None:
        size = SLOT.size * SLOTS
        if path is None:
            self.memory = mmap.mmap(-1, size)
            self.lock: AbstractContextManager[None] = nullcontext()
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self.memory = mmap.mmap(fd, size)
        self.lock = FileLock(fd)

    def take(self, client: str, limit: Limit, now: float | None = None) -> Decision:
        """One request of ``client`` against ``limit``: allowed (a token taken) or refused."""
        now = time.monotonic() if now is None else now
        key = int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little") or 1
        with self.lock:
            offset, tokens, stamp = self.find(key, limit, now)
            tokens = min(limit.burst, tokens + (now - stamp) * limit.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            SLOT.pack_into(self.memory, offset, key, tokens, now)
        return Decision(
            allowed,
            remaining=int(tokens),
            retry_after_s=0 if allowed else max(1, math.ceil((1.0 - tokens) / limit.rate)),
            reset_s=math.ceil((limit.burst - tokens) / limit.rate),
        )

    def find(self, key: int, limit: Limit, now: float) -> tuple[int, float, float]:
        """The slot of ``key`` with its tokens and their time; a full new bucket in a free or the
        stalest probed slot when it has none."""
        start = key % SLOTS
        stalest, stalest_stamp = -1, math.inf
        for probe in range(PROBES):
            offset = ((start + probe) % SLOTS) * SLOT.size
            held, tokens, stamp = SLOT.unpack_from(self.memory, offset)
            if held == key:
                return offset, tokens, stamp
            if held == 0:
                return offset, limit.burst, now
            if stamp < stalest_stamp:
                stalest, stalest_stamp = offset, stamp
        return stalest, limit.burst, now
