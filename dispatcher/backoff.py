"""When to send again after a failed attempt. Pure: no I/O, no clock; randomness is passed in.

Retry policy is data (one :class:`RetryPolicy` per target, from configuration) so the worker,
the tests and the simulator all agree on it. Jitter spreads retries so that many workers that
failed together do not come back together.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

#: at most this much jitter is added on top of a server's Retry-After
RETRY_AFTER_JITTER_MAX_S = 1.0
#: ... and at most this fraction of the Retry-After itself
RETRY_AFTER_JITTER_FRACTION = 0.1
# 2.0 ** 1024 overflows a float; any exponent this large is far past every cap
_MAX_EXPONENT = 1000


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one target is retried.

    ``max_attempts`` counts sends only: waiting for a rate-limit token is not an attempt.
    ``final_codes`` are error codes (the provider's or ours) that are never retried, even when
    the answer otherwise looks retryable, e.g. HostUp's critical-per-hour ``rate_limited``.
    """

    max_attempts: int = 8
    base_s: float = 2.0
    cap_s: float = 300.0
    final_codes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name, value in (("base_s", self.base_s), ("cap_s", self.cap_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got base_s={self.base_s!r}, cap_s={self.cap_s!r}")
        codes: object = self.final_codes  # configuration may hand over a list
        if isinstance(codes, str):
            # frozenset("abc") would silently make three one-letter codes
            raise ValueError("final_codes must be a collection of codes, not a single string")
        # keep the dataclass hashable and immutable whatever collection came in
        object.__setattr__(self, "final_codes", frozenset(self.final_codes))


def backoff_wait(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**(attempt-1))) seconds.

    ``attempt`` is 1-based: the attempt that just failed. Full jitter (rather than a fixed
    exponential) keeps workers that failed at the same moment from retrying in lockstep.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    exponent = attempt - 1
    ceiling = policy.cap_s if exponent > _MAX_EXPONENT else min(policy.cap_s, policy.base_s * 2.0**exponent)
    return rng.uniform(0.0, ceiling)


def next_retry(
    policy: RetryPolicy,
    *,
    attempt: int,
    error_code: str | None,
    retry_after: float | None,
    rng: random.Random,
) -> float | None:
    """Seconds to wait before the next attempt, or ``None`` to give up.

    Gives up when ``attempt`` (1-based, the one that just failed) reached ``max_attempts`` or
    ``error_code`` is final. A server's ``Retry-After`` is a floor: the wait is that value plus
    a small jitter (at most 1 s or 10 %), never less, and it may exceed ``cap_s``. A
    ``retry_after`` that is not a finite number is treated as absent.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    if attempt >= policy.max_attempts:
        return None
    if error_code is not None and error_code in policy.final_codes:
        return None
    if retry_after is not None and math.isfinite(retry_after):
        floor = max(retry_after, 0.0)
        jitter = min(RETRY_AFTER_JITTER_MAX_S, RETRY_AFTER_JITTER_FRACTION * floor)
        return floor + rng.uniform(0.0, jitter)
    return backoff_wait(policy, attempt, rng)


_PERIODS: dict[str, float] = {
    "second": 1.0, "sec": 1.0, "s": 1.0,
    "minute": 60.0, "min": 60.0, "m": 60.0,
    "hour": 3600.0, "h": 3600.0,
    "day": 86400.0, "d": 86400.0,
}
_RATE_RE = re.compile(r"\s*([0-9]+)\s*/\s*([A-Za-z]+)\s*")
_RATE_HELP = "expected 'N/unit' with N >= 1 and unit one of second|sec|s, minute|min|m, hour|h, day|d " \
             "(e.g. '60/minute')"


def parse_rate(text: str) -> tuple[int, float]:
    """``"60/minute"`` -> ``(60, 60.0)``: a configured rate limit as (count, period in seconds).

    Deliberately small grammar (no ``100/10s``) so a typo fails at startup instead of
    silently meaning something else.
    """
    match = _RATE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid rate {text!r}: {_RATE_HELP}")
    count = int(match.group(1))
    period = _PERIODS.get(match.group(2).lower())
    if period is None:
        raise ValueError(f"invalid rate {text!r}: unknown unit {match.group(2)!r}; {_RATE_HELP}")
    if count < 1:
        raise ValueError(f"invalid rate {text!r}: the count must be at least 1; {_RATE_HELP}")
    return count, period
