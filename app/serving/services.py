"""The one typed object every adapter is handed: settings, metrics, repository, service, lifecycle.

Built once per server process by ``build`` and passed in explicitly (``create_app(services=
services)``); nothing is found by attribute name or through the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.metrics import Metrics
from app.serving import preprocess
from app.serving.access import Access
from app.serving.activity import Activity
from app.serving.control import ModelControl, Shared
from app.serving.feed import FeedClient
from app.serving.ratelimit import Buckets
from app.serving.repository import Repository
from app.serving.service import Lifecycle, Service


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    repository: Repository
    service: Service
    lifecycle: Lifecycle
    control: ModelControl
    access: Access | None = None  # who may do what (app/serving/access.py); None: built from the settings


def build(
    settings: Settings,
    processes: int = 1,
    activity: Activity | None = None,
    shared: Shared | None = None,
    buckets: Path | None = None,
    feed: FeedClient | None = None,
) -> Services:
    """Everything one server process needs; ``processes`` is how many share the port (each gets
    its share of the CPUs), ``activity`` counts the requests in flight in all of them (this
    process's alone by default), ``shared`` is the wanted models they all apply in explicit mode.
    ``buckets`` is the file of rate-limit buckets they all share (app/serving/ratelimit.py).
    ``feed`` hands this process's batches to the shared feed's inference process (app/serving/feed.py).
    Models are not loaded yet: ``services.control.load_initial()`` does it."""
    preprocess.refuse_decompression_bombs()
    metrics = Metrics(settings.prometheus_multiproc_dir)
    repository = Repository(settings, metrics, processes, activity, feed)
    lifecycle = Lifecycle()
    service = Service(settings, repository, lifecycle)
    control = ModelControl(settings, repository, shared)
    access = Access(settings, metrics, Buckets(buckets))
    return Services(settings, metrics, repository, service, lifecycle, control, access)
