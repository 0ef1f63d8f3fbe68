"""Retry-After and X-RateLimit-* parsing: every documented form, and garbage treated as absent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.providers.base import RateLimitInfo
from dispatcher.providers.headers import parse_rate_limit, parse_retry_after

NOW = datetime(2026, 4, 27, 12, 34, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Mon, 27 Apr 2026 12:35:00 GMT", 30.0),           # IMF-fixdate
        ("Monday, 27-Apr-26 12:35:00 GMT", 30.0),          # obsolete RFC 850
        ("Mon Apr 27 12:35:00 2026", 30.0),                # obsolete asctime
        ("Mon, 27 Apr 2026 12:00:00 GMT", 0.0),            # already past
        ("soon", None),
        ("", None),
        ("   ", None),
        (None, None),
        ("nan", None),
        ("1e3", None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_accepts_a_naive_clock_as_utc() -> None:
    naive_now = NOW.replace(tzinfo=None)
    assert parse_retry_after("Mon, 27 Apr 2026 12:35:00 GMT", naive_now) == 30.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # HostUp: an ISO 8601 timestamp
        ({"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0",
          "x-ratelimit-reset": "2026-04-27T12:35:00.000Z"},
         RateLimitInfo(60, 0, datetime(2026, 4, 27, 12, 35, tzinfo=UTC))),
        # epoch seconds
        ({"x-ratelimit-reset": "1777293300"},
         RateLimitInfo(None, None, datetime.fromtimestamp(1777293300, tz=UTC))),
        # epoch milliseconds
        ({"x-ratelimit-reset": "1777293300000"},
         RateLimitInfo(None, None, datetime.fromtimestamp(1777293300, tz=UTC))),
        # seconds until the reset
        ({"x-ratelimit-reset": "45"}, RateLimitInfo(None, None, NOW + timedelta(seconds=45))),
        # an ISO timestamp with an offset is normalised to UTC
        ({"x-ratelimit-reset": "2026-04-27T14:35:00+02:00"},
         RateLimitInfo(None, None, datetime(2026, 4, 27, 12, 35, tzinfo=UTC))),
        # gateways that append policies: take the leading count
        ({"x-ratelimit-limit": "100, 100;w=60", "x-ratelimit-remaining": "99"}, RateLimitInfo(100, 99, None)),
        # unreadable reset, readable counts
        ({"x-ratelimit-limit": "10", "x-ratelimit-reset": "whenever"}, RateLimitInfo(10, None, None)),
    ],
)
def test_rate_limit_headers_are_normalised(headers: dict[str, str], expected: RateLimitInfo) -> None:
    assert parse_rate_limit(headers, NOW) == expected


def test_rate_limit_header_names_are_case_insensitive() -> None:
    headers = {"X-RateLimit-Limit": "60", "X-RATELIMIT-REMAINING": "3", "X-Ratelimit-Reset": "10"}
    assert parse_rate_limit(headers, NOW) == RateLimitInfo(60, 3, NOW + timedelta(seconds=10))


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "application/json"}, {"x-ratelimit-limit": "lots", "x-ratelimit-reset": "later"}],
)
def test_rate_limit_is_none_when_nothing_can_be_read(headers: dict[str, str]) -> None:
    assert parse_rate_limit(headers, NOW) is None
