"""Retry policy: full-jitter backoff, Retry-After as a floor, giving up, rate strings; the poll schedule."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from dispatcher.backoff import PollPolicy, RetryPolicy, backoff_wait, next_retry, parse_rate, poll_wait

SEEDS = range(300)
POLICY = RetryPolicy(max_attempts=8, base_s=2.0, cap_s=300.0, final_codes=frozenset({"forbidden"}))


@pytest.mark.parametrize("kwargs", [
    {"max_attempts": 0},
    {"max_attempts": -1},
    {"max_attempts": True},
    {"max_attempts": 2.5},
    {"base_s": 0.0},
    {"base_s": -1.0},
    {"base_s": 10.0, "cap_s": 5.0},
    {"base_s": math.nan},
    {"cap_s": math.inf},
    {"final_codes": "rate_limited"},
])
def test_invalid_policy_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {},
    {"max_attempts": 1},
    {"base_s": 5.0, "cap_s": 5.0},
    {"base_s": 0.01, "cap_s": 0.5},
])
def test_valid_policy_is_accepted(kwargs: dict[str, Any]) -> None:
    RetryPolicy(**kwargs)


def test_final_codes_from_configuration_list_become_a_frozenset() -> None:
    policy = RetryPolicy(final_codes=["rate_limited", "forbidden"])  # type: ignore[arg-type]
    assert policy.final_codes == frozenset({"rate_limited", "forbidden"})
    assert hash(policy) == hash(RetryPolicy(final_codes=frozenset({"forbidden", "rate_limited"})))


@pytest.mark.parametrize(("attempt", "ceiling"), [
    (1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (8, 256.0), (9, 300.0), (12, 300.0),
])
def test_backoff_wait_stays_within_full_jitter_bounds(attempt: int, ceiling: float) -> None:
    waits = [backoff_wait(POLICY, attempt, random.Random(seed)) for seed in SEEDS]
    assert all(0.0 <= wait <= ceiling for wait in waits)
    # full jitter: the waits spread over the whole range, not bunched at the top
    assert min(waits) < 0.1 * ceiling
    assert max(waits) > 0.9 * ceiling


@pytest.mark.parametrize("attempt", [9, 20, 64, 1024, 5000, 10**6])
def test_backoff_wait_never_exceeds_the_cap(attempt: int) -> None:
    assert all(backoff_wait(POLICY, attempt, random.Random(seed)) <= POLICY.cap_s for seed in SEEDS)


def test_backoff_wait_is_reproducible_with_the_same_seed() -> None:
    assert backoff_wait(POLICY, 4, random.Random(7)) == backoff_wait(POLICY, 4, random.Random(7))


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_are_one_based(attempt: int) -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_wait(POLICY, attempt, random.Random(0))
    with pytest.raises(ValueError, match="1-based"):
        next_retry(POLICY, attempt=attempt, error_code=None, retry_after=None, rng=random.Random(0))


@pytest.mark.parametrize("retry_after", [0.0, 1.0, 30.0, 3600.0, 0.25, 12.5])
def test_retry_after_is_a_floor_with_a_small_jitter(retry_after: float) -> None:
    jitter = min(1.0, 0.1 * retry_after)
    waits = [next_retry(POLICY, attempt=1, error_code="rate_limit_exceeded", retry_after=retry_after,
                        rng=random.Random(seed)) for seed in SEEDS]
    for wait in waits:
        assert wait is not None
        assert retry_after <= wait <= retry_after + jitter
    if jitter:
        assert len(set(waits)) > 1  # workers told the same Retry-After do not all come back together


def test_retry_after_beyond_the_cap_is_still_honoured() -> None:
    wait = next_retry(POLICY, attempt=7, error_code=None, retry_after=3600.0, rng=random.Random(1))
    assert wait is not None and wait >= 3600.0 > POLICY.cap_s


@pytest.mark.parametrize("retry_after", [-5.0, -0.001])
def test_negative_retry_after_means_retry_now(retry_after: float) -> None:
    assert next_retry(POLICY, attempt=1, error_code=None, retry_after=retry_after,
                      rng=random.Random(0)) == 0.0


@pytest.mark.parametrize("retry_after", [None, math.nan, math.inf, -math.inf])
def test_missing_or_unreadable_retry_after_falls_back_to_backoff(retry_after: float | None) -> None:
    for seed in SEEDS:
        wait = next_retry(POLICY, attempt=3, error_code=None, retry_after=retry_after,
                          rng=random.Random(seed))
        assert wait == backoff_wait(POLICY, 3, random.Random(seed))


@pytest.mark.parametrize(("max_attempts", "attempt", "gives_up"), [
    (8, 1, False),
    (8, 7, False),
    (8, 8, True),
    (8, 9, True),
    (1, 1, True),
    (2, 1, False),
    (2, 2, True),
])
def test_gives_up_once_max_attempts_were_sent(max_attempts: int, attempt: int, gives_up: bool) -> None:
    policy = RetryPolicy(max_attempts=max_attempts)
    for retry_after in (None, 5.0):
        wait = next_retry(policy, attempt=attempt, error_code=None, retry_after=retry_after,
                          rng=random.Random(0))
        assert (wait is None) is gives_up


@pytest.mark.parametrize(("error_code", "retry_after", "gives_up"), [
    ("forbidden", None, True),
    ("forbidden", 10.0, True),
    ("rate_limited", 10.0, True),
    ("rate_limit_exceeded", 10.0, False),
    ("internal_error", None, False),
    ("Rate_Limited", None, False),
    (None, None, False),
])
def test_final_codes_are_never_retried(error_code: str | None, retry_after: float | None,
                                       gives_up: bool) -> None:
    policy = RetryPolicy(final_codes=frozenset({"forbidden", "rate_limited"}))
    wait = next_retry(policy, attempt=1, error_code=error_code, retry_after=retry_after,
                      rng=random.Random(0))
    assert (wait is None) is gives_up


@pytest.mark.parametrize(("text", "expected"), [
    ("60/minute", (60, 60.0)),
    ("20/s", (20, 1.0)),
    ("5/second", (5, 1.0)),
    ("5/sec", (5, 1.0)),
    ("10/m", (10, 60.0)),
    ("10/min", (10, 60.0)),
    ("1000/hour", (1000, 3600.0)),
    ("1000/h", (1000, 3600.0)),
    ("50000/day", (50000, 86400.0)),
    ("1/d", (1, 86400.0)),
    (" 60 / Minute ", (60, 60.0)),
])
def test_parse_rate_reads_count_and_period(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", [
    "", "60", "/minute", "60/", "60/minutes", "60/fortnight", "100/10s", "1.5/s", "-5/s", "0/s",
    "60 per minute", "60/minute/extra", "\uff16\uff10/s", "60/ms",
])
def test_parse_rate_refuses_anything_else_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid rate .*expected 'N/unit'"):
        parse_rate(text)


# -- the poll schedule ------------------------------------------------------------------------------

FIXED_2S = PollPolicy(first_s=2.0, interval_s=2.0, growth=0.0)


def poll_times(policy: PollPolicy, until: float) -> list[float]:
    """When the looks come (seconds after the 202), polls taking no time, up to the first at or past ``until``."""
    times = [poll_wait(0.0, policy)]
    while times[-1] < until:
        times.append(times[-1] + poll_wait(times[-1], policy))
    return times


@pytest.mark.parametrize(("policy", "elapsed", "expected"), [
    (PollPolicy(), 0.0, 0.5),                        # the 202 itself: the first look
    (PollPolicy(), -3.0, 0.5),                       # a clock behind the 202 counts as the 202
    (PollPolicy(), math.nan, 0.5),
    (PollPolicy(), 0.5, 1.05),                       # then interval_s + growth x the task's age
    (PollPolicy(), 10.0, 2.0),
    (PollPolicy(), 120.0, 13.0),
    (PollPolicy(), 290.0, 30.0),                     # the cap is reached ...
    (PollPolicy(), 5000.0, 30.0),                    # ... and kept
    (PollPolicy(), math.inf, 0.5),
    (PollPolicy(first_s=0.2, interval_s=0.5, growth=0.5, max_interval_s=3.0), 0.0, 0.2),
    (PollPolicy(first_s=0.2, interval_s=0.5, growth=0.5, max_interval_s=3.0), 2.0, 1.5),
    (PollPolicy(first_s=0.2, interval_s=0.5, growth=0.5, max_interval_s=3.0), 10.0, 3.0),
    (FIXED_2S, 0.0, 2.0),
    (FIXED_2S, 2.0, 2.0),
    (FIXED_2S, 800.0, 2.0),
])
def test_poll_wait_is_first_s_then_grows_with_the_tasks_age_up_to_the_cap(
        policy: PollPolicy, elapsed: float, expected: float) -> None:
    assert poll_wait(elapsed, policy) == pytest.approx(expected)
    assert policy.wait(elapsed) == poll_wait(elapsed, policy)


@pytest.mark.parametrize("interval", [0.25, 1.0, 2.0, 5.0])
def test_no_growth_and_first_look_at_the_interval_is_fixed_interval_polling(interval: float) -> None:
    policy = PollPolicy(first_s=interval, interval_s=interval, growth=0.0, max_interval_s=max(30.0, interval))
    times = poll_times(policy, 100.0)
    assert times == pytest.approx([interval * n for n in range(1, len(times) + 1)])
    assert policy.describe() == f"every {interval:g} s"


@pytest.mark.parametrize("duration", [0.3, 0.5, 0.9, 1.5, 2.0, 5.0, 10.0, 30.0, 60.0, 90.0, 119.9, 120.0, 300.0, 900.0])
def test_the_default_schedule_sees_a_task_within_ten_percent_of_its_duration_plus_one_second(duration: float) -> None:
    seen = next(t for t in poll_times(PollPolicy(), duration) if t >= duration)
    assert seen - duration <= 0.1 * duration + 1.0 + 1e-9


def test_the_lag_bound_holds_for_every_duration_on_a_fine_grid_up_to_the_default_deadline() -> None:
    times = poll_times(PollPolicy(), 900.0)
    worst = 0.0
    for step in range(1, 90_001):                    # every 10 ms up to 900 s
        duration = step / 100
        seen = next(t for t in times if t >= duration)
        worst = max(worst, (seen - duration) / (0.1 * duration + 1.0))
    assert worst <= 1.0


@pytest.mark.parametrize(("duration", "looks"), [(0.5, 1), (1.0, 2), (10.0, 8), (60.0, 21), (120.0, 28), (900.0, 57)])
def test_the_default_schedule_needs_few_looks_for_slow_tasks(duration: float, looks: int) -> None:
    assert len(poll_times(PollPolicy(), duration)) == looks
    assert len(poll_times(FIXED_2S, 900.0)) == 450  # the old default, for comparison


@pytest.mark.parametrize("kwargs", [
    {"first_s": 0.0},
    {"first_s": -1.0},
    {"interval_s": 0.0},
    {"growth": -0.1},
    {"growth": math.nan},
    {"max_interval_s": math.inf},
    {"interval_s": 5.0, "max_interval_s": 4.0},
    {"first_s": 40.0},
    {"interval_s": True},
])
def test_invalid_poll_policy_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PollPolicy(**kwargs)
