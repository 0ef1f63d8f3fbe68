"""Benchmark: how long a full garbage collection stops a worker process, with its start-up heap
left to the collector (as Python does by default) and frozen (``dispatcher.heap.settle_heap``,
what ``dispatcher worker``, ``scheduler``, ``api``, ``run`` and ``simulate`` do at start-up).

Run (no services needed)::

    .venv/bin/python -m bench.gc_pause               # 5 runs of each, alternating

Each run is a fresh interpreter that builds what a worker holds: the worker's Celery app and tasks,
and its runtime (engine, limiter, adapters and HTTP transports for both providers, on an embedded
SQLite database), then makes the heap a worker makes while it works (a few thousand short-lived
dicts and lists, some of them cyclic, kept in caches) and times ``gc.collect()``, which is what an
automatic generation-2 collection costs, five times. No thread runs meanwhile: a thread that has just
taken a rate-limit token sends that much late. Reported: objects a full collection walks, objects
frozen, and the
median and worst collection in milliseconds, medians over runs, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import gc, json, os, sys, time
from pathlib import Path

from dispatcher.config import Settings, load_config
from dispatcher.heap import settle_heap
from dispatcher.worker.tasks import create_worker_app, runtime

workdir = Path(sys.argv[2])
config_file = workdir / "dispatcher.toml"
config_file.write_text('''
[targets.hostup]
provider = "hostup"
base_url = "http://127.0.0.1:9/api/v2"
api_key_env = "BENCH_KEY"
[targets.nocworx]
provider = "nocworx"
base_url = "http://127.0.0.1:9"
api_key_env = "BENCH_KEY"
''')
os.environ["BENCH_KEY"] = "k"
config = load_config(Settings(database_url=f"sqlite:///{workdir / 'db.sqlite'}", broker_url="redis://127.0.0.1:6379/15",
                              config=config_file))
create_worker_app(config, concurrency=64)
from dispatcher.store import db
db.upgrade(config.settings.resolved_database_url())
runtime()  # the worker's service: engine, limiter, adapters, transports
if sys.argv[1] == "settled":
    settle_heap()
# the working set a busy worker keeps: caches of recent answers, some with reference cycles
cache = []
for i in range(5000):
    node = {"id": i, "headers": {"x": str(i)}, "items": [i, str(i)]}
    node["self"] = node if i % 5 == 0 else None
    cache.append(node)
pauses = []
for _ in range(5):
    start = time.perf_counter()
    gc.collect()
    pauses.append((time.perf_counter() - start) * 1000)
print(json.dumps({"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(), "pauses_ms": pauses}))
"""


def one_run(variant: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, variant, tmp], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**os.environ, "DISPATCHER_LOG_LEVEL": "WARNING"})
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_pause", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"as-is": [], "settled": []}
    for _ in range(args.runs):
        for variant in runs:  # alternating, so a noisy neighbour weighs on both alike
            runs[variant].append(one_run("settled" if variant == "settled" else "as-is"))
    print(f"full collection in a worker-sized process, {args.runs} runs each (medians over runs)")
    print(f"{'heap':<10}{'walked objects':>16}{'frozen':>10}{'median ms':>11}{'worst ms':>10}")
    figures: dict[str, tuple[float, float, float]] = {}
    for variant, results in runs.items():
        tracked = statistics.median(r["tracked"] for r in results)
        frozen = statistics.median(r["frozen"] for r in results)
        median = statistics.median(statistics.median(r["pauses_ms"]) for r in results)
        worst = statistics.median(max(r["pauses_ms"]) for r in results)
        figures[variant] = (tracked, median, worst)
        print(f"{variant:<10}{tracked:>16,.0f}{frozen:>10,.0f}{median:>11.1f}{worst:>10.1f}")
    base, ours = figures["as-is"], figures["settled"]
    print(f"settled / as-is: median pause {ours[1] / base[1]:.2f}x, worst {ours[2] / base[2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
