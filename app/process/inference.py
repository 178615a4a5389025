"""The shared feed's processes: the region the supervisor makes, and an inference owner's life.

An owner holds the GPU's CUDA context (the one process that does, per GPU); the server processes
decode and hand it their batches (app/serving/feed.py, app/serving/owner.py). SIGTERM or SIGINT
ends it after the batch it runs; the supervisor stops it after the server processes, so that
their last requests are answered.
"""

from __future__ import annotations

import logging
import signal
import threading

from app import sizing
from app.config import Settings
from app.http.app import configure_logging
from app.serving.feed import Feed, OwnerEnds
from app.serving.owner import Owner
from app.serving.runtime import accelerated

log = logging.getLogger("cnnserve")


def make_feed(settings: Settings, processes: int) -> Feed:
    """The region and pipes for ``processes`` server processes and one owner per GPU."""
    owners = sizing.owner_count(settings)
    return Feed.create(owners, processes, sizing.FEED_WORKERS, settings.feed_slot_mb << 20)


def run_owner(settings: Settings, ends: OwnerEnds, generation: int) -> None:
    """One inference owner, until SIGTERM or SIGINT."""
    configure_logging(settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    owner = Owner(settings, ends, generation)
    log.info("inference process for GPU %d serving %d server process(es)", ends.index, len(ends.answers))
    owner.serve(stop, sizing.owner_threads(accelerated(settings.providers)))
