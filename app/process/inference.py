"""The shared feed's processes: the region the supervisor makes, and an inference owner's life.

An owner holds the GPU's CUDA context (the one process that does, per GPU); the server processes
decode and hand it their batches (app/serving/feed.py, app/serving/owner.py). SIGTERM or SIGINT
ends it after the batch it runs; the supervisor stops it after the server processes, so that
their last requests are answered.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from app import sizing
from app.config import Settings
from app.http.app import configure_logging
from app.serving.feed import Feed, OwnerEnds
from app.serving.owner import Owner
from app.serving.runtime import accelerated

log = logging.getLogger("cnnserve")

PARENT_POLL_SECONDS = 1.0


def make_feed(settings: Settings, processes: int) -> Feed:
    """The region and pipes for ``processes`` server processes and one owner per GPU."""
    owners = sizing.owner_count(settings)
    return Feed.create(owners, processes, sizing.FEED_WORKERS, settings.feed_slot_mb << 20)


def run_owner(settings: Settings, ends: OwnerEnds, generation: int) -> None:
    """One inference owner, until SIGTERM (the supervisor's, once the server processes are done) or
    the supervisor's death. SIGINT is ignored: a terminal's Ctrl-C reaches every process of the
    group, and the server processes still draining need this one to answer."""
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=orphaned, args=(parent, stop), name="parent-watch", daemon=True).start()
    owner = Owner(settings, ends, generation)
    log.info("inference process for GPU %d serving %d server process(es)", ends.index, len(ends.answers))
    owner.serve(stop, sizing.owner_threads(accelerated(settings.providers)))


def orphaned(parent: int, stop: threading.Event) -> None:
    """Sets ``stop`` once the supervisor has gone (killed): an orphan would hold the GPU's memory."""
    while not stop.wait(PARENT_POLL_SECONDS):
        if os.getppid() != parent:
            log.error("the supervisor %d has gone; the inference process stops", parent)
            stop.set()
