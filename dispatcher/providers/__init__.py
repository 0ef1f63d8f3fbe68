"""Provider adapters: what each ticket API expects and how its answers are sorted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from urllib.parse import urlsplit

from dispatcher.domain import Provider
from dispatcher.providers.base import (
    Op,
    Outcome,
    ProviderAdapter,
    RateLimitInfo,
    RawResponse,
    RequestSpec,
    TicketDraft,
    TicketRef,
    Verdict,
)
from dispatcher.providers.hostup import HostUpAdapter
from dispatcher.providers.nocworx import NocWorxAdapter

__all__ = [
    "HostUpAdapter",
    "NocWorxAdapter",
    "Op",
    "Outcome",
    "ProviderAdapter",
    "RateLimitInfo",
    "RawResponse",
    "RequestSpec",
    "TicketDraft",
    "TicketRef",
    "Verdict",
    "adapter_for",
]


def adapter_for(
    provider: Provider | str,
    base_url: str,
    *,
    ticket_url_template: str | None = None,
    clock: Callable[[], datetime] | None = None,
) -> ProviderAdapter:
    """The adapter for a target. ``base_url`` is checked here so a bad target fails at start-up;
    adapters themselves build relative paths and never need it."""
    parts = urlsplit(base_url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
    kind = Provider(provider)
    if kind is Provider.hostup:
        return HostUpAdapter(ticket_url_template, clock=clock)
    return NocWorxAdapter(ticket_url_template, clock=clock)
