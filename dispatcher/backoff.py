"""When to send again after a failed attempt, and when to look again at a pending NocWorx task.
Pure: no I/O, no clock; randomness is passed in.

Retry policy is data (one :class:`RetryPolicy` per target, from configuration) so the worker,
the tests and the simulator all agree on it. Jitter spreads retries so that many workers that
failed together do not come back together. The poll schedule (:class:`PollPolicy`,
:func:`poll_wait`) is data in the same way.
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
#: a pending NocWorx task's first look comes this long after its 202 (unless configured otherwise)
FIRST_POLL_S = 0.5


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


@dataclass(frozen=True)
class PollPolicy:
    """When a pending NocWorx task is looked at again (``[targets.X.poll]``); see :func:`poll_wait`.

    ``first_s``: the first look, that long after the task was accepted (its 202).
    ``interval_s``, ``growth``: a look made ``e`` seconds after the 202 is followed by the next one
    ``interval_s + growth * e`` seconds later, at most ``max_interval_s``.

    The defaults keep the time from a task's resolution to our seeing it (the lag) within
    ``0.1 * d + 1 s`` for a task that takes ``d`` seconds, not counting the few milliseconds a poll
    itself takes: the look that finds the task resolved follows one made at some ``e < d``, and comes
    at most ``interval_s + growth * e < 1 + 0.1 * d`` seconds after it. The cap does not break that
    bound: it only binds once ``1 + 0.1 * e`` exceeds 30 s, i.e. for tasks older than 290 s, whose
    bound is already above 30 s. A task resolves at no particular point of the interval it falls
    in, so the typical lag is about half the bound (a median lag/bound near 0.5: margin for the
    goal "median lag under 10 % of the duration + 1 s", and for a poll delayed by a busy worker).
    Looks up to and including the one that sees a task resolved (the k-th look, counting from 0,
    comes at ``(first_s + interval_s/growth) * (1 + growth)**k - interval_s/growth`` until the cap):
    8 for a 10 s task, 21 for 60 s, 28 for 120 s, where a fixed 1 s interval needs 10, 60 and 120
    for a lag bound of 1 s; a task stuck until the default 900 s deadline costs 57 looks instead of
    450 at the old fixed 2 s. ``first_s`` = 0.5 s catches tasks that
    resolve at once (the provider's back office is often quick) without a full interval.
    ``max_interval_s`` = 30 s keeps every wait a Celery countdown under the scheduler's default
    ``short_wait_s`` (30 s); a longer cap works too, those waits go through Postgres.

    ``growth = 0`` and ``first_s = interval_s`` is plain fixed-interval polling.
    """

    first_s: float = FIRST_POLL_S
    interval_s: float = 1.0
    growth: float = 0.1
    max_interval_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("first_s", "interval_s", "growth", "max_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.first_s <= 0 or self.interval_s <= 0:
            raise ValueError(f"first_s and interval_s must be > 0, got first_s={self.first_s!r}, "
                             f"interval_s={self.interval_s!r}")
        if self.growth < 0:
            raise ValueError(f"growth must be >= 0, got {self.growth!r}")
        if self.max_interval_s < max(self.interval_s, self.first_s):
            raise ValueError(f"max_interval_s must not be less than interval_s or first_s, got "
                             f"max_interval_s={self.max_interval_s!r}, interval_s={self.interval_s!r}, "
                             f"first_s={self.first_s!r}")

    def wait(self, elapsed_s: float) -> float:
        """:func:`poll_wait` under this policy."""
        return poll_wait(elapsed_s, self)

    def describe(self) -> str:
        """The schedule in words, for an intent's story."""
        if self.growth == 0 and self.first_s == self.interval_s:
            return f"every {self.interval_s:g} s"
        grows = f" + {self.growth:g} x the task's age" if self.growth else ""
        return (f"first after {self.first_s:g} s, then every {self.interval_s:g} s{grows} "
                f"(at most {self.max_interval_s:g} s)")


def poll_wait(elapsed_s: float, policy: PollPolicy) -> float:
    """Seconds from a look at a pending task to the next one.

    ``elapsed_s`` is when the look was made, in seconds since the task was accepted (its 202);
    0 or less means the 202 itself, answered ``first_s``. After that: ``interval_s + growth *
    elapsed_s``, at most ``max_interval_s``. A server's ``Retry-After`` and the poll deadline are
    the caller's to apply (the wait is at least the one, and the last look is right at the other).
    A ``elapsed_s`` that is not a finite number counts as the 202.
    """
    if not math.isfinite(elapsed_s) or elapsed_s <= 0:
        return policy.first_s
    return min(policy.max_interval_s, policy.interval_s + policy.growth * elapsed_s)
