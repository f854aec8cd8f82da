"""Shared benchmark plumbing: side-by-side timing and the results format.

Every benchmark times our path and its baseline in the same process and writes
``benchmarks/results/<name>.json`` with the keys ``benchmark, ours, baseline, ratio, goal, holds,
device, versions, date`` (plus free-form ``details``) and a markdown twin ``<name>.md``.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import time
from typing import Any, Callable, Sequence

import jax

RESULTS = pathlib.Path(__file__).parent / "results"


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def timeit(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (blocked until ready) over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def interleaved(fns: dict[str, Callable[[], Any] | Sequence[Callable[[], Any]]], *, repeats: int = 20,
                warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so machine noise hits all alike.

    The order rotates every round: on a small CPU the program that runs right after another one
    can be measurably slower, and a fixed order would pin that cost on one candidate. A candidate
    given as several callables (separately compiled copies of one program) is timed as its fastest
    copy: two copies of the same executable can differ by 10-20% on this machine for reasons that
    have nothing to do with the program (where its code and buffers land).
    """
    copies = {k: list(v) if isinstance(v, Sequence) else [v] for k, v in fns.items()}
    flat = {(k, i): fn for k, v in copies.items() for i, fn in enumerate(v)}
    for fn in flat.values():
        for _ in range(warmup):
            block(fn())
    times: dict[Any, list[float]] = {k: [] for k in flat}
    names = list(flat)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            block(flat[k]())
            times[k].append(time.perf_counter() - t)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {k: min(median[k, i] for i in range(len(v))) for k, v in copies.items()}


def device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()} ({platform.machine()})"


def versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "qwix"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write(name: str, *, ours: float, baseline: float, goal: str, holds: bool, unit: str = "s",
          details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes the JSON and markdown result of one benchmark and returns the record.

    ``ratio`` is ``ours / baseline``; ``goal`` says in words what the ratio must satisfy and
    ``holds`` whether it does.
    """
    record = {
        "benchmark": name, "ours": ours, "baseline": baseline, "ratio": ours / baseline if baseline else None,
        "unit": unit, "goal": goal, "holds": bool(holds), "device": device(), "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "details": details or {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = [f"# {name}", "", "| ours | baseline | ratio | goal | holds | device |", "|---|---|---|---|---|---|",
             f"| {ours:.6g} {unit} | {baseline:.6g} {unit} | {record['ratio']:.4g} | {goal} | {holds} | {record['device']} |"]
    if details:
        lines += ["", "| detail | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in details.items()]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: record[k] for k in ("benchmark", "ours", "baseline", "ratio", "goal", "holds")}))
    return record
