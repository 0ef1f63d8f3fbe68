"""The chaos suite's results as the README's table: ``python -m bench.chaos_table [RUN]``.

Reads ``bench/results/chaos.json`` (written by ``tests/chaos``; one row per scenario per run) and
prints a Markdown table of one run: the newest by default, or the run id given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "chaos.json"
COLUMNS = ("scenario", "intents", "succeeded", "failed", "lost", "duplicate_tickets", "max_recovery_s")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | wall s | notes |", "|" + "---|" * (len(COLUMNS) + 2)]
    for row in sorted(rows, key=lambda r: _order(str(r["scenario"]))):
        cells = [str(row[c]) for c in COLUMNS] + [str(row.get("wall_s", "")), str(row.get("notes", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(scenario: str) -> tuple[int, str]:
    """S0, S1, ... S10 in numeric order."""
    head = scenario.split()[0]
    digits = "".join(ch for ch in head if ch.isdigit())
    return (int(digits) if digits else 999, head)


def main(argv: list[str]) -> int:
    history: list[dict[str, Any]] = json.loads(RESULTS.read_text())
    if not history:
        print("no results yet: run .venv/bin/python -m pytest tests/chaos -m chaos -q -s", file=sys.stderr)
        return 1
    run = argv[0] if argv else history[-1]["run"]
    rows = [r for r in history if r.get("run") == run]
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:  # a scenario run twice in one session: its last row
        latest[row["scenario"]] = row
    print(f"run {run}")
    print(table(list(latest.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
