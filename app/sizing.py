"""What each model gets: server processes, CPUs, ONNX Runtime threads, inference workers, where its
images are decoded, and how much work it admits at once. Every such decision is made here, from the
settings, the machine and one measured number per model (the seconds its warm-up inference took);
the loader asks once per model, logs the answer, and ``GET /models/{name}`` shows it.

Words: a *process* is a server process (several share the port); a *worker* is one of a model's
inference threads, each running one batch at a time; *threads* are ONNX Runtime's intra-op threads
inside one inference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.config import Settings

MAX_AUTO_PROCESSES = 4  # each process holds every model: memory grows with the count
FAST_MODEL_SECONDS = 0.001  # below this per image, one inference worker per model
INLINE_SECONDS = 0.0002  # below this per image (about a thread hop), inference runs on the event loop
MAX_INLINE_SECONDS = 0.001  # the longest the event loop is ever held by one inline inference
INLINE_PIXELS = 64 * 64  # images this small are decoded on the event loop: a thread hop costs more
MAX_FEED_PROCESSES = 32  # decoding server processes of the shared feed
FEED_WORKERS = 2  # a server process's batches at the inference owner at once: one runs while the next forms
FEED_OWNER_THREADS = 2  # batches an inference process on a GPU has in flight at once
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"

Decode = Literal["worker", "pool"]


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup v2 quota, because
    ONNX Runtime sizes its pool to the host and oversubscribes a container (onnxruntime #29510)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def process_count(settings: Settings, accelerated: bool) -> int:
    """How many server processes to start. On the CPU, one per core: each process's event loop then
    has a core of its own, and the Python around a fast model's inference stops being the limit
    (measured on 2 cores against one process: LeNet-5 served 55% more 28x28 PNGs, small JPEGs 10%
    more, 12-megapixel JPEGs 5% fewer). With the shared feed, one per core left beside the
    inference processes, all decoding: one process decoding for an H200 kept it a third busy. With
    a CUDA session in each process, no more than CNNSERVE_MAX_CUDA_PROCESSES, each a CUDA context."""
    if feed_mode(settings, accelerated) == "shared":
        spare = available_cpus() - owner_count(settings)
        return settings.processes or max(1, min(spare, MAX_FEED_PROCESSES))
    if accelerated:
        return min(settings.processes or available_cpus(), settings.max_cuda_processes)
    return settings.processes or min(available_cpus(), MAX_AUTO_PROCESSES)


def feed_mode(settings: Settings, accelerated: bool) -> Literal["shared", "per-process"]:
    """Where inference runs: ``shared``, in one inference process per GPU that every server process
    feeds (app/serving/feed.py), or ``per-process``, in each server process. ``auto`` shares on an
    accelerator: one owner joins every process's requests into the GPU's largest batch shape, where
    a session per process sees only its own share of them, padded, and its CUDA context time-slices
    the GPU with the others' (kernels of different processes do not overlap without MPS). On the
    CPU each process running its own batches is what was measured best, so it stays."""
    if settings.feed == "auto":
        return "shared" if accelerated else "per-process"
    return settings.feed


def owner_threads(accelerated: bool) -> int:
    """Batches an inference process has in flight at once: on a GPU two, so that one is copied in
    and answered while the other runs; on the CPU one, whose session already has every core."""
    return FEED_OWNER_THREADS if accelerated else 1


def owner_count(settings: Settings) -> int:
    """Inference processes of the shared feed: one per GPU (CUDA_VISIBLE_DEVICES, or the GPUs the
    NVIDIA driver lists), at least one (the CPU provider's)."""
    if settings.gpus:
        return settings.gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    try:
        return max(1, len(os.listdir(NVIDIA_GPUS)))
    except OSError:
        return 1


def cpu_share(processes: int) -> int:
    """The CPUs one of ``processes`` server processes may give its inferences."""
    return max(1, available_cpus() // max(1, processes))


@dataclass(frozen=True)
class Plan:
    """What one model gets in one server process."""

    processes: int  # server processes, each holding every model
    cpus: int  # this process's share of the CPUs
    threads: int  # ONNX Runtime intra-op threads per inference
    workers: int  # batches run at once
    decode: Decode  # where images over INLINE_PIXELS are decoded
    capacity: int  # images admitted at once: what the queue holds plus what the workers run
    job_cost: int  # a feature map or CAM runs alone, taking a whole batch's turn on a worker
    warm_batches: tuple[int, ...]  # batch sizes run once at load, before the model is served
    pad_to: int | None  # the largest batch shape (on an accelerator), or None: batches run as they come
    max_batch: int  # most images a batch of this process's batcher joins
    alone_threads: int = 0  # threads of the session a batch alone on the machine runs on; 0: none
    inline_batch: int = 0  # batches up to this size run on the event loop; 0: never
    shapes: tuple[int, ...] = ()  # the batch sizes the model runs at (accelerator, feed); (): any
    feed: bool = False  # batches go to the shared feed's inference process (app/serving/feed.py)

    def describe(self) -> str:
        alone = f" ({self.alone_threads} when alone)" if self.alone_threads else ""
        inline = f"; batches of up to {self.inline_batch} run on the event loop" if self.inline_batch else ""
        where = "; batches go to the inference process" if self.feed else ""
        return (
            f"{self.workers} worker(s) x {self.threads} thread(s){alone} of {self.cpus} CPU(s) in each of "
            f"{self.processes} process(es); images decoded on the {self.decode}; admits {self.capacity} image(s)"
            f"{inline}{where}"
        )


def first_guess(settings: Settings, processes: int) -> int:
    """Threads for the session that measures a model before its plan exists."""
    return settings.intra_op_threads or cpu_share(processes)


def plan(settings: Settings, processes: int, seconds_per_image: float, on_cpu: bool) -> Plan:
    """Threads and workers for what the settings leave at 0. Measured on 2 cores with 8 clients:
    EfficientNet-Lite0 (3 ms an image) served 22% more small JPEGs as two one-thread workers than
    as one two-thread worker, while LeNet-5 (30 us) served 40% more as one two-thread worker than
    as one one-thread worker: fast models get one worker with every core, slow ones a worker per
    core.

    Two exceptions, for one user at a time. A model faster than a thread hop (LeNet-5: 30 us an
    image, the hop and its wake-ups about 200 us) runs small batches on the event loop, on one
    thread: a second ONNX Runtime thread spins on the other core and gains nothing at that size.
    A slower model also gets a session with every CPU this process may use, for a batch that finds
    nothing else in flight on the machine (app/serving/activity.py): EfficientNet-Lite0 answered a
    lone client's small JPEG in 5.8 ms instead of 9.2 ms (2 cores, 2 processes; the tutorial peer
    took 6.8 ms), while under load the one-thread workers keep serving as many as before.

    A one-thread worker on the CPU also decodes its requests' images: one busy thread per core and
    no hop (measured: 7 to 12% more small JPEGs). Multi-thread workers would idle their other
    threads meanwhile, and an accelerator needs many cores decoding to keep it fed, so those leave
    decoding to the thread pool.

    On an accelerator, see accelerator_plan; with the shared feed, feed_plan."""
    cpus = cpu_share(processes)
    if not on_cpu:
        return accelerator_plan(settings, processes, cpus)
    fast = seconds_per_image < FAST_MODEL_SECONDS
    inline = inline_batch(settings, seconds_per_image)
    if fast:
        workers = settings.inference_workers or 1
    else:
        workers = settings.inference_workers or max(1, cpus // (settings.intra_op_threads or 1))
    threads = settings.intra_op_threads or (1 if inline else max(1, cpus // workers))
    return Plan(
        processes=processes,
        cpus=cpus,
        threads=threads,
        workers=workers,
        decode="worker" if threads == 1 else "pool",
        capacity=settings.max_queue + settings.max_batch_size * workers,
        job_cost=settings.max_batch_size,
        warm_batches=tuple(range(1, settings.max_batch_size + 1)),
        pad_to=None,
        max_batch=settings.max_batch_size,
        alone_threads=alone_threads(settings, threads, fast),
        inline_batch=inline,
    )


def alone_threads(settings: Settings, threads: int, fast: bool) -> int:
    """Threads for a batch that finds every other core idle (app/serving/activity.py): all the
    CPUs this process may use. Not for a fast model (LeNet-5's 30 us gain nothing from a second
    thread), nor when the settings fix the threads."""
    every = available_cpus()
    if fast or settings.intra_op_threads or every <= threads:
        return 0
    return every


def inline_batch(settings: Settings, seconds_per_image: float) -> int:
    """How large a batch may run on the event loop: none unless an image takes less than a thread
    hop (measured: LeNet-5's 30 us against about 200 us for the hop and its wake-ups), and never
    more than the loop may be held (MAX_INLINE_SECONDS)."""
    if seconds_per_image >= INLINE_SECONDS:
        return 0
    return max(1, min(settings.max_batch_size, int(MAX_INLINE_SECONDS / max(seconds_per_image, 1e-9))))


def accelerator_plan(settings: Settings, processes: int, cpus: int) -> Plan:
    """A process running its own accelerator session: batches fill the device, not threads: one
    worker, one ONNX Runtime CPU thread (its pool spins, taking the cores that decode), and every
    batch run at the smallest of a few fixed shapes that holds it, each warmed at load: on CUDA a
    session whose input shape changes between runs pays cuDNN's set-up again each time (measured
    on an H200 with EfficientNet-Lite0: batches of 1 to 8 in turn ran 7 images a second in bare
    ONNX Runtime, 29 with the heuristic algorithm search; a fixed batch of 8 ran 4,793, a fixed
    batch of 1 948), while padding a lone client's image to 8 cost it 2.7 ms against 1.1 ms."""
    workers = settings.inference_workers or 1
    shapes = settings.batch_shape_list
    return Plan(
        processes=processes,
        cpus=cpus,
        threads=settings.intra_op_threads or 1,
        workers=workers,
        decode="pool",
        capacity=settings.max_queue + shapes[-1] * workers,
        job_cost=settings.max_batch_size,
        warm_batches=(),  # the runner warms each of its shapes (app/serving/accelerated.py)
        pad_to=shapes[-1],
        max_batch=shapes[-1],
        shapes=shapes,
    )


def feed_plan(settings: Settings, processes: int) -> Plan:
    """A server process of the shared feed: it decodes (in its thread pool, as every process
    does), joins what waits into batches of up to CNNSERVE_MAX_BATCH_SIZE, and has FEED_WORKERS of
    them at the inference process at once, which joins all processes' batches into its shapes.
    Its own session (one CPU thread) only checks the model and serves feature maps."""
    return Plan(
        processes=processes,
        cpus=cpu_share(processes),
        threads=1,
        workers=FEED_WORKERS,
        decode="pool",
        capacity=settings.max_queue + settings.max_batch_size * FEED_WORKERS,
        job_cost=settings.max_batch_size,
        warm_batches=(),
        pad_to=None,
        max_batch=settings.max_batch_size,
        shapes=settings.batch_shape_list,
        feed=True,
    )
