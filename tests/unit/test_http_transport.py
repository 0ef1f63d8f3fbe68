"""HttpTransport over httpx.MockTransport: what it sends, what it refuses, and failures as values."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from dispatcher.providers.base import Op, RequestSpec
from dispatcher.providers.http import DEFAULT_USER_AGENT, HttpTransport

KEY = "sk_live_Zm9vYmFyYmF6"
Handler = Callable[[httpx.Request], httpx.Response]


def transport_for(handler: Handler, base_url: str = "https://cloud.hostup.se/api/v2",
                  **kwargs: object) -> tuple[HttpTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return HttpTransport(base_url, KEY, transport=httpx.MockTransport(recording), **kwargs), seen  # type: ignore[arg-type]


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json={"id": "tkt_1"}, headers={"X-Request-Id": "req_1", "Retry-After": "3"})


def test_sends_bearer_key_accept_json_and_its_own_user_agent() -> None:
    transport, seen = transport_for(ok)
    transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))
    request = seen[0]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "application/json"
    assert request.headers["user-agent"] == DEFAULT_USER_AGENT
    assert request.headers["user-agent"].startswith("dispatcher/")
    assert "python" not in request.headers["user-agent"].lower()
    assert "content-type" not in request.headers


def test_a_custom_user_agent_replaces_the_default() -> None:
    transport, seen = transport_for(ok, user_agent="acme-ops/2.0")
    transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))
    assert seen[0].headers["user-agent"] == "acme-ops/2.0"


def test_a_json_body_is_sent_with_content_type_json() -> None:
    transport, seen = transport_for(ok)
    transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={"subject": "Hi", "message": "m"}))
    assert seen[0].method == "POST"
    assert seen[0].headers["content-type"] == "application/json"
    assert httpx.Response(200, content=seen[0].content).json() == {"subject": "Hi", "message": "m"}


@pytest.mark.parametrize(
    ("base_url", "path", "expected"),
    [
        ("https://cloud.hostup.se/api/v2", "/support/tickets", "https://cloud.hostup.se/api/v2/support/tickets"),
        ("https://cloud.hostup.se/api/v2/", "/support/tickets", "https://cloud.hostup.se/api/v2/support/tickets"),
        ("https://portal.nexcess.net", "/v1/task/69eb0630", "https://portal.nexcess.net/v1/task/69eb0630"),
        ("https://portal.nexcess.net/", "/v1/ticket", "https://portal.nexcess.net/v1/ticket"),
    ],
)
def test_paths_join_the_base_path(base_url: str, path: str, expected: str) -> None:
    transport, seen = transport_for(ok, base_url=base_url)
    transport.send(RequestSpec(Op.find, "GET", path))
    assert str(seen[0].url) == expected


def test_params_are_sent_as_the_query() -> None:
    transport, seen = transport_for(ok, base_url="https://portal.nexcess.net")
    transport.send(RequestSpec(Op.find, "GET", "/v1/task",
                               params={"filter[action]": "ticket:add", "pageSize": 100}))
    assert seen[0].url.path == "/v1/task"
    assert dict(seen[0].url.params) == {"filter[action]": "ticket:add", "pageSize": "100"}


@pytest.mark.parametrize(
    "path",
    [
        "https://evil.example/v1/task/abc",
        "//evil.example/v1/task/abc",
        "http:/evil.example",
        "v1/task/abc",
        "",
        "/v1/task/../../admin",
        "/v1/task/%2e%2e/admin",
        "/v1/task/abc?next=https://evil.example",
        "/v1/task/abc#x",
        "/v1\\task",
        "/v1/task/a b",
        "/v1/task/%zz",
    ],
)
def test_refuses_paths_that_are_not_relative_to_the_target(path: str) -> None:
    transport, seen = transport_for(ok)
    with pytest.raises(ValueError, match="not a relative path"):
        transport.send(RequestSpec(Op.poll, "GET", path))
    assert seen == []


def test_answers_are_values_with_lower_cased_headers_and_duration() -> None:
    transport, _ = transport_for(ok)
    response = transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={}))
    assert response.status == 201
    assert response.json() == {"id": "tkt_1"}
    assert response.headers["x-request-id"] == "req_1"
    assert response.headers["retry-after"] == "3"
    assert all(name == name.lower() for name in response.headers)
    assert response.duration_ms >= 0
    assert response.network_error is None


def test_redirects_are_returned_not_followed() -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "https://evil.example/v1/ticket"})

    transport, seen = transport_for(redirect)
    response = transport.send(RequestSpec(Op.ticket, "GET", "/support/tickets/tkt_1"))
    assert response.status == 302
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("error", "maybe_delivered"),
    [
        (httpx.ConnectError, False),
        (httpx.ConnectTimeout, False),
        (httpx.PoolTimeout, False),
        (httpx.ProxyError, False),
        (httpx.ReadTimeout, True),
        (httpx.WriteTimeout, True),
        (httpx.ReadError, True),
        (httpx.WriteError, True),
        (httpx.RemoteProtocolError, True),
        (httpx.NetworkError, True),        # an unknown network failure: reconcile before resending
    ],
)
def test_network_failures_are_values_with_maybe_delivered(
    error: type[httpx.TransportError], maybe_delivered: bool
) -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        raise error("boom", request=request)

    transport, _ = transport_for(failing)
    response = transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={"subject": "s"}))
    assert response.status is None
    assert response.network_error == f"{error.__name__}: boom"
    assert response.maybe_delivered is maybe_delivered
    assert response.body == b""
    assert response.headers == {}


def test_the_key_never_appears_in_an_error_message() -> None:
    def leaky(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout(f"timed out sending Authorization: Bearer {KEY}", request=request)

    transport, _ = transport_for(leaky)
    response = transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={}))
    assert response.network_error is not None
    assert response.network_error.startswith("ReadTimeout: ")
    assert KEY not in response.network_error
    assert "<secret>" in response.network_error


def test_an_os_error_from_the_transport_is_a_value_too() -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        raise ConnectionResetError("connection reset by peer")

    transport, _ = transport_for(failing)
    response = transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={}))
    assert response.status is None
    assert response.network_error == "ConnectionResetError: connection reset by peer"
    assert response.maybe_delivered is True


def test_the_key_never_appears_in_repr() -> None:
    transport, _ = transport_for(ok)
    assert KEY not in repr(transport)
    assert KEY not in str(transport)
    assert "cloud.hostup.se" in repr(transport)


@pytest.mark.parametrize("base_url", ["cloud.hostup.se/api/v2", "ftp://cloud.hostup.se", "https://x.example/?a=1"])
def test_a_bad_base_url_is_refused(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        HttpTransport(base_url, KEY)


@pytest.mark.parametrize("api_key", ["", "abc\ndef", "abc def"])
def test_an_unusable_key_is_refused_without_echoing_it(api_key: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        HttpTransport("https://cloud.hostup.se/api/v2", api_key)
    assert not api_key or api_key not in str(excinfo.value)


def test_context_manager_closes_the_client() -> None:
    with transport_for(ok)[0] as transport:
        assert transport.send(RequestSpec(Op.departments, "GET", "/support/departments")).status == 201
    assert transport.closed
    with pytest.raises(RuntimeError, match="closed"):
        transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))


def test_a_path_is_checked_every_time_it_is_not_remembered_and_a_remembered_one_keeps_its_url() -> None:
    transport, seen = transport_for(ok)
    for _ in range(2):
        transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={"subject": "s"}))
        with pytest.raises(ValueError, match="not a relative path"):
            transport.url_for("/support/../admin")
    assert [str(r.url) for r in seen] == ["https://cloud.hostup.se/api/v2/support/tickets"] * 2
