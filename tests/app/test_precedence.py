"""CNNSERVE_WORKER_NICE: every thread of a server process but its event loop's runs at that nice
value, ONNX Runtime's and the thread pools' included, so that under load the loop (probes,
refusals, admissions) comes first."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from ..conftest import MODELS, live_server


def nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value (field 19 of /proc/PID/task/TID/stat)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        found[int(task.name)] = int(fields[16])
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux only")
def test_every_thread_but_the_event_loops_runs_at_the_worker_nice_value(tmp_path):
    shutil.copytree(MODELS / "efficientnet_lite0", tmp_path / "efficientnet_lite0")
    environment = {
        "CNNSERVE_MODELS_DIR": str(tmp_path),
        "CNNSERVE_DEFAULT_MODEL": "efficientnet_lite0",
        "CNNSERVE_PROCESSES": "1",
        "CNNSERVE_WORKER_NICE": "7",
    }
    with live_server(**environment) as (_, process):
        time.sleep(0.5)  # a few ticks of the server, which looks for new threads every 0.1 s
        threads = nice_values(process.pid)
    assert threads.pop(process.pid) == 0  # the main thread runs the event loop
    assert len(threads) >= 2 and set(threads.values()) == {7}, threads
