"""The shared per-target send budget: GCRA in Redis (one atomic Lua script per operation), with an
in-process twin for the embedded default. Every worker on every machine draws from the same budget.

Configuration (per target, in the targets file)::

    [targets.hostup]
    rate = "60/minute"   # the provider's limit: N/second | N/minute | N/hour | N/day
    burst = 5            # requests that may go back to back after a quiet spell (>= 1)

The workers together send at most ``burst`` requests at once, then one every ``period / N``
seconds, with the period stretched by :data:`SAFETY_MARGIN_S`: in any window of one period at most
``N + burst - 1`` requests leave. Against a provider that counts in fixed windows, ``burst = 1``
is the setting that never draws a 429 (a burst at the end of one window plus the rate in the next
can exceed N).

What the provider says wins over the file (:meth:`SharedLimiter.observe`, fed every answer):

- ``Retry-After`` (seconds or an HTTP date) on any answer: no worker sends to the target before it
  has passed (design.md guarantee 3). A 429 with no hint at all blocks for
  :data:`FALLBACK_BLOCK_S`.
- ``X-RateLimit-Remaining: 0``: no worker sends before ``X-RateLimit-Reset``.
- ``X-RateLimit-Limit`` ("requests allowed in the active window") lower than the configured rate:
  the lower rate is used until a different limit is seen (kept :data:`LEARNED_TTL_S` after the
  last sighting). The window it applies to is the configured period, corrected by what the reset
  times show: a reset ``r`` seconds away means the window is at least ``r`` long; two different
  reset instants ``d`` seconds apart mean it is ``d / k`` long for some whole ``k``, so at most
  ``d``, and exactly ``d`` once some reset was seen more than ``d / 2`` away.
- HostUp's one-critical-ticket-an-hour 429 (``critical_rate_limited``) is a policy refusal of one
  ticket, not a rate limit: it is ignored here (the service applies ``critical_policy``).

Waiting. :meth:`SharedLimiter.acquire` never reserves a token: it takes one or says how long
until one may be free. A caller that will not sleep that long in-process joins the target's *line*:
it is handed the next free turn (one per emission interval, after any block) and comes back then.
The line spreads a backlog over time, oldest throttled first, instead of waking every waiting
intent for every token. The turn is remembered for its holder (the intent), so one that comes
back early (parked in Postgres, the scheduler hands it out early) is told the same turn again.

Pauses (a 401/403 pauses the target, ``target_states``): a paused target's intents are put back
before they ask the limiter, so they spend no tokens and take no turns; a Retry-After block or a
learned limit outlives the pause (resuming does not make the provider forget what it said), and
the intents made due by ``resume_target`` go through the limiter like any others.

Redis keys, per target (all expire on their own once they no longer matter)::

    dispatcher:rl:<target>:tat      GCRA theoretical arrival time    TTL: until it passes, + 60 s
    dispatcher:rl:<target>:line     next free turn in the line        TTL: until it passes, + 60 s
    dispatcher:rl:<target>:block    no sends before this instant      TTL: until it passes, + 60 s
    dispatcher:rl:<target>:learned  hash: limit, window bounds        TTL: LEARNED_TTL_S after last seen
    dispatcher:rl:<target>:turn:<intent id>  its turn in the line      TTL: until it passes, + 60 s

Times are Redis ``TIME`` (one clock for every machine), never a worker's own clock; durations the
provider gave relative to an answer are converted to seconds before they reach Redis.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dispatcher.config import AppConfig, TargetConfig
from dispatcher.providers.base import Outcome, Verdict

log = logging.getLogger(__name__)

#: each window is taken to be this much longer than it is. A provider counting in fixed windows sees
#: our requests after a variable delay (database write, HTTP, its own queue: 3 ms typical, 40 ms at
#: the 99th percentile under load), so N requests sent exactly one window apart can land N+1 in
#: one of its windows; with the window stretched by 30 ms they need 30 ms of jitter between them to
#: do that. Costs 3 % of a per-second budget and 0.05 % of a per-minute one.
SAFETY_MARGIN_S = 0.03
#: a request may take its token up to this fraction of an interval early (and at most a quarter of
#: the margin, so the window bound holds): a worker woken for a token is a millisecond or two late,
#: and without this every such delay would be lost from the budget for good.
EARLY_FRACTION = 0.1
#: how long a learned server limit is kept after it was last seen
LEARNED_TTL_S = 86_400
#: how long a 429 that carries no Retry-After and no X-RateLimit-Reset stops the target
FALLBACK_BLOCK_S = 1.0
#: when the shared store cannot be reached, wait this long rather than send unmetered (fail closed)
UNAVAILABLE_WAIT_S = 5.0
#: error codes of a 429 that is a rate limit (the critical-per-hour refusal is renamed by the adapter)
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "rate_limited"})
#: the HostUp adapter's code for "one critical ticket an hour": not a rate limit
CRITICAL_CODE = "critical_rate_limited"
#: keys outlive the instant they record by this much (a stale instant is as good as none)
KEY_SLACK_S = 60.0


def key_prefix(target: str) -> str:
    return f"dispatcher:rl:{target}:"


@dataclass(frozen=True)
class Budget:
    """One target's configured budget, as the algorithm needs it."""

    interval_s: float   # period / count: the configured emission interval
    burst: int
    period_s: float     # the configured period: the window assumed for a learned limit
    margin_s: float     # SAFETY_MARGIN_S

    @classmethod
    def of(cls, target: TargetConfig, margin_s: float) -> Budget:
        return cls(target.rate_period_s / target.rate_count, max(1, target.burst), target.rate_period_s, margin_s)


@dataclass(frozen=True)
class Observation:
    """What one answer says about the target's limit, in seconds relative to the answer."""

    block_s: float | None = None        # send nothing for this long
    limit: int | None = None            # X-RateLimit-Limit
    reset_in: float | None = None       # seconds until X-RateLimit-Reset (a lower bound on the window)
    reset_at: float | None = None       # X-RateLimit-Reset as epoch seconds (the provider's clock)


def observation(outcome: Outcome, now: datetime, period_s: float) -> Observation | None:
    """Read an answer's rate-limit hints; None when it has none (the usual case). Pure."""
    if outcome.error_code == CRITICAL_CODE:
        return None
    block: float | None = None
    if outcome.retry_after is not None and math.isfinite(outcome.retry_after):
        block = max(0.0, outcome.retry_after)
    limit = reset_in = reset_at = None
    info = outcome.rate_limit
    if info is not None:
        if info.reset_at is not None:
            reset_at = info.reset_at.timestamp()
            reset_in = max(0.0, (info.reset_at - now).total_seconds())
        if info.limit is not None and info.limit > 0:
            limit = info.limit
        if info.remaining is not None and info.remaining <= 0:
            block = max(block or 0.0, reset_in if reset_in is not None else period_s)
    if block is None and reset_in is None and outcome.verdict is Verdict.retry \
            and outcome.error_code in RATE_LIMIT_CODES:
        block = FALLBACK_BLOCK_S
    if block is None and limit is None:
        return None
    return Observation(block_s=block, limit=limit, reset_in=reset_in, reset_at=reset_at)


class Storage(Protocol):
    """Where the algorithm keeps its state; each call is atomic."""

    def acquire(self, target: str, budget: Budget, patience_s: float, holder: str | None) -> float: ...

    def observe(self, target: str, budget: Budget, seen: Observation) -> None: ...

    def close(self) -> None: ...


class SharedLimiter:
    """The limiter the service uses (:class:`dispatcher.service.Limiter`), over a storage."""

    def __init__(self, storage: Storage, *, margin_s: float = SAFETY_MARGIN_S) -> None:
        self.storage = storage
        self.margin_s = margin_s

    def acquire(self, target: TargetConfig, patience_s: float = 0.0, holder: str | None = None) -> float:
        """0: a token was taken, send now. ``0 < w <= patience_s``: a token may be free in ``w``
        seconds, ask again then. ``w > patience_s``: the caller was given a turn in the target's line
        ``w`` seconds from now and should come back then (a hint that spreads waiters, not a
        reservation). A ``holder`` (an intent id) that asks again before its turn is told the same
        turn, so coming back early never costs its place."""
        return self.storage.acquire(target.name, Budget.of(target, self.margin_s), max(0.0, patience_s), holder)

    def observe(self, target: TargetConfig, outcome: Outcome, now: datetime) -> None:
        """Learn from an answer's Retry-After and X-RateLimit-* headers (see the module docstring)."""
        seen = observation(outcome, now, target.rate_period_s)
        if seen is not None:
            self.storage.observe(target.name, Budget.of(target, self.margin_s), seen)

    def close(self) -> None:
        self.storage.close()


# -- the algorithm, in Python (the in-memory twin) -------------------------------------------------
# The Lua below is the same algorithm, line for line; tests/unit/test_ratelimit.py runs one suite
# against both.

@dataclass
class _State:
    tat: float = -math.inf          # GCRA theoretical arrival time
    line: float = -math.inf         # the next free turn in the line
    block: float = -math.inf        # nothing is sent before this
    limit: int | None = None        # learned X-RateLimit-Limit
    window_lb: float = 0.0          # the learned limit's window is at least this long ...
    window_ub: float = -1.0         # ... and at most this long (-1: unknown)
    last_reset: float = -1.0        # the last X-RateLimit-Reset seen (provider epoch seconds)
    learned_until: float = -math.inf
    turns: dict[str, float] = field(default_factory=dict)   # holder -> its turn in the line


def _effective(budget: Budget, state: _State) -> tuple[float, float]:
    """Emission interval and tolerance (how early a request may go): from the configured budget, or
    from the server's limit when that is stricter."""
    interval, burst, window = budget.interval_s, budget.burst, budget.period_s
    if state.limit is not None and state.limit > 0:
        learned = budget.period_s
        if 0 < state.window_ub < learned or 0 < state.window_ub < 2 * state.window_lb:
            learned = state.window_ub
        learned = max(learned, state.window_lb)
        if learned / state.limit > interval:
            interval, window = learned / state.limit, learned
        burst = min(burst, state.limit)
    interval *= 1 + budget.margin_s / window
    early = min(EARLY_FRACTION * interval, budget.margin_s / 4)
    return interval, (burst - 1) * interval + early


def _acquire(state: _State, budget: Budget, now: float, patience: float, holder: str | None) -> float:
    interval, tau = _effective(budget, state)
    mine = state.turns.get(holder, -1.0) if holder is not None else -1.0
    if mine >= state.block and mine - now > patience:
        return mine - now                       # back early: the same turn
    tat = max(state.tat, now)
    free = max(tat - tau, state.block)
    if free <= now:
        state.tat = tat + interval
        if holder is not None:
            state.turns.pop(holder, None)
        return 0.0
    wait = free - now
    if wait <= patience:
        return wait
    turn = max(free, state.line)
    state.line = turn + interval
    if holder is not None:
        state.turns[holder] = turn
    return turn - now


def _observe(state: _State, seen: Observation, now: float) -> None:
    if seen.block_s is not None:
        state.block = max(state.block, now + seen.block_s)
    if seen.limit is not None and seen.limit > 0:
        if state.limit != seen.limit:
            state.limit, state.window_lb, state.window_ub, state.last_reset = seen.limit, 0.0, -1.0, -1.0
        if seen.reset_in is not None:
            state.window_lb = max(state.window_lb, seen.reset_in)
        if seen.reset_at is not None:
            if state.last_reset >= 0:
                apart = abs(seen.reset_at - state.last_reset)
                if apart > 0.001 and (state.window_ub < 0 or apart < state.window_ub):
                    state.window_ub = apart
            state.last_reset = seen.reset_at
        state.learned_until = now + LEARNED_TTL_S


class MemoryStorage:
    """One process's budget, under a lock; the clock is injectable (epoch seconds)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}

    def _state(self, target: str, now: float) -> _State:
        state = self._states.setdefault(target, _State())
        if state.limit is not None and now >= state.learned_until:  # as the Redis hash expires
            state.limit, state.window_lb, state.window_ub, state.last_reset = None, 0.0, -1.0, -1.0
        return state

    def acquire(self, target: str, budget: Budget, patience_s: float, holder: str | None) -> float:
        with self._lock:
            now = self.clock()
            state = self._state(target, now)
            if len(state.turns) > 1000:         # as the Redis turn keys expire
                state.turns = {h: t for h, t in state.turns.items() if t > now - KEY_SLACK_S}
            return _acquire(state, budget, now, patience_s, holder)

    def observe(self, target: str, budget: Budget, seen: Observation) -> None:
        with self._lock:
            now = self.clock()
            _observe(self._state(target, now), seen, now)

    def close(self) -> None:
        return None


# -- the algorithm, in Lua (Redis) ----------------------------------------------------------------

_PRELUDE = """
local function clock(arg)
  local now = tonumber(arg)
  if now == nil or now < 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return now
end
local function fmt(x) return string.format('%.17g', x) end
local function num(v, default)
  local n = tonumber(v)
  if n == nil then return default end
  return n
end
local function set_until(key, value, now, slack)
  local ms = math.ceil((value - now + slack) * 1000)
  if ms < 1 then ms = 1 end
  redis.call('SET', key, fmt(value), 'PX', ms)
end
"""

#: KEYS: tat, line, block, learned, the holder's turn. ARGV: now (<0: Redis TIME), interval, burst,
#: period, margin_s, patience, slack, early fraction, has holder ("1"/"0"). Returns the wait as a
#: string ("0": a token was taken).
_ACQUIRE = _PRELUDE + """
local now = clock(ARGV[1])
local interval, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local period, margin = tonumber(ARGV[4]), tonumber(ARGV[5])
local patience, slack = tonumber(ARGV[6]), tonumber(ARGV[7])
local window = period
local learned = redis.call('HMGET', KEYS[4], 'limit', 'lb', 'ub')
local limit = num(learned[1], 0)
if limit > 0 then
  local span = period
  local ub, lb = num(learned[3], -1), num(learned[2], 0)
  if ub > 0 and (ub < span or ub < 2 * lb) then span = ub end
  if lb > span then span = lb end
  if span / limit > interval then interval, window = span / limit, span end
  if limit < burst then burst = limit end
end
interval = interval * (1 + margin / window)
local early = math.min(tonumber(ARGV[8]) * interval, margin / 4)
local tau = (burst - 1) * interval + early
local holder = ARGV[9] == '1'
local block = num(redis.call('GET', KEYS[3]), -1)
if holder then
  local mine = num(redis.call('GET', KEYS[5]), -1)
  if mine >= block and mine - now > patience then return fmt(mine - now) end
end
local tat = num(redis.call('GET', KEYS[1]), now)
if tat < now then tat = now end
local free = tat - tau
if block > free then free = block end
if free <= now then
  set_until(KEYS[1], tat + interval, now, slack)
  if holder then redis.call('DEL', KEYS[5]) end
  return '0'
end
local wait = free - now
if wait <= patience then return fmt(wait) end
local turn = num(redis.call('GET', KEYS[2]), free)
if free > turn then turn = free end
set_until(KEYS[2], turn + interval, now, slack)
if holder then set_until(KEYS[5], turn, now, slack) end
return fmt(turn - now)
"""

#: KEYS: block, learned. ARGV: now (<0: Redis TIME), block_s, limit, reset_in, reset_at (each <0:
#: absent), learned TTL, slack.
_OBSERVE = _PRELUDE + """
local now = clock(ARGV[1])
local block_s, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local reset_in, reset_at = tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl, slack = tonumber(ARGV[6]), tonumber(ARGV[7])
if block_s >= 0 then
  local till = now + block_s
  if till > num(redis.call('GET', KEYS[1]), till - 1) then set_until(KEYS[1], till, now, slack) end
end
if limit > 0 then
  local old = redis.call('HMGET', KEYS[2], 'limit', 'lb', 'ub', 'reset')
  local lb, ub, last = 0, -1, -1
  if num(old[1], 0) == limit then
    lb, ub, last = num(old[2], 0), num(old[3], -1), num(old[4], -1)
  end
  if reset_in >= 0 and reset_in > lb then lb = reset_in end
  if reset_at >= 0 then
    if last >= 0 then
      local apart = math.abs(reset_at - last)
      if apart > 0.001 and (ub < 0 or apart < ub) then ub = apart end
    end
    last = reset_at
  end
  redis.call('HSET', KEYS[2], 'limit', limit, 'lb', fmt(lb), 'ub', fmt(ub), 'reset', fmt(last), 'at', fmt(now))
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 'ok'
"""


def _arg(value: float | None) -> str:
    return "-1" if value is None else repr(float(value))


class RedisStorage:
    """The budget in Redis, shared by every process that uses the same database.

    ``clock`` exists for tests only (the same fake clock drives both storages); in production the
    scripts read Redis ``TIME``.
    """

    def __init__(self, client: redis.Redis[Any], *, clock: Callable[[], float] | None = None) -> None:
        self.client = client
        self.clock = clock
        self._acquire = client.register_script(_ACQUIRE)
        self._observe = client.register_script(_OBSERVE)

    def _now(self) -> str:
        return "-1" if self.clock is None else repr(float(self.clock()))

    def acquire(self, target: str, budget: Budget, patience_s: float, holder: str | None) -> float:
        p = key_prefix(target)
        try:
            wait: Any = self._acquire(
                keys=[p + "tat", p + "line", p + "block", p + "learned", f"{p}turn:{holder or ''}"],
                args=[self._now(), repr(budget.interval_s), budget.burst, repr(budget.period_s),
                      repr(budget.margin_s), repr(patience_s), repr(KEY_SLACK_S), repr(EARLY_FRACTION),
                      "1" if holder else "0"])
        except redis.RedisError as exc:
            log.warning("rate limiter unreachable (%s: %s); holding target %s back %g s", type(exc).__name__,
                        exc, target, UNAVAILABLE_WAIT_S, extra={"target": target})
            return UNAVAILABLE_WAIT_S
        return float(wait)

    def observe(self, target: str, budget: Budget, seen: Observation) -> None:
        p = key_prefix(target)
        try:
            self._observe(keys=[p + "block", p + "learned"],
                          args=[self._now(), _arg(seen.block_s), seen.limit or -1, _arg(seen.reset_in),
                                _arg(seen.reset_at), LEARNED_TTL_S, repr(KEY_SLACK_S)])
        except redis.RedisError as exc:  # this intent still waits (its own retry honours the header)
            log.warning("rate limiter unreachable (%s: %s); a rate-limit hint from %s was not shared",
                        type(exc).__name__, exc, target, extra={"target": target})

    def close(self) -> None:
        self.client.close()


class RedisLimiter(SharedLimiter):
    """The budget in Redis: every worker process on every machine shares it; survives restarts."""

    def __init__(self, client: redis.Redis[Any], *, margin_s: float = SAFETY_MARGIN_S,
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__(RedisStorage(client, clock=clock), margin_s=margin_s)


class MemoryLimiter(SharedLimiter):
    """The embedded default's budget: the same algorithm, held in this process."""

    def __init__(self, *, margin_s: float = SAFETY_MARGIN_S, clock: Callable[[], float] = time.time) -> None:
        super().__init__(MemoryStorage(clock), margin_s=margin_s)


def redis_url_for(config: AppConfig) -> str | None:
    """``DISPATCHER_REDIS_URL``, else the broker's URL when the broker is Redis, else None."""
    settings = config.settings
    if settings.redis_url:
        return settings.redis_url
    broker = settings.broker_url or ""
    return broker if broker.startswith(("redis://", "rediss://", "unix://")) else None


def limiter_for(config: AppConfig) -> SharedLimiter:
    """Redis when there is one to share (see :func:`redis_url_for`), else this process's memory."""
    url = redis_url_for(config)
    if url is None:
        return MemoryLimiter()
    # one quick retry: a limiter that cannot answer fails closed (UNAVAILABLE_WAIT_S) rather than stall
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=30,
                                  retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1))
    return RedisLimiter(client)


__all__ = [
    "EARLY_FRACTION", "FALLBACK_BLOCK_S", "LEARNED_TTL_S", "SAFETY_MARGIN_S", "Budget", "MemoryLimiter",
    "MemoryStorage", "Observation", "RedisLimiter", "RedisStorage", "SharedLimiter", "Storage", "key_prefix",
    "limiter_for", "observation", "redis_url_for",
]
