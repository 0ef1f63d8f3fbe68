"""Reading a simulator's request log (``GET /_sim/requests``) for what a client did to the limits:
the busiest window, the 429s, and requests sent before a Retry-After had passed. Pure.

Used by the rate-limit tests and ``bench/ratelimit.py``, so both judge a run the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: a request that reached the server this soon after a 429 was already on its way when the 429 left
IN_FLIGHT_S = 0.05
#: clock and scheduling slack allowed on "not before t + Retry-After"
TOLERANCE_S = 0.005


def arrivals(log: Iterable[Mapping[str, Any]]) -> list[float]:
    return sorted(float(r["at"]) for r in log)


def busiest_window(times: Sequence[float], width: float) -> int:
    """The most requests that arrived within any ``width`` seconds (a sliding window, half-open)."""
    best, low = 0, 0
    for high, t in enumerate(times):
        while times[low] <= t - width:
            low += 1
        best = max(best, high - low + 1)
    return best


def throttled(log: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in log if r.get("status") == 429]


def sent_early(log: Sequence[Mapping[str, Any]], *, in_flight_s: float = IN_FLIGHT_S,
               tolerance_s: float = TOLERANCE_S) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(answer, request) pairs: a request that arrived after an answer carrying Retry-After R at t,
    later than t + ``in_flight_s`` (it could not have been on its way) and before t + R."""
    ordered = sorted(log, key=lambda r: float(r["at"]))
    early: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    for index, answer in enumerate(ordered):
        wait = answer.get("retry_after")
        if wait is None:
            continue
        start, not_before = float(answer["at"]), float(answer["at"]) + float(wait)
        for later in ordered[index + 1:]:
            at = float(later["at"])
            if at >= not_before - tolerance_s:
                break
            if at > start + in_flight_s:
                early.append((answer, later))
    return early
