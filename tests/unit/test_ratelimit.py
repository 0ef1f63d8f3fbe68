"""The shared limiter's algorithm, run against both storages (Redis and the in-memory twin) by one
parametrized fixture. A fake clock drives both, so nothing here sleeps or depends on timing: the
Redis scripts take the fake instant in place of Redis ``TIME`` (tests only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.backoff import RetryPolicy, parse_rate
from dispatcher.config import AppConfig, Settings, TargetConfig
from dispatcher.domain import Provider
from dispatcher.providers.base import Op, Outcome, RateLimitInfo, RawResponse, Verdict
from dispatcher.providers.hostup import HostUpAdapter
from dispatcher.ratelimit import (
    EARLY_FRACTION,
    FALLBACK_BLOCK_S,
    LEARNED_TTL_S,
    SAFETY_MARGIN_S,
    UNAVAILABLE_WAIT_S,
    MemoryLimiter,
    Observation,
    RedisLimiter,
    SharedLimiter,
    limiter_for,
    observation,
)

START = 1_800_000_000.0  # 2027-01-15, epoch seconds
LONG = 1e9               # patience that never joins the line: acquire reports the next token


class FakeClock:
    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


@dataclass
class Rig:
    limiter: SharedLimiter
    clock: FakeClock
    kind: str


def make_target(name: str = "hostup", rate: str = "60/minute", burst: int = 1) -> TargetConfig:
    count, period = parse_rate(rate)
    return TargetConfig(
        name=name, provider=Provider.hostup, base_url="http://provider.invalid", api_key=SecretStr("k"),
        timeout_s=5, connect_timeout_s=5, ticket_url_template=None, rate_count=count, rate_period_s=period,
        burst=burst, departments_ttl_s=300, critical_policy="downgrade", retry=RetryPolicy(),
        poll_interval_s=2, poll_deadline_s=900, routes={})


@pytest.fixture(params=["memory", "redis"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """The same limiter on each storage, margin off so the arithmetic is exact."""
    clock = FakeClock()
    if request.param == "memory":
        yield Rig(MemoryLimiter(margin_s=0.0, clock=clock), clock, "memory")
        return
    client: redis.Redis[Any] = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    limiter = RedisLimiter(client, margin_s=0.0, clock=clock)
    yield Rig(limiter, clock, "redis")
    limiter.close()


def rate_limited(retry_after: float | None = None, *, limit: int | None = None, remaining: int | None = None,
                 reset_at: datetime | None = None, code: str = "rate_limit_exceeded") -> Outcome:
    info = RateLimitInfo(limit, remaining, reset_at) if (limit, remaining, reset_at) != (None, None, None) else None
    return Outcome(Verdict.retry, retry_after=retry_after, rate_limit=info, error_code=code)


def grants(limiter: SharedLimiter, target: TargetConfig, tries: int) -> int:
    return sum(1 for _ in range(tries) if limiter.acquire(target) == 0)


# -- the budget ----------------------------------------------------------------------------------

def test_a_fresh_target_sends_its_burst_at_once_then_one_per_interval(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=3)
    assert [rig.limiter.acquire(target) for _ in range(3)] == [0, 0, 0]
    assert rig.limiter.acquire(target, LONG) == pytest.approx(1.0)
    rig.clock.advance(1.0)
    assert rig.limiter.acquire(target) == 0
    assert rig.limiter.acquire(target, LONG) == pytest.approx(1.0)


def test_an_idle_spell_refills_the_burst_and_no_more(rig: Rig) -> None:
    target = make_target(rate="10/second", burst=4)
    grants(rig.limiter, target, 4)
    rig.clock.advance(3600)
    assert grants(rig.limiter, target, 10) == 4


def test_no_window_of_one_period_holds_more_than_rate_plus_burst(rig: Rig) -> None:
    target = make_target(rate="5/second", burst=2)
    sent: list[float] = []
    for _ in range(400):                       # ask every 10 ms for 4 s
        if rig.limiter.acquire(target) == 0:
            sent.append(rig.clock.now)
        rig.clock.advance(0.01)
    busiest = max(sum(1 for t in sent if start <= t < start + 1.0) for start in sent)
    assert busiest <= 5 + 2 - 1
    assert len(sent) >= 5 * 4                  # and the budget is used, not wasted


def test_a_refused_request_takes_no_token(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    assert rig.limiter.acquire(target) == 0
    for _ in range(5):
        assert rig.limiter.acquire(target, LONG) == pytest.approx(1.0)
    rig.clock.advance(1.0)
    assert rig.limiter.acquire(target) == 0


def test_waiters_that_will_not_sleep_get_turns_one_interval_apart(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    rig.limiter.acquire(target)
    turns = [rig.limiter.acquire(target, 0.5) for _ in range(3)]
    assert turns == pytest.approx([1.0, 2.0, 3.0])
    # a worker willing to sleep is told when the next token is, and books no turn
    assert rig.limiter.acquire(target, 5.0) == pytest.approx(1.0)
    assert rig.limiter.acquire(target, 0.5) == pytest.approx(4.0)


def test_a_holder_that_comes_back_early_is_told_the_same_turn(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, holder="a") == pytest.approx(1.0)
    assert rig.limiter.acquire(target, holder="b") == pytest.approx(2.0)
    rig.clock.advance(0.5)
    assert rig.limiter.acquire(target, holder="b") == pytest.approx(1.5)   # not a new turn at the end
    assert rig.limiter.acquire(target, holder="c") == pytest.approx(2.5)
    rig.clock.advance(0.5)
    assert rig.limiter.acquire(target, holder="a") == 0                   # a's turn: it sends
    rig.clock.advance(1.0)
    assert rig.limiter.acquire(target, holder="b") == 0


def test_a_turn_inside_a_later_retry_after_is_replaced(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, holder="a") == pytest.approx(1.0)
    rig.limiter.observe(target, rate_limited(30.0), rig.clock.datetime())
    assert rig.limiter.acquire(target, holder="a") == pytest.approx(30.0)  # a turn after the block


def test_a_turn_is_a_hint_not_a_reservation(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target) == pytest.approx(1.0)  # a turn at +1 s
    rig.clock.advance(1.0)
    assert rig.limiter.acquire(target) == 0                   # whoever asks first at +1 s sends


def test_targets_have_separate_budgets(rig: Rig) -> None:
    hostup, nocworx = make_target("hostup", burst=1), make_target("nocworx", burst=1)
    assert rig.limiter.acquire(hostup) == 0
    assert rig.limiter.acquire(hostup) > 0
    assert rig.limiter.acquire(nocworx) == 0


def with_margin(rig: Rig) -> SharedLimiter:
    """The rig's storage behind a limiter with the production margin (and so the early tolerance)."""
    if rig.kind == "memory":
        return MemoryLimiter(clock=rig.clock)
    return RedisLimiter(rig.limiter.storage.client, clock=rig.clock)  # type: ignore[attr-defined]


def test_the_margin_stretches_each_window_and_a_token_may_go_a_little_early(rig: Rig) -> None:
    limiter = with_margin(rig)
    target = make_target(rate="20/second", burst=1)
    limiter.acquire(target)
    interval = (1.0 + SAFETY_MARGIN_S) / 20
    early = min(EARLY_FRACTION * interval, SAFETY_MARGIN_S / 4)
    assert limiter.acquire(target, LONG) == pytest.approx(interval - early)
    assert [limiter.acquire(target) for _ in range(2)] == pytest.approx([interval - early, 2 * interval - early])


@pytest.mark.parametrize("rate", ["20/second", "3/minute", "1/minute"])
def test_with_the_margin_no_window_of_one_period_holds_more_than_the_rate(rig: Rig, rate: str) -> None:
    limiter = with_margin(rig)
    count, period = parse_rate(rate)
    target = make_target(rate=rate, burst=1)
    sent: list[float] = []
    step = period / count / 37                  # ask often, at no multiple of the interval
    for _ in range(37 * count * 5):
        if limiter.acquire(target) == 0:
            sent.append(rig.clock.now)
        rig.clock.advance(step)
    busiest = max(sum(1 for t in sent if start <= t < start + period) for start in sent)
    assert busiest == count
    assert len(sent) >= count * 5 * 0.95


# -- learning from the server ----------------------------------------------------------------------

def test_nothing_is_sent_before_a_retry_after_has_passed(rig: Rig) -> None:
    target = make_target(rate="10/second", burst=5)
    rig.limiter.observe(target, rate_limited(30.0), rig.clock.datetime())
    assert rig.limiter.acquire(target, LONG) == pytest.approx(30.0)
    rig.clock.advance(29.9)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(0.1)
    rig.clock.advance(0.1)
    assert rig.limiter.acquire(target) == 0


def test_a_shorter_retry_after_does_not_cut_a_longer_one_short(rig: Rig) -> None:
    target = make_target(rate="10/second")
    rig.limiter.observe(target, rate_limited(30.0), rig.clock.datetime())
    rig.limiter.observe(target, rate_limited(2.0), rig.clock.datetime())
    assert rig.limiter.acquire(target, LONG) == pytest.approx(30.0)


def test_waiters_after_a_retry_after_are_spread_from_its_end(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    rig.limiter.observe(target, rate_limited(10.0), rig.clock.datetime())
    assert [rig.limiter.acquire(target) for _ in range(3)] == pytest.approx([10.0, 11.0, 12.0])


def test_retry_after_on_any_answer_blocks_the_target(rig: Rig) -> None:
    target = make_target(rate="10/second")
    unavailable = Outcome(Verdict.retry, retry_after=3.0, error_code="upstream_unavailable")
    rig.limiter.observe(target, unavailable, rig.clock.datetime())
    assert rig.limiter.acquire(target, LONG) == pytest.approx(3.0)


def test_retry_after_as_an_http_date_blocks_until_that_date(rig: Rig) -> None:
    target = make_target(rate="10/second")
    adapter = HostUpAdapter(clock=rig.clock.datetime)
    when = rig.clock.datetime() + timedelta(seconds=45)
    raw = RawResponse(429, {"retry-after": format_datetime(when, usegmt=True)},
                      json.dumps({"code": "rate_limit_exceeded", "detail": "Too many requests"}).encode(), 1.0)
    rig.limiter.observe(target, adapter.classify(Op.create, raw), rig.clock.datetime())
    assert rig.limiter.acquire(target, LONG) == pytest.approx(45.0)


def test_remaining_zero_waits_for_the_reset(rig: Rig) -> None:
    target = make_target(rate="10/second", burst=5)
    answer = Outcome(Verdict.done, rate_limit=RateLimitInfo(limit=100, remaining=0,
                                                            reset_at=rig.clock.datetime() + timedelta(seconds=20)))
    rig.limiter.observe(target, answer, rig.clock.datetime())
    assert rig.limiter.acquire(target, LONG) == pytest.approx(20.0)
    rig.clock.advance(20.0)
    assert rig.limiter.acquire(target) == 0


def test_remaining_above_zero_does_not_block(rig: Rig) -> None:
    target = make_target(rate="10/second")
    answer = Outcome(Verdict.done, rate_limit=RateLimitInfo(limit=100, remaining=3,
                                                            reset_at=rig.clock.datetime() + timedelta(seconds=20)))
    rig.limiter.observe(target, answer, rig.clock.datetime())
    assert rig.limiter.acquire(target) == 0


def test_a_lower_server_limit_wins_until_a_different_limit_is_seen(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=5)
    now = rig.clock.datetime()
    rig.limiter.observe(target, Outcome(Verdict.done, rate_limit=RateLimitInfo(30, 10, now + timedelta(seconds=40))),
                        now)
    assert grants(rig.limiter, target, 10) == 5
    assert rig.limiter.acquire(target, LONG) == pytest.approx(2.0)    # 30 a minute: one every 2 s
    rig.clock.advance(600)
    assert grants(rig.limiter, target, 10) == 5
    assert rig.limiter.acquire(target, LONG) == pytest.approx(2.0)    # still, with no new sighting
    now = rig.clock.datetime()
    rig.limiter.observe(target, Outcome(Verdict.done, rate_limit=RateLimitInfo(120, 100, now + timedelta(seconds=30))),
                        now)
    rig.clock.advance(600)
    grants(rig.limiter, target, 10)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(1.0)    # the configured 60 a minute again


def test_a_higher_server_limit_does_not_raise_the_configured_rate(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)
    now = rig.clock.datetime()
    rig.limiter.observe(target, Outcome(Verdict.done, rate_limit=RateLimitInfo(1000, 999, now + timedelta(seconds=5))),
                        now)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(1.0)


def test_a_learned_limit_caps_the_burst(rig: Rig) -> None:
    target = make_target(rate="100/second", burst=50)
    now = rig.clock.datetime()
    rig.limiter.observe(target, Outcome(Verdict.done, rate_limit=RateLimitInfo(3, 3, now + timedelta(seconds=0.5))),
                        now)
    assert grants(rig.limiter, target, 10) == 3


def test_a_reset_further_away_than_the_period_lengthens_the_learned_window(rig: Rig) -> None:
    target = make_target(rate="10/second", burst=1)   # assumes 1 s windows
    now = rig.clock.datetime()
    rig.limiter.observe(target, rate_limited(1.0, limit=5, remaining=0, reset_at=now + timedelta(seconds=30)), now)
    rig.clock.advance(30)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(6.0)    # 5 per (at least) 30 s


def test_resets_one_window_apart_shorten_an_assumed_window(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=1)   # assumes 60 s windows
    first = rig.clock.datetime()
    rig.limiter.observe(target, rate_limited(limit=2, remaining=0, reset_at=first + timedelta(seconds=0.4)), first)
    rig.clock.advance(1)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(30.0)   # 2 per assumed minute
    second = rig.clock.datetime()
    rig.limiter.observe(target, rate_limited(limit=2, remaining=0, reset_at=first + timedelta(seconds=1.4)), second)
    rig.clock.advance(60)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(1.0)    # 2 a second: the configured rate wins


def test_resets_one_window_apart_pin_a_window_longer_than_the_period(rig: Rig) -> None:
    target = make_target(rate="10/second", burst=1)   # assumes 1 s windows; the provider's are 2 s
    first = rig.clock.datetime()
    rig.limiter.observe(target, rate_limited(limit=3, remaining=0, reset_at=first + timedelta(seconds=1.5)), first)
    rig.clock.advance(2)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(0.5)    # 3 per (at least) 1.5 s
    second = rig.clock.datetime()
    rig.limiter.observe(target, rate_limited(limit=3, remaining=0, reset_at=first + timedelta(seconds=3.5)), second)
    rig.clock.advance(60)
    rig.limiter.acquire(target)
    assert rig.limiter.acquire(target, LONG) == pytest.approx(2 / 3)  # 3 per 2 s: resets 2 s apart, one 1.5 s off


def test_the_critical_per_hour_refusal_is_not_a_rate_limit(rig: Rig) -> None:
    target = make_target(rate="10/second", burst=1)
    adapter = HostUpAdapter(clock=rig.clock.datetime)
    reset = (rig.clock.datetime() + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    raw = RawResponse(429, {"retry-after": "3600", "x-ratelimit-limit": "1", "x-ratelimit-remaining": "0",
                            "x-ratelimit-reset": reset},
                      json.dumps({"code": "rate_limited", "detail": "You already sent a critical alert in the last "
                                  "hour. Reply to the existing ticket instead."}).encode(), 1.0)
    outcome = adapter.classify(Op.create, raw)
    assert outcome.error_code == "critical_rate_limited"
    rig.limiter.observe(target, outcome, rig.clock.datetime())
    assert rig.limiter.acquire(target) == 0
    rig.clock.advance(0.1)
    assert rig.limiter.acquire(target) == 0                           # and no limit of 1 was learned


def test_a_429_with_no_hint_at_all_still_blocks_briefly(rig: Rig) -> None:
    target = make_target(rate="10/second")
    rig.limiter.observe(target, rate_limited(code="rate_limited"), rig.clock.datetime())
    assert rig.limiter.acquire(target, LONG) == pytest.approx(FALLBACK_BLOCK_S)


def test_an_answer_without_hints_changes_nothing(rig: Rig) -> None:
    target = make_target(rate="60/minute", burst=2)
    rig.limiter.observe(target, Outcome(Verdict.done), rig.clock.datetime())
    rig.limiter.observe(target, Outcome(Verdict.retry, error_code="network"), rig.clock.datetime())
    assert grants(rig.limiter, target, 5) == 2


# -- reading an answer (pure) ----------------------------------------------------------------------

NOW = datetime(2027, 1, 15, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("outcome", "expected"), [
    (Outcome(Verdict.done), None),
    (Outcome(Verdict.retry, error_code="network"), None),
    (rate_limited(7.0), Observation(block_s=7.0)),
    (rate_limited(limit=50, remaining=0, reset_at=NOW + timedelta(seconds=12)),
     Observation(block_s=12.0, limit=50, reset_in=12.0, reset_at=(NOW + timedelta(seconds=12)).timestamp())),
    (Outcome(Verdict.done, rate_limit=RateLimitInfo(remaining=0)), Observation(block_s=60.0)),
    (Outcome(Verdict.done, rate_limit=RateLimitInfo(limit=10, remaining=4)), Observation(limit=10)),
    (rate_limited(3600.0, limit=1, remaining=0, reset_at=NOW, code="critical_rate_limited"), None),
], ids=["plain-answer", "network-error", "retry-after", "remaining-zero-with-reset",
        "remaining-zero-no-reset-waits-a-period", "limit-only", "critical-refusal"])
def test_what_an_answer_says_about_the_limit(outcome: Outcome, expected: Observation | None) -> None:
    assert observation(outcome, NOW, period_s=60.0) == expected


# -- Redis specifics -------------------------------------------------------------------------------

@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis[Any]]:
    client: redis.Redis[Any] = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_redis_state_is_namespaced_per_target_and_expires(redis_client: redis.Redis[Any]) -> None:
    limiter = RedisLimiter(redis_client)
    target = make_target("hostup", rate="60/minute", burst=1)
    limiter.acquire(target)
    limiter.acquire(target)
    now = datetime.now(UTC)
    limiter.observe(target, rate_limited(5.0, limit=30, remaining=0, reset_at=now + timedelta(seconds=5)), now)
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert keys == [f"dispatcher:rl:hostup:{k}" for k in ("block", "learned", "line", "tat")]
    for key in keys:
        assert 0 < redis_client.ttl(key) <= (LEARNED_TTL_S if key.endswith("learned") else 200)


def test_redis_limiter_reads_redis_time_not_the_worker_clock(redis_client: redis.Redis[Any]) -> None:
    limiter = RedisLimiter(redis_client, margin_s=0.0)
    target = make_target(rate="60/minute", burst=1)
    assert limiter.acquire(target) == 0
    seconds, micros = redis_client.time()
    tat = float(redis_client.get("dispatcher:rl:hostup:tat") or 0)
    assert abs(tat - (seconds + micros / 1e6 + 1.0)) < 0.5


def test_limiters_on_one_redis_share_one_budget(redis_url: str) -> None:
    clock = FakeClock()
    first = RedisLimiter(redis.Redis.from_url(redis_url), clock=clock)
    second = RedisLimiter(redis.Redis.from_url(redis_url), clock=clock)
    target = make_target(rate="60/minute", burst=4)
    taken = [first.acquire(target) == 0, second.acquire(target) == 0, first.acquire(target) == 0,
             second.acquire(target) == 0, first.acquire(target) == 0, second.acquire(target) == 0]
    assert taken == [True, True, True, True, False, False]
    first.observe(target, rate_limited(20.0), clock.datetime())
    clock.advance(10)
    assert second.acquire(target, LONG) == pytest.approx(10.0)
    first.close()
    second.close()


def test_an_unreachable_redis_holds_sends_back_instead_of_sending_unmetered() -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    limiter = RedisLimiter(unreachable)
    target = make_target()
    assert limiter.acquire(target) == UNAVAILABLE_WAIT_S
    limiter.observe(target, rate_limited(5.0), datetime.now(UTC))  # logged, not raised
    limiter.close()


@pytest.mark.parametrize(("redis_url", "broker_url", "expected"), [
    ("redis://127.0.0.1:6379/3", None, RedisLimiter),
    (None, "redis://127.0.0.1:6379/2", RedisLimiter),
    ("redis://127.0.0.1:6379/3", "amqp://guest@localhost//", RedisLimiter),
    (None, "amqp://guest@localhost//", MemoryLimiter),
    (None, None, MemoryLimiter),
])
def test_limiter_for_shares_through_redis_when_there_is_one(redis_url: str | None, broker_url: str | None,
                                                            expected: type) -> None:
    config = AppConfig(settings=Settings(redis_url=redis_url, broker_url=broker_url))
    limiter = limiter_for(config)
    assert type(limiter) is expected
    limiter.close()
