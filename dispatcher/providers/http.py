"""The one place that talks HTTP to a provider.

:meth:`HttpTransport.send` turns every exchange into a :class:`RawResponse` value, failures
included, so the service can record an attempt for each send and let the adapter's ``classify``
decide what happens next. Network failures are sorted by whether the request may have reached the
provider (``maybe_delivered``): a create that may have been delivered must be reconciled, not resent.

httpx errors that reach us, and how they are read::

    ConnectError, ConnectTimeout, PoolTimeout,
    ProxyError, UnsupportedProtocol, LocalProtocolError ....... not delivered
    ReadTimeout, WriteTimeout, ReadError, WriteError,
    RemoteProtocolError, CloseError, DecodingError, others .... maybe delivered
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.request
from importlib import metadata
from types import TracebackType

import httpx

from dispatcher.providers.base import RawResponse, RequestSpec, safe_relative_path


def _package_version() -> str:
    try:
        return metadata.version("dispatcher")
    except metadata.PackageNotFoundError:
        return "0.1.0"


PROJECT_URL = "https://github.com/dispatcher/dispatcher"
#: HostUp rejects Python's default agents, so we always name ourselves
DEFAULT_USER_AGENT = f"dispatcher/{_package_version()} (+{PROJECT_URL})"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
_REDACTED = "<secret>"
_MAX_ERROR_CHARS = 500
#: connection pools per target. httpcore looks over every connection of a pool on each request and
#: on each response's close, Python work in proportion to the pool's size; the sending threads are
#: dealt over this many pools, each with a few connections, a thread keeping its pool (with 64
#: threads at 200 ms it took a worker from 12.8 to 10.7 CPU seconds per 1,000 tickets, README
#: "Benchmarks")
POOL_SHARDS = 16
#: request paths whose URL a transport keeps built
URL_CACHE = 256

#: failures that happen before any byte of the request can have been processed
_NOT_DELIVERED: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


def proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``,
    less ``NO_PROXY``), as an ``httpx.Client`` would use it: the transport sends without one."""
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass(url.host):
        return None
    return proxies.get(url.scheme) or proxies.get("all")


def maybe_delivered(exc: Exception) -> bool:
    """Whether the server may have acted on the request; unknown failures count as "maybe"."""
    return not isinstance(exc, _NOT_DELIVERED)


class HttpTransport:
    """Sends :class:`RequestSpec` values to one target's base URL and never raises for I/O failures."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        user_agent: str = DEFAULT_USER_AGENT,
        transport: httpx.BaseTransport | None = None,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=100),
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in {"http", "https"} or not url.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
        if url.query or url.fragment:
            raise ValueError("base_url must not carry a query or a fragment")
        if not api_key or any(ch.isspace() or not ch.isprintable() for ch in api_key):
            raise ValueError("api_key is empty or holds characters that cannot go in a header")
        self._base = url.copy_with(raw_path=url.raw_path.rstrip(b"/") or b"")
        self._hidden = [api_key]
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json", "User-Agent": user_agent}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
        if transport is not None:
            self._pools: list[httpx.BaseTransport] = [transport]
        else:
            # one TLS context for every pool: each one built reads the CA bundle (time and memory)
            tls = httpx.create_ssl_context()
            proxy = proxy_for(self._base)
            password = httpx.URL(proxy).password if proxy is not None else None
            if password:  # scrubbed from errors as the key is
                self._hidden.append(password)
            self._pools = [httpx.HTTPTransport(verify=tls, limits=limits, proxy=proxy) for _ in range(POOL_SHARDS)]
        self._turns = itertools.count()
        self._per_thread = threading.local()
        self._closed = False
        self._urls: dict[str, httpx.URL] = {}

    @property
    def base_url(self) -> str:
        return str(self._base)

    def __repr__(self) -> str:
        return f"HttpTransport(base_url={self.base_url!r})"

    def url_for(self, path: str) -> httpx.URL:
        """The absolute URL of a relative path: base path + ``path``, always on the base host.

        The first :data:`URL_CACHE` paths are remembered (the create and list endpoints are sent
        over and over; a task's own path is polled a few times); checked once, built once."""
        url = self._urls.get(path)
        if url is None:
            url = self._build_url(path)
            if len(self._urls) < URL_CACHE:
                self._urls[path] = url
        return url

    def _build_url(self, path: str) -> httpx.URL:
        safe_relative_path(path)
        base_path = self._base.raw_path.decode("ascii").rstrip("/")
        url = self._base.copy_with(raw_path=(base_path + path).encode("ascii"))
        if (url.scheme, url.host, url.port) != (self._base.scheme, self._base.host, self._base.port):
            raise ValueError(f"refusing to send {path!r} outside {self.base_url}")
        return url

    def send(self, spec: RequestSpec) -> RawResponse:
        """Send one request. Raises ValueError only for a path that is not on the target's host.

        Straight to the connection pool (httpx's transport API), not through an ``httpx.Client``:
        a client's cookie jar, auth and redirect handling, event hooks and request logging have
        nothing to do here (no cookies, the key is a header, redirects are not followed), and cost
        CPU on every request (README, Benchmarks: the side-by-side steps)."""
        if self._closed:
            raise RuntimeError("this transport is closed")
        url = self.url_for(spec.path)
        pool: httpx.BaseTransport | None = getattr(self._per_thread, "pool", None)
        if pool is None:  # a thread keeps the pool it is first given; threads are dealt round
            pool = self._per_thread.pool = self._pools[next(self._turns) % len(self._pools)]
        request = httpx.Request(
            spec.method.upper(),
            url,
            params=dict(spec.params) if spec.params else None,
            json=dict(spec.json) if spec.json is not None else None,
            headers=self._json_headers if spec.json is not None else self._headers,
            extensions=self._extensions,
        )
        started = time.perf_counter()
        try:
            response = pool.handle_request(request)
            try:
                body = response.read()
            finally:
                response.close()
        except (httpx.HTTPError, OSError) as exc:
            return RawResponse(
                status=None,
                headers={},
                body=b"",
                duration_ms=(time.perf_counter() - started) * 1000.0,
                network_error=self._describe(exc),
                maybe_delivered=maybe_delivered(exc),
            )
        duration_ms = (time.perf_counter() - started) * 1000.0
        return RawResponse(
            status=response.status_code,
            headers={name.lower(): value for name, value in response.headers.items()},
            body=body,
            duration_ms=duration_ms,
        )

    def _describe(self, exc: BaseException) -> str:
        """``ClassName: message`` with the key (and a proxy's password) scrubbed: errors end up in logs
        and the database."""
        message = str(exc)
        for secret in self._hidden:
            message = message.replace(secret, _REDACTED)
        name = type(exc).__name__
        text = f"{name}: {message}" if message else name
        return text[:_MAX_ERROR_CHARS]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        for pool in self._pools:
            pool.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
