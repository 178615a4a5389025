"""The benchmarks' own logic, so that a run of minutes (or one on a GPU machine) cannot fail on a
typo: the goals and tables of ``make bench`` on made-up figures, its command line, and the GPU
script run briefly on the CPU. Here, with torch blocked: a GPU machine may have only the service."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.config import Settings
from bench import gpu, refusals, report, run

from ..conftest import MODELS

WORKLOADS = [
    {"key": "small_jpeg", "title": "small JPEG (451x300)", "model": "efficientnet_lite0"},
    {"key": "lenet_png", "title": "28x28 PNG on LeNet-5", "model": "lenet5"},
]


def wrk_run(server: str, workload: str, connections: int, rps: float, p50_ms: float, **about: Any) -> dict[str, Any]:
    return {
        "server": server,
        "workload": workload,
        "connections": connections,
        "rps": rps,
        "p50_us": p50_ms * 1000,
        "p99_us": p50_ms * 1500,
        "errors": 0,
        **about,
    }


def made_up_record() -> dict[str, Any]:
    """One mode at 1 and 8 connections on two workloads: small JPEG at 1 connection beats the
    peer by 1.2x (met), the PNG only equals it (missed); the rest as the figures fall."""
    limit = {"batch1": 300.0, "best_batch": 8, "best": 400.0, "measured": [290.0, 300.0]}
    references = {
        "limits": {"efficientnet_lite0": limit, "lenet5": limit | {"batch1": 20_000.0}},
        "decoded": {"small_jpeg": 250.0, "lenet_png": 9_000.0},  # small JPEG: 4 ms an image
        "ceilings": {"small_jpeg": 400.0, "lenet_png": 20_000.0},
        "measured": {
            "decoded": {"small_jpeg": [240.0, 250.0], "lenet_png": [9_000.0, 8_000.0]},
            "ceilings": {"small_jpeg": [400.0, 390.0], "lenet_png": [20_000.0, 19_000.0]},
        },
    }
    ours = {"server": "cnnserve", "mode": "serve", "pinning": "all_cores"}
    peer = {"server": "peer", "pinning": "all_cores"}
    runs = [
        wrk_run(**peer, workload="small_jpeg", connections=1, rps=100.0, p50_ms=10.0),
        wrk_run(**peer, workload="lenet_png", connections=1, rps=1000.0, p50_ms=1.0),
        wrk_run(**peer, workload="small_jpeg", connections=8, rps=200.0, p50_ms=40.0),
        wrk_run(**peer, workload="lenet_png", connections=8, rps=1000.0, p50_ms=8.0),
        wrk_run(**ours, workload="small_jpeg", connections=1, rps=120.0, p50_ms=4.4),
        wrk_run(**ours, workload="lenet_png", connections=1, rps=1000.0, p50_ms=1.0),
        wrk_run(**ours, workload="small_jpeg", connections=8, rps=390.0, p50_ms=20.0),
        wrk_run(**ours, workload="lenet_png", connections=8, rps=3000.0, p50_ms=2.5) | {"p99_us": 6000},
    ]
    memory = {"ready_mb": 500.0, "after_mb": 510.0, "requests": 1234}
    return {
        "workloads": WORKLOADS,
        "connections": [1, 8],
        "pinnings": {"all_cores": {"title": "2 cores (unpinned)", "cores": [0, 1]}},
        "references": {"all_cores": references},
        "modes": {
            "serve": {"title": "serve", "command": ["python", "-m", "app", "serve"], "pinning": "all_cores"}
            | {"memory": memory}
        },
        "runs": runs,
    }


def goals_by_name(record: dict[str, Any]) -> dict[str, report.Goal]:
    return {goal.name: goal for goal in report.evaluate(record)["serve"] if goal is not None}


def test_goals_are_met_or_missed_with_their_figures():
    goals = goals_by_name(made_up_record())
    met = goals["1 conn, small JPEG (451x300): >= 1.1x the peer"]
    missed = goals["1 conn, 28x28 PNG on LeNet-5: >= 1.1x the peer"]
    assert met.met and met.figures == "1.20x (120.0 vs 100.0 req/s)"
    assert not missed.met and missed.figures == "1.00x (1000.0 vs 1000.0 req/s)"
    assert goals["1 conn, small JPEG (451x300): p50 <= 1.15x bare ONNX Runtime + decode"].figures.startswith("1.10x")
    assert goals["8 conn, small JPEG (451x300): >= 0.95 of the no-server ceiling"].met  # 390 of 400
    assert not goals["8 conn, 28x28 PNG on LeNet-5: p99 <= 2x p50"].met  # 6 ms against 2.5


def test_goals_without_their_figures_are_counted_not_checked():
    goals = report.evaluate(made_up_record())["serve"]
    # not measured: the 12-megapixel JPEG at 1 and 8 connections, and everything at 32
    assert sum(goal is None for goal in goals) == 6
    block = report.goals_block(made_up_record())
    assert "serve: " in block and "(6 goals not checked" in block
    assert "    met    1 conn, small JPEG (451x300): >= 1.1x the peer: 1.20x" in block
    assert "    MISSED 1 conn, 28x28 PNG on LeNet-5: >= 1.1x the peer: 1.00x" in block


def test_a_run_with_errors_meets_no_throughput_goal():
    record = made_up_record()
    record["runs"][4]["errors"] = 3
    goal = goals_by_name(record)["1 conn, small JPEG (451x300): >= 1.1x the peer"]
    assert not goal.met and goal.figures.endswith("; 3 errors)")


def test_the_report_shows_references_a_row_per_run_and_the_goals():
    text = report.render(made_up_record())
    assert "bare ONNX Runtime + decode, one process, small JPEG (451x300): 250 images/s, 4.00 ms each" in text
    assert "mode serve: python -m app serve; the peer and the references on 2 cores (unpinned)" in text
    rows = [line for line in text.splitlines() if line.startswith(("small JPEG", "28x28 PNG"))]
    assert len(rows) == 4
    # ours at 8 connections on LeNet-5: p50, p99, p99/p50, x limit, x ceiling, x peer, errors (peer/ours)
    assert rows[-1].split()[-7:] == ["2.5", "6.0", "2.40", "0.15", "0.15", "3.00", "0/0"]
    assert "resident memory: 500 MB when ready, 510 MB after 1234 requests" in text
    assert text.rstrip().endswith("(6 goals not checked: this run left out their workload or connections)")


def test_the_command_line_takes_modes_and_estimates_its_duration():
    default = run.parse_args([])
    assert default.modes == ["serve", "one-core", "one-process"] and default.seconds == 6.0
    assert 5 * 60 < run.expected_seconds(default) < 10 * 60
    # references: 2 pinnings x before/after x (2 models + 3 workloads x 2); loads: (3 modes + 2 peers) x 9
    assert run.progress_total(default) == 2 * 2 * 8 + 5 * 9
    assert run.parse_args(["--modes", "one-core"]).modes == ["one-core"]
    with pytest.raises(SystemExit):
        run.parse_args(["--modes", "pin1"])


def test_the_one_core_mode_pins_everything_to_one_core_and_keeps_the_load_off_it():
    pins = run.pinnings([m for m in run.MODES if m.key == "one-core"])
    assert list(pins) == ["one_core"]
    one = pins["one_core"]
    assert len(one.cores) == 1 and (one.load is None or not one.load & one.cores)


def test_the_gpu_script_runs_on_the_cpu(tmp_path, capsys):
    """Its CPU twin, briefly: the checks, both candidates over HTTP on every workload, the limits,
    the ratios and the goals, in one call."""
    out = tmp_path / "gpu.json"
    gpu.main(["--providers", "cpu", "--seconds", "1", "--connections", "1,8", "--out", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert {row["provider"] for row in figures["models"]} == {"CPUExecutionProvider"}
    against = figures["against_cpu"]
    assert against["top5_equal"] and against["max_logit_diff"] == 0.0 and len(against["photos"]) == 5
    assert "largest logit difference 0 (allowed 0.001)" in printed
    assert figures["gpu_limit"]["largest"] > 0 and figures["decode_ceiling"]["images_per_s"] > 0
    for candidate in ("shared", "per-process"):
        served = figures["candidates"][candidate]
        assert served["provider"] == "CPUExecutionProvider" and served["same_top5"]
        for workload in ("small_jpeg", "big_jpeg", "v2_binary"):
            for connections in (1, 8):
                row = served["runs"][f"{workload}@{connections}"]
                assert row["rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] and not row["errors"]
    assert "goals of issue 23" in printed and "more: " in printed
    assert figures["failures"] == [] and printed.rstrip().endswith("every check passed")


def test_the_gpu_script_stops_when_a_model_is_not_on_the_demanded_provider():
    """The CUDA demand met with a CPU-only onnxruntime: every model is refused, and the script
    says so and exits non-zero instead of measuring the CPU."""
    refused = gpu.loaded(Settings(models_dir=MODELS, providers="cuda", default_model=gpu.MODEL))
    with pytest.raises(SystemExit) as stopped:
        gpu.require_providers(refused, "cuda")
    message = str(stopped.value)
    assert message.startswith("error: --providers cuda demands CUDAExecutionProvider for every model")
    assert "efficientnet_lite0 was refused" in message
    cpu = gpu.loaded(Settings(models_dir=MODELS, providers="cpu", default_model=gpu.MODEL))
    try:
        with pytest.raises(SystemExit, match="lenet5 runs on CPUExecutionProvider"):
            gpu.require_providers(cpu, "cuda")
        gpu.require_providers(cpu, "cpu")  # what it demands, it has
    finally:
        asyncio.run(cpu.repository.close())


@pytest.mark.parametrize("path", ["/featuremaps", "/v2/models/lenet5/infer"])
def test_the_in_process_refusal_cost_refuses_every_request_for_capacity(path):
    """``python -m bench.refusals --in-process``: each call a 429, none asking for its body (the
    figure in README "Access control" would otherwise be some other answer's cost)."""
    statuses, seconds = asyncio.run(refusals.app_cost(path, 50))
    assert statuses == {429: 50} and 0 < seconds < 0.1
