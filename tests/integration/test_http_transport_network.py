"""HttpTransport over real sockets: the timeouts it is given and the proxy the environment names
apply, though it sends on httpx's transports directly (no ``httpx.Client`` in between)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dispatcher.providers.base import Op, RequestSpec
from dispatcher.providers.http import HttpTransport


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def serve_once(server: socket.socket, answer: bytes | None, seen: list[bytes]) -> threading.Thread:
    """Accept one connection, keep what the client sent, answer ``answer`` (None: say nothing)."""

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            seen.append(data)
            if answer is None:
                time.sleep(2)  # longer than the client waits
            else:
                conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_silent_server_is_a_read_timeout_after_the_configured_time(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    seen: list[bytes] = []
    serve_once(listener, None, seen)
    transport = HttpTransport(f"http://127.0.0.1:{port}/api/v2", "k-123", timeout=0.3)
    began = time.monotonic()
    answer = transport.send(RequestSpec(Op.create, "POST", "/support/tickets", json={"subject": "s"}))
    waited = time.monotonic() - began
    transport.close()
    assert answer.status is None and answer.maybe_delivered  # it may have been read: reconcile, never resend
    assert answer.network_error is not None and answer.network_error.startswith("ReadTimeout")
    assert 0.25 <= waited < 1.5
    assert seen and seen[0].startswith(b"POST /api/v2/support/tickets HTTP/1.1")


def test_the_proxy_the_environment_names_carries_the_request(listener: socket.socket,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    port = listener.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    seen: list[bytes] = []
    serve_once(listener, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]", seen)
    transport = HttpTransport("http://provider.invalid/api/v2", "k-123", timeout=5)
    answer = transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))
    transport.close()
    assert (answer.status, answer.body) == (200, b"[]")
    # a proxy is asked for the absolute URL
    assert seen[0].startswith(b"GET http://provider.invalid/api/v2/support/departments HTTP/1.1")


def test_no_proxy_sends_straight_to_the_host(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    port = listener.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    seen: list[bytes] = []
    serve_once(listener, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", seen)
    transport = HttpTransport(f"http://127.0.0.1:{port}/api/v2", "k-123", timeout=5)
    answer = transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))
    transport.close()
    assert answer.status == 200
    assert seen[0].startswith(b"GET /api/v2/support/departments HTTP/1.1")


def test_a_proxy_password_never_reaches_an_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://ops:proxy-pass-0123456789@127.0.0.1:9")  # refused: nothing listens
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    transport = HttpTransport("http://provider.invalid/api/v2", "k-123", timeout=2)
    answer = transport.send(RequestSpec(Op.departments, "GET", "/support/departments"))
    transport.close()
    assert answer.status is None and answer.network_error is not None
    assert "proxy-pass-0123456789" not in answer.network_error
