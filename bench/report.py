"""What ``make bench`` prints, computed from its JSON record alone (bench/results/latest.json): the
references, one table per deployment mode, and the goals, each met or MISSED with its figures.

Kept apart from the measuring (bench/run.py) so that the tables and the goals can be tested on a
made-up record, and re-printed from a saved one: ``python -m bench.report bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]
Runs = dict[tuple[str, int], dict[str, Any]]

# The goals: ratios of this service to the peer and to the references, from the issue that asked for them.
PEER_AT_ONE = 1.1  # one connection: ours against the peer, on every workload
DECODED_P50 = 1.15  # one connection: small-JPEG p50 against bare ONNX Runtime + decode, per image
CEILING_AT_EIGHT = 0.95  # eight connections: small JPEG against the no-server ceiling
PEER_AT_EIGHT = {"small_jpeg": 1.5, "big_jpeg": 10.0, "lenet_png": 2.5}  # eight connections: against the peer
TAIL = 2.0  # p99 at most this many times p50 ...
TAIL_CONNECTIONS = (8, 32)  # ... at these connection counts, on every workload


@dataclass(frozen=True)
class Goal:
    mode: str
    name: str
    met: bool
    figures: str


@dataclass(frozen=True)
class ModeRuns:
    """One mode's runs of this service, the peer's runs under the same pinning, and that pinning's
    references: everything a mode's table and goals compare."""

    mode: str
    ours: Runs
    peer: Runs
    references: dict[str, Any]
    titles: dict[str, str]
    models: dict[str, str]


def mode_runs(record: Record, mode: str) -> ModeRuns:
    pinning = record["modes"][mode]["pinning"]
    ours: Runs = {}
    peer: Runs = {}
    for run in record["runs"]:
        key = (run["workload"], run["connections"])
        if run["server"] == "cnnserve" and run["mode"] == mode:
            ours[key] = run
        elif run["server"] == "peer" and run["pinning"] == pinning:
            peer[key] = run
    titles = {w["key"]: w["title"] for w in record["workloads"]}
    models = {w["key"]: w["model"] for w in record["workloads"]}
    return ModeRuns(mode, ours, peer, record["references"][pinning], titles, models)


# -- the goals ---------------------------------------------------------------------------------


def _clean(run: dict[str, Any]) -> str:
    """A note for a run with failed requests: its throughput counts them, so its goal is not met."""
    return f"; {run['errors']} errors" if run["errors"] else ""


def peer_goal(m: ModeRuns, workload: str, connections: int, factor: float) -> Goal | None:
    ours, peer = m.ours.get((workload, connections)), m.peer.get((workload, connections))
    if ours is None or peer is None:
        return None
    ratio = ours["rps"] / peer["rps"]
    return Goal(
        m.mode,
        f"{connections} conn, {m.titles[workload]}: >= {factor:g}x the peer",
        ratio >= factor and not ours["errors"],
        f"{ratio:.2f}x ({ours['rps']:.1f} vs {peer['rps']:.1f} req/s{_clean(ours)})",
    )


def decoded_goal(m: ModeRuns) -> Goal | None:
    """A lone client should wait little more than one process decoding and inferring with every
    core of the mode, with no server at all."""
    ours, decoded = m.ours.get(("small_jpeg", 1)), m.references["decoded"].get("small_jpeg")
    if ours is None or decoded is None:
        return None
    alone_ms, p50_ms = 1000 / decoded, ours["p50_us"] / 1000
    return Goal(
        m.mode,
        f"1 conn, {m.titles['small_jpeg']}: p50 <= {DECODED_P50:g}x bare ONNX Runtime + decode",
        p50_ms <= DECODED_P50 * alone_ms and not ours["errors"],
        f"{p50_ms / alone_ms:.2f}x ({p50_ms:.2f} vs {alone_ms:.2f} ms{_clean(ours)})",
    )


def ceiling_goal(m: ModeRuns) -> Goal | None:
    ours, ceiling = m.ours.get(("small_jpeg", 8)), m.references["ceilings"].get("small_jpeg")
    if ours is None or ceiling is None:
        return None
    ratio = ours["rps"] / ceiling
    return Goal(
        m.mode,
        f"8 conn, {m.titles['small_jpeg']}: >= {CEILING_AT_EIGHT:g} of the no-server ceiling",
        ratio >= CEILING_AT_EIGHT and not ours["errors"],
        f"{ratio:.2f} ({ours['rps']:.1f} vs {ceiling:.1f}/s{_clean(ours)})",
    )


def tail_goal(m: ModeRuns, workload: str, connections: int) -> Goal | None:
    ours = m.ours.get((workload, connections))
    if ours is None:
        return None
    ratio = ours["p99_us"] / max(ours["p50_us"], 1)
    return Goal(
        m.mode,
        f"{connections} conn, {m.titles[workload]}: p99 <= {TAIL:g}x p50",
        ratio <= TAIL,
        f"{ratio:.2f}x ({ours['p99_us'] / 1000:.1f} vs {ours['p50_us'] / 1000:.1f} ms)",
    )


def mode_goals(m: ModeRuns) -> list[Goal | None]:
    """Every goal of one mode, in the order the issue gives them; None where this run did not
    measure what the goal needs (a workload or a connection count left out)."""
    goals: list[Goal | None] = [peer_goal(m, w, 1, PEER_AT_ONE) for w in PEER_AT_EIGHT]
    goals += [decoded_goal(m), ceiling_goal(m)]
    goals += [peer_goal(m, w, 8, factor) for w, factor in PEER_AT_EIGHT.items()]
    goals += [tail_goal(m, w, c) for c in TAIL_CONNECTIONS for w in PEER_AT_EIGHT]
    return goals


def evaluate(record: Record) -> dict[str, list[Goal | None]]:
    """Each mode's goals, met or missed, from the record of one run."""
    return {mode: mode_goals(mode_runs(record, mode)) for mode in record["modes"]}


def goals_block(record: Record) -> str:
    lines = ["goals (met / MISSED, with the figures):"]
    for mode, goals in evaluate(record).items():
        checked = [g for g in goals if g is not None]
        met = sum(g.met for g in checked)
        lines.append(f"  {record['modes'][mode]['title']}: {met} of {len(checked)} met")
        lines += [f"    {'met' if g.met else 'MISSED':<7}{g.name}: {g.figures}" for g in checked]
        if len(checked) < len(goals):
            lines.append(
                f"    ({len(goals) - len(checked)} goals not checked: this run left out their workload or connections)"
            )
    return "\n".join(lines)


# -- the tables ---------------------------------------------------------------------------------

COLUMNS = [
    ("workload", 24),
    ("conns", 6),
    ("limit/s", 9),
    ("ceiling", 9),
    ("peer req/s", 11),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("p99/p50", 8),
    ("ours req/s", 11),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("p99/p50", 8),
    ("x limit", 8),
    ("x ceil", 8),
    ("x peer", 8),
    ("errors", 8),
]


def _latency(run: dict[str, Any]) -> str:
    return f"{run['p50_us'] / 1e3:>8.1f}{run['p99_us'] / 1e3:>8.1f}{run['p99_us'] / max(run['p50_us'], 1):>8.2f}"


def table_row(m: ModeRuns, workload: str, connections: int) -> str | None:
    ours, peer = m.ours.get((workload, connections)), m.peer.get((workload, connections))
    if ours is None or peer is None:
        return None
    limit = m.references["limits"][m.models[workload]]["batch1"]
    ceiling = m.references["ceilings"][workload]
    return (
        f"{m.titles[workload]:<24}{connections:>6}{limit:>9.0f}{ceiling:>9.0f}{peer['rps']:>11.1f}{_latency(peer)}"
        f"{ours['rps']:>11.1f}{_latency(ours)}{ours['rps'] / limit:>8.2f}{ours['rps'] / ceiling:>8.2f}"
        f"{ours['rps'] / peer['rps']:>8.2f}{peer['errors']:>4}/{ours['errors']:<3}"
    )


def mode_table(record: Record, mode: str) -> str:
    m = mode_runs(record, mode)
    about = record["modes"][mode]
    pinning = record["pinnings"][about["pinning"]]
    head = "".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(COLUMNS))
    lines = [
        f"mode {about['title']}: {' '.join(about['command'])}; the peer and the references on {pinning['title']}",
        head,
        "-" * len(head),
    ]
    rows = (table_row(m, w["key"], c) for w in record["workloads"] for c in record["connections"])
    lines += [row for row in rows if row is not None]
    memory = about["memory"]
    lines.append(
        f"resident memory: {memory['ready_mb']:.0f} MB when ready, {memory['after_mb']:.0f} MB after "
        f"{memory['requests']} requests"
    )
    return "\n".join(lines)


def reference_lines(record: Record, pinning: str) -> Iterator[str]:
    """The references of one pinning, best of before and after, with both measurements."""
    refs, about = record["references"][pinning], record["pinnings"][pinning]
    processes = len(about["cores"])
    yield f"references on {about['title']} (best of before and after the servers ran):"
    for model, limit in refs["limits"].items():
        yield (
            f"  bare ONNX Runtime, {model}: batch 1 {limit['batch1']:.0f} images/s (measured "
            f"{_both(limit['measured'])}); "
            f"best batch {limit['best_batch']}: {limit['best']:.0f} images/s"
        )
    for w in record["workloads"]:
        key = w["key"]
        if key in refs["decoded"]:
            rate, measured = refs["decoded"][key], _both(refs["measured"]["decoded"][key])
            yield (
                f"  bare ONNX Runtime + decode, one process, {w['title']}: {rate:.0f} images/s, "
                f"{1000 / rate:.2f} ms each (measured {measured})"
            )
        if key in refs["ceilings"]:
            rate, measured = refs["ceilings"][key], _both(refs["measured"]["ceilings"][key])
            yield f"  ceiling, {w['title']}: {rate:.0f}/s in {processes} process(es), no server (measured {measured})"


def _both(measured: list[float]) -> str:
    return " and ".join(f"{m:.0f}" for m in measured)


def render(record: Record) -> str:
    """Everything ``make bench`` prints after its progress bar."""
    parts = ["\n".join(reference_lines(record, p)) for p in record["references"]]
    parts += [mode_table(record, mode) for mode in record["modes"]]
    parts.append(goals_block(record))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("record", type=Path, nargs="?", default=Path("bench/results/latest.json"))
    print(render(json.loads(parser.parse_args(argv).record.read_text())))


if __name__ == "__main__":
    main()
