"""Reading the rate-limit headers providers send. Pure: the caller passes the clock.

Both functions are lenient: a header that cannot be read is treated as absent (``None``), never an
exception, because a malformed hint must not turn a retryable answer into a crash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from dispatcher.providers.base import RateLimitInfo

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_LEADING_INT = re.compile(r"^\s*(\d+)")
#: below this a numeric reset is "seconds from now"; at or above it, an epoch timestamp
_EPOCH_THRESHOLD = 1_000_000_000
#: at or above this an epoch timestamp is in milliseconds (some gateways send those)
_EPOCH_MILLIS_THRESHOLD = 100_000_000_000


def _as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC: HTTP dates and our clocks both mean UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse_number(text: str) -> float | None:
    if not _NUMBER.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _parse_http_date(text: str) -> datetime | None:
    """IMF-fixdate plus the obsolete RFC 850 and asctime forms (RFC 9110 section 5.6.7)."""
    try:
        return _as_utc(parsedate_to_datetime(text))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value; a past date or negative delay means 0.0.

    Returns None when the value is absent or unreadable, so callers fall back to their own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds = _parse_number(text)
    if seconds is not None:
        return max(0.0, seconds)
    moment = _parse_http_date(text)
    if moment is None:
        return None
    return max(0.0, (moment - _as_utc(now)).total_seconds())


def _parse_reset(text: str, now: datetime) -> datetime | None:
    """ISO 8601 (HostUp), epoch seconds/milliseconds, or seconds until the reset."""
    text = text.strip()
    if not text:
        return None
    number = _parse_number(text)
    try:
        if number is not None:
            if number >= _EPOCH_MILLIS_THRESHOLD:
                return datetime.fromtimestamp(number / 1000.0, tz=UTC)
            if number >= _EPOCH_THRESHOLD:
                return datetime.fromtimestamp(number, tz=UTC)
            return _as_utc(now) + timedelta(seconds=max(0.0, number))
        try:
            return _as_utc(datetime.fromisoformat(text))
        except ValueError:
            return _parse_http_date(text)
    except (OverflowError, OSError, ValueError):
        return None


def _parse_count(text: str | None) -> int | None:
    """The leading integer ("100" or "100, 100;w=60" as some gateways send)."""
    if text is None:
        return None
    match = _LEADING_INT.match(text)
    return int(match.group(1)) if match else None


def parse_rate_limit(headers: Mapping[str, str], now: datetime) -> RateLimitInfo | None:
    """The ``X-RateLimit-*`` headers of an answer, or None when none of them can be read."""
    lowered = {name.lower(): value for name, value in headers.items()}
    limit = _parse_count(lowered.get("x-ratelimit-limit"))
    remaining = _parse_count(lowered.get("x-ratelimit-remaining"))
    reset_text = lowered.get("x-ratelimit-reset")
    reset_at = _parse_reset(reset_text, now) if reset_text is not None else None
    if limit is None and remaining is None and reset_at is None:
        return None
    return RateLimitInfo(limit=limit, remaining=remaining, reset_at=reset_at)
