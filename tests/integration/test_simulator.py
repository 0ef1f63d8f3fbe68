"""The provider simulators over real HTTP: they must behave as the providers' documentation says,
or the dispatcher's tests prove nothing."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from dispatcher.domain import body_with_marker
from dispatcher.simulator import RunningSimulator, SimulatorSettings, start_in_thread

SEED = 7
TEST_SETTINGS = SimulatorSettings(seed=SEED, task_delay_s=0.05)
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CRITICAL_DETAIL = "You already sent a critical alert in the last hour. Reply to the existing ticket instead."
TASK_KEYS = {
    "id", "identity", "metadata", "status", "action", "api_version", "errors", "input", "request_date",
    "resolved_date", "resource", "staff_user", "user", "uuid",
}


@pytest.fixture(scope="module")
def running() -> Iterator[RunningSimulator]:
    with start_in_thread(SimulatorSettings(seed=SEED)) as sim:
        yield sim


@pytest.fixture
def sim(running: RunningSimulator) -> RunningSimulator:
    """The shared server, back to the test defaults with nothing in it."""
    running.configure(**TEST_SETTINGS.to_json())
    running.reset()
    return running


@pytest.fixture
def hostup(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.hostup_url, timeout=5,
                      headers={"Authorization": "Bearer sim-hostup-key"}) as client:
        yield client


@pytest.fixture
def nocworx(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.nocworx_url, timeout=5,
                      headers={"Authorization": "Bearer sim-nocworx-key"}) as client:
        yield client


def marked(text: str = "Hello, I need help.") -> tuple[str, str]:
    """A body carrying a fresh dispatcher marker, and that marker."""
    intent_id = uuid.uuid4()
    return body_with_marker(text, intent_id), str(intent_id)


def hostup_ticket(**overrides: Any) -> dict[str, Any]:
    body, _ = marked()
    data: dict[str, Any] = {"departmentSlug": "general-web-hosting", "subject": "Site is slow", "message": body}
    data.update(overrides)
    return data


def poll(client: httpx.Client, path: str, done: Callable[[httpx.Response], bool],
         timeout: float = 3.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(path)
        if done(response) or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def resolved(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.json()["status"] != "pending"


# -- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sim-hostup-key"}])
def test_hostup_refuses_missing_or_wrong_key_with_problem_401(sim: RunningSimulator,
                                                              headers: dict[str, str]) -> None:
    response = httpx.post(f"{sim.hostup_url}/support/tickets", json=hostup_ticket(), headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == "unauthorized"
    assert problem["type"] == "https://developer.hostup.se/errors/unauthorized"
    assert problem["instance"] == "/api/v2/support/tickets"
    assert problem["requestId"].startswith("req_")
    assert ISO_MS.match(problem["timestamp"])
    assert sim.stats()["hostup"]["tickets"] == 0


def test_nocworx_refuses_wrong_key_with_message_and_version_header(sim: RunningSimulator) -> None:
    response = httpx.post(f"{sim.nocworx_url}/v1/ticket", json={"department": "support", "subject": "x"},
                          headers={"Authorization": "Bearer sim-hostup-key"})
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized"}
    assert response.headers["NocWorx-Api-Version"] == "0.5.0"
    assert sim.stats()["nocworx"]["tasks"] == 0


# -- HostUp ---------------------------------------------------------------------------------------


def test_hostup_departments_are_the_documented_slugs_with_nullable_fields(hostup: httpx.Client) -> None:
    response = hostup.get("/support/departments")
    assert response.status_code == 200
    departments = response.json()["departments"]
    assert [d["slug"] for d in departments] == ["general-web-hosting", "domain-names", "vps", "billing"]
    assert all(set(d) == {"slug", "displayName", "description", "email"} for d in departments)
    assert any(d["description"] is None for d in departments)
    assert any(d["email"] is None for d in departments)


def test_hostup_create_answers_201_with_the_documented_ticket_detail(hostup: httpx.Client) -> None:
    body, _ = marked()
    response = hostup.post("/support/tickets", json={
        "departmentSlug": "domain-names", "subject": "Question about my hosting account", "message": body,
        "priority": "low", "ccEmails": ["ops@example.com"],
        "context": {"serviceType": "domain", "serviceId": "dom_01hxa3b4c5d6e7f8g9h0j1k2m3"},
    })
    assert response.status_code == 201
    ticket = response.json()
    assert re.fullmatch(r"tkt_[0-9a-z]{26}", ticket["id"])
    assert ticket["number"] == "10001"
    assert ticket["body"] == body
    assert (ticket["status"], ticket["priority"]) == ("open", "low")
    assert (ticket["departmentSlug"], ticket["departmentName"]) == ("domain-names", "Domain names")
    assert all(ISO_MS.match(ticket[k]) for k in ("createdAt", "updatedAt", "lastMessageAt"))
    assert ticket["ccEmails"] == ["ops@example.com"]
    assert ticket["messageCount"] == 1
    assert ticket["linkedServices"][0]["serviceId"] == "dom_01hxa3b4c5d6e7f8g9h0j1k2m3"
    assert ticket["attachments"] == [] and ticket["messages"] == []

    by_number = hostup.get("/support/tickets/10001").json()
    assert by_number["id"] == ticket["id"]
    assert by_number["messages"][0]["body"] == body
    assert hostup.get("/support/tickets/tkt_nope").json()["code"] == "not_found"
    assert hostup.post("/support/tickets", json=hostup_ticket()).json()["number"] == "10002"


def test_hostup_invalid_create_is_400_invalid_request_with_pointers(hostup: httpx.Client) -> None:
    response = hostup.post("/support/tickets", json={
        "departmentSlug": "technical-support", "subject": "x" * 201, "priority": "critical",
        "ccEmails": ["not-an-email"], "context": {"serviceType": "server"}, "accountId": "acct_1",
        "attachments": [],
    })
    assert response.status_code == 400
    problem = response.json()
    assert problem["code"] == "invalid_request"
    pointers = {error["pointer"] for error in problem["errors"]}
    assert pointers == {"/departmentSlug", "/subject", "/message", "/criticalReason", "/ccEmails/0",
                        "/context/serviceType", "/accountId", "/attachments"}
    assert all(error["code"] == "invalid_request" for error in problem["errors"])

    blank = hostup.post("/support/tickets", json=hostup_ticket(subject="  ", priority="asap")).json()
    assert {e["pointer"] for e in blank["errors"]} == {"/subject", "/priority"}


def test_hostup_department_slugs_follow_the_configured_list(sim: RunningSimulator,
                                                            hostup: httpx.Client) -> None:
    sim.configure(hostup_departments=[{"slug": "support", "displayName": "Support"}])
    assert [d["slug"] for d in hostup.get("/support/departments").json()["departments"]] == ["support"]
    refused = hostup.post("/support/tickets", json=hostup_ticket(departmentSlug="vps"))
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["pointer"] == "/departmentSlug"
    assert hostup.post("/support/tickets", json=hostup_ticket(departmentSlug="support")).status_code == 201


def test_hostup_second_critical_in_an_hour_is_429_rate_limited_with_the_documented_detail(
        sim: RunningSimulator, hostup: httpx.Client) -> None:
    critical = {"priority": "critical", "criticalReason": "All sites are down"}
    assert hostup.post("/support/tickets", json=hostup_ticket(**critical)).status_code == 201
    refused = hostup.post("/support/tickets", json=hostup_ticket(**critical))
    assert refused.status_code == 429
    problem = refused.json()
    assert (problem["code"], problem["detail"]) == ("rate_limited", CRITICAL_DETAIL)
    assert 3500 <= int(refused.headers["Retry-After"]) <= 3600
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert ISO_MS.match(refused.headers["X-RateLimit-Reset"])
    # other priorities are not affected, and the refusal made nothing
    assert hostup.post("/support/tickets", json=hostup_ticket(priority="urgent")).status_code == 201
    assert sim.stats()["hostup"]["tickets"] == 2


def test_hostup_rate_limit_is_429_with_retry_after_seconds_and_iso_reset(sim: RunningSimulator,
                                                                         hostup: httpx.Client) -> None:
    sim.configure(rate_limit=2, rate_window_s=5.0)
    since = time.time()
    answers = [hostup.get("/support/departments") for _ in range(5)]
    assert [a.status_code for a in answers[:2]] == [200, 200] or answers[0].status_code == 429
    # fixed windows: even if a window edge falls among the calls, one window holds 3 of the 5
    refused = next(a for a in answers if a.status_code == 429)
    problem = refused.json()
    assert (problem["code"], problem["title"]) == ("rate_limit_exceeded", "Too many requests")
    assert 1 <= int(refused.headers["Retry-After"]) <= 5
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    reset = datetime.fromisoformat(refused.headers["X-RateLimit-Reset"].replace("Z", "+00:00")).timestamp()
    logged = [r for r in sim.requests(provider="hostup", since=since) if r["throttled"] and r["status"] == 429]
    refusals = sum(a.status_code == 429 for a in answers)   # 3 if the 5 share a window, fewer across an edge
    assert sim.stats()["hostup"]["429"] == len(logged) == refusals
    # the reset is the end of the window the refused request arrived in (judged from its arrival, not
    # from now: a window edge may pass between the answer and this line)
    arrived = logged[0]["at"]
    assert arrived < reset <= arrived + 5.0 + 0.001


def test_rate_limit_retry_after_can_be_an_http_date(sim: RunningSimulator, nocworx: httpx.Client) -> None:
    sim.configure(rate_limit=1, rate_window_s=3.0, retry_after_format="http-date")
    since = time.time()
    refused = next(a for a in (nocworx.get("/v1/ticket") for _ in range(3)) if a.status_code == 429)
    assert refused.json() == {"message": "Too Many Requests"}
    when = parsedate_to_datetime(refused.headers["Retry-After"]).timestamp()
    # judged from the refused request's arrival (the end of its window), not from now
    arrived = next(r["at"] for r in sim.requests(provider="nocworx", since=since) if r["status"] == 429)
    assert arrived <= when <= arrived + 3.0 + 1.0


def test_rate_limit_window_lets_requests_through_again_after_reset(sim: RunningSimulator,
                                                                   hostup: httpx.Client) -> None:
    sim.configure(rate_limit=1, rate_window_s=0.3)
    # quick requests span at most two 0.3 s windows, so one of them holds two: a 429 within four
    answers = [hostup.get("/support/departments").status_code for _ in range(4)]
    assert 429 in answers
    time.sleep(0.35)                    # later than the refused request's window, whatever its edge
    assert hostup.get("/support/departments").status_code == 200


def test_hostup_list_is_cursor_paged_newest_first_without_bodies(hostup: httpx.Client) -> None:
    for slug in ("vps", "billing", "vps"):
        assert hostup.post("/support/tickets", json=hostup_ticket(departmentSlug=slug)).status_code == 201
    first = hostup.get("/support/tickets", params={"limit": 2}).json()
    assert [t["number"] for t in first["data"]] == ["10003", "10002"]
    assert first["hasMore"] is True and first["nextCursor"]
    assert not {"body", "messages", "attachments"} & set(first["data"][0])
    second = hostup.get("/support/tickets", params={"limit": 2, "cursor": first["nextCursor"]}).json()
    assert [t["number"] for t in second["data"]] == ["10001"]
    assert (second["hasMore"], second["nextCursor"]) == (False, None)
    vps = hostup.get("/support/tickets", params={"departmentSlug": "vps"}).json()["data"]
    assert [t["number"] for t in vps] == ["10003", "10001"]
    bad = hostup.get("/support/tickets", params={"limit": 101})
    assert bad.status_code == 400 and bad.json()["errors"][0]["pointer"] == "/limit"


def test_hostup_reply_to_a_closed_ticket_is_409_until_reopened(hostup: httpx.Client) -> None:
    ticket = hostup.post("/support/tickets", json=hostup_ticket()).json()
    closed = hostup.post(f"/support/tickets/{ticket['id']}/actions/close")
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    refused = hostup.post(f"/support/tickets/{ticket['id']}/messages", json={"message": "still broken"})
    assert refused.status_code == 409
    assert refused.json()["code"] == "conflict" and "Reopen" in refused.json()["detail"]
    assert hostup.post(f"/support/tickets/{ticket['id']}/actions/reopen").json()["status"] == "open"
    reply = hostup.post(f"/support/tickets/{ticket['number']}/messages", json={"message": "still broken"})
    assert reply.status_code == 201
    message = reply.json()
    assert message["id"].startswith("tmsg_") and message["ticketId"] == ticket["id"]
    assert (message["sender"], message["encrypted"], message["attachments"]) == ("customer", False, [])
    assert hostup.get(f"/support/tickets/{ticket['id']}").json()["messageCount"] == 2


# -- NocWorx --------------------------------------------------------------------------------------


def test_nocworx_add_is_202_task_that_polls_to_success_with_a_ticket_resource(
        sim: RunningSimulator, nocworx: httpx.Client) -> None:
    sim.configure(task_delay_s=0.5)  # long enough to see it pending, even on a loaded machine
    comment, marker = marked("It was DNS.")
    submitted = {"department": "support", "category": "dns", "subject": "It can't be DNS",
                 "comment": comment, "service_id": 42, "recipients": ["ops@example.com"]}
    accepted = nocworx.post("/v1/ticket", json=submitted)
    assert accepted.status_code == 202
    assert accepted.headers["NocWorx-Api-Version"] == "0.5.0"
    task = accepted.json()
    assert set(task) == TASK_KEYS
    assert accepted.headers["Location"] == f"/v1/task/{task['uuid']}" == task["metadata"]["uri"]
    assert (task["identity"], task["status"], task["action"]) == ("ticket:add (pending)", "pending",
                                                                 "ticket:add")
    assert task["metadata"]["scope"] == "api-task"
    assert task["input"] == submitted
    assert isinstance(task["id"], int) and isinstance(task["request_date"], int)
    assert (task["errors"], task["resolved_date"], task["resource"]) == ({}, None, None)
    assert sim.stats()["nocworx"]["tickets"] == 0  # not yet: the task is still pending

    done = poll(nocworx, accepted.headers["Location"], resolved).json()
    assert (done["status"], done["identity"]) == ("success", "ticket:add (success)")
    assert done["errors"] in ([], {})
    assert isinstance(done["resolved_date"], int)
    resource = done["resource"]
    assert resource["metadata"] == {"scope": "ticket", "uri": f"/v1/ticket/{resource['id']}"}

    ticket = nocworx.get(resource["metadata"]["uri"]).json()
    assert ticket["id"] == resource["id"]
    assert re.fullmatch(r"[A-Z]{4}-\d+", ticket["identity"])
    assert (ticket["subject"], ticket["is_closed"], ticket["comment"]) == ("It can't be DNS", False, comment)
    assert ticket["department"]["identity"] == "Support"

    listed = nocworx.get("/v1/ticket", params={"filter[subject]": "It can't be DNS", "sortBy": "id",
                                               "sortOrder": "DESC", "page": 1, "pageSize": 10})
    assert listed.status_code == 200
    assert listed.headers["Content-Range"] == "items 1-1/1"
    assert [t["id"] for t in listed.json()] == [resource["id"]]
    past_end = nocworx.get("/v1/ticket", params={"page": 2, "pageSize": 10})
    assert past_end.status_code == 416
    assert sim.stats()["tickets_by_marker"] == {marker: 1}


def test_nocworx_task_without_location_and_with_trailing_slash_uri(sim: RunningSimulator,
                                                                   nocworx: httpx.Client) -> None:
    sim.configure(location_header=False, uri_trailing_slash_rate=1.0)
    accepted = nocworx.post("/v1/ticket", json={"department": "billing", "subject": "Invoice"})
    assert "Location" not in accepted.headers
    uri = accepted.json()["metadata"]["uri"]
    assert uri.endswith("/")
    assert poll(nocworx, uri, resolved).json()["status"] == "success"


@pytest.mark.parametrize(("knob", "status"), [("task_failure_rate", "failure"),
                                              ("task_rejected_rate", "rejected")])
def test_nocworx_failed_or_rejected_task_makes_no_ticket(sim: RunningSimulator, nocworx: httpx.Client,
                                                         knob: str, status: str) -> None:
    sim.configure(**{knob: 1.0})
    task = nocworx.post("/v1/ticket", json={"department": "support", "subject": "x"}).json()
    done = poll(nocworx, f"/v1/task/{task['uuid']}", resolved).json()
    assert (done["status"], done["identity"]) == (status, f"ticket:add ({status})")
    assert isinstance(done["errors"]["message"], str) and done["errors"]["message"]
    assert done["resource"] is None and done["resolved_date"] is not None
    assert sim.stats()["nocworx"]["tickets"] == 0


def test_nocworx_stuck_task_stays_pending(sim: RunningSimulator, nocworx: httpx.Client) -> None:
    sim.configure(task_stuck_rate=1.0, task_delay_s=0.0)
    task = nocworx.post("/v1/ticket", json={"department": "support", "subject": "x"}).json()
    time.sleep(0.1)
    again = nocworx.get(f"/v1/task/{task['uuid']}").json()
    assert (again["status"], again["resolved_date"]) == ("pending", None)
    stats = sim.stats()["nocworx"]
    assert (stats["tickets"], stats["tasks_pending"], stats["tasks_stuck"]) == (0, 1, 1)


def test_nocworx_task_delays_can_be_random_in_a_range_seeded_with_each_tasks_resolution_and_polls_shown(
        sim: RunningSimulator, nocworx: httpx.Client) -> None:
    sim.configure(task_delay_range_s=[0.2, 0.8], uri_trailing_slash_rate=0.5, task_stuck_rate=0.25)

    def submit(count: int) -> list[str]:
        return [nocworx.post("/v1/ticket", json={"department": "support", "subject": f"x{n}"}).json()["uuid"]
                for n in range(count)]

    uuids = submit(12)
    nocworx.get(f"/v1/task/{uuids[0]}")
    nocworx.get(f"/v1/task/{uuids[0]}/")                       # the trailing-slash spelling counts too
    nocworx.get(f"/v1/task/{uuids[1]}")
    tasks = {t["uuid"]: t for t in sim.tasks()}
    assert set(tasks) == set(uuids)
    assert [tasks[u]["polls"] for u in uuids[:3]] == [2, 1, 0]
    resolving = [tasks[u] for u in uuids if tasks[u]["outcome"] != "stuck"]
    stuck = [tasks[u] for u in uuids if tasks[u]["outcome"] == "stuck"]
    assert resolving and stuck
    assert all(t["resolves_at"] is None and t["delay_s"] is None for t in stuck)
    delays = [t["delay_s"] for t in resolving]
    assert all(0.2 <= d <= 0.8 for d in delays) and len(set(delays)) == len(delays)
    assert all(t["resolves_at"] == pytest.approx(t["request_date"] + t["delay_s"]) for t in resolving)

    time.sleep(0.9)
    done = {t["uuid"]: t for t in sim.tasks()}
    for task in resolving:
        assert done[task["uuid"]]["status"] == "success"
        assert done[task["uuid"]]["resolved_at"] == pytest.approx(task["resolves_at"])
        shown = nocworx.get(f"/v1/task/{task['uuid']}").json()
        assert shown["resolved_date"] == int(task["resolves_at"])

    # the n-th task gets the same delay with the same seed whatever else is drawn (its own stream):
    # without the trailing-slash and stuck rolls the other draws differ, the delays do not
    first = [tasks[u]["delay_s"] for u in uuids]
    sim.reset()
    sim.configure(task_stuck_rate=0.0, uri_trailing_slash_rate=0.0)
    submit(12)
    second = [t["delay_s"] for t in sim.tasks()]
    assert [d for d, f in zip(second, first, strict=True) if f is not None] == [f for f in first if f is not None]

    sim.configure(task_delay_range_s=None, task_delay_s=0.05)      # null: back to the fixed delay
    [fixed] = submit(1)
    assert {t["uuid"]: t for t in sim.tasks()}[fixed]["delay_s"] == pytest.approx(0.05)


def test_nocworx_task_show_is_404_right_after_the_202_within_the_window(sim: RunningSimulator,
                                                                        nocworx: httpx.Client) -> None:
    sim.configure(task_404_window_s=0.3)
    task = nocworx.post("/v1/ticket", json={"department": "support", "subject": "x"}).json()
    early = nocworx.get(f"/v1/task/{task['uuid']}")
    assert early.status_code == 404 and early.json() == {"message": "Not Found"}
    assert poll(nocworx, f"/v1/task/{task['uuid']}", resolved).json()["status"] == "success"
    assert nocworx.get(f"/v1/task/{uuid.uuid4()}").status_code == 404


def test_nocworx_successful_task_may_have_a_null_resource(sim: RunningSimulator,
                                                          nocworx: httpx.Client) -> None:
    sim.configure(task_resource_null_rate=1.0)
    task = nocworx.post("/v1/ticket", json={"department": "sales", "subject": "Quote please"}).json()
    done = poll(nocworx, f"/v1/task/{task['uuid']}", resolved).json()
    assert (done["status"], done["resource"]) == ("success", None)
    found = nocworx.get("/v1/ticket", params={"filter[subject]": "Quote please"}).json()
    assert len(found) == 1


def test_nocworx_invalid_add_is_422_naming_each_reference(sim: RunningSimulator,
                                                          nocworx: httpx.Client) -> None:
    response = nocworx.post("/v1/ticket", json={"department": "technical", "category": "printer",
                                                "service_id": "42", "recipients": ["nope"]})
    assert response.status_code == 422
    body = response.json()
    assert body["message"] == "Unprocessable Entity"
    assert {e["reference"] for e in body["errors"]} == {"department", "category", "subject", "service_id",
                                                       "recipients"}
    assert {"message": "This input is required", "reference": "subject"} in body["errors"]
    assert sim.stats()["nocworx"]["tasks"] == 0


def test_nocworx_comment_close_and_open_are_tasks_that_change_the_ticket(nocworx: httpx.Client) -> None:
    task = nocworx.post("/v1/ticket", json={"department": "support", "subject": "x", "comment": "first"})
    ticket_id = poll(nocworx, f"/v1/task/{task.json()['uuid']}", resolved).json()["resource"]["id"]

    comment = nocworx.post(f"/v1/ticket/{ticket_id}/comment", json={"comment": "second"})
    assert comment.status_code == 202 and comment.json()["action"] == "ticket:comment"
    poll(nocworx, f"/v1/task/{comment.json()['uuid']}", resolved)
    assert [c["body"] for c in nocworx.get(f"/v1/ticket/{ticket_id}").json()["comments"]] == ["first", "second"]

    close = nocworx.post(f"/v1/ticket/{ticket_id}/close")
    assert close.status_code == 202 and close.json()["action"] == "ticket:close"
    poll(nocworx, f"/v1/task/{close.json()['uuid']}", resolved)
    assert nocworx.get(f"/v1/ticket/{ticket_id}").json()["is_closed"] is True
    reopen = nocworx.post(f"/v1/ticket/{ticket_id}/open")
    poll(nocworx, f"/v1/task/{reopen.json()['uuid']}", resolved)
    assert nocworx.get(f"/v1/ticket/{ticket_id}").json()["is_closed"] is False
    assert nocworx.post(f"/v1/ticket/{ticket_id}/comment", json={}).status_code == 422
    assert nocworx.post("/v1/ticket/999999/comment", json={"comment": "x"}).status_code == 404


def test_nocworx_task_list_filters_by_action_newest_first_with_input(nocworx: httpx.Client) -> None:
    uuids = [nocworx.post("/v1/ticket", json={"department": "support", "subject": f"s{i}"}).json()["uuid"]
             for i in range(3)]
    tasks = nocworx.get("/v1/task", params={"filter[action]": "ticket:add", "sortBy": "request_date",
                                            "sortOrder": "DESC", "page": 1, "pageSize": 2})
    assert tasks.status_code == 200
    assert tasks.headers["Content-Range"] == "items 1-2/3"
    assert [t["uuid"] for t in tasks.json()] == uuids[::-1][:2]
    assert tasks.json()[0]["input"] == {"department": "support", "subject": "s2"}


# -- faults ---------------------------------------------------------------------------------------


def test_hostup_drop_after_create_makes_the_ticket_but_the_client_gets_an_error(
        sim: RunningSimulator, hostup: httpx.Client) -> None:
    sim.configure(drop_after_create_rate=1.0)
    body, marker = marked()
    with pytest.raises(httpx.RemoteProtocolError):
        hostup.post("/support/tickets", json=hostup_ticket(message=body))
    stats = sim.stats()
    assert stats["hostup"]["tickets"] == 1 and stats["hostup"]["dropped"] == 1
    assert stats["tickets_by_marker"] == {marker: 1}
    [record] = [r for r in sim.requests(provider="hostup") if r["method"] == "POST"]
    assert (record["fault"], record["status"], record["marker"]) == ("drop", 201, marker)
    # the server is still healthy after the drop
    [listed] = hostup.get("/support/tickets").json()["data"]
    assert hostup.get(f"/support/tickets/{listed['id']}").json()["body"] == body


def test_nocworx_drop_after_create_keeps_the_task_which_still_makes_the_ticket(
        sim: RunningSimulator, nocworx: httpx.Client) -> None:
    sim.configure(drop_after_create_rate=1.0)
    comment, marker = marked()
    with pytest.raises(httpx.RemoteProtocolError):
        nocworx.post("/v1/ticket", json={"department": "support", "subject": "lost", "comment": comment})
    tasks = nocworx.get("/v1/task", params={"filter[action]": "ticket:add"}).json()
    assert [t["input"]["comment"] for t in tasks] == [comment]
    poll(nocworx, f"/v1/task/{tasks[0]['uuid']}", resolved)
    assert sim.stats()["tickets_by_marker"] == {marker: 1}


def test_error_rate_answers_5xx_before_doing_anything(sim: RunningSimulator, hostup: httpx.Client,
                                                      nocworx: httpx.Client) -> None:
    sim.configure(error_rate=1.0)
    for _ in range(5):
        response = hostup.post("/support/tickets", json=hostup_ticket())
        assert response.status_code in (500, 502, 503)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] in ("internal_error", "upstream_error", "upstream_unavailable")
    noc = nocworx.post("/v1/ticket", json={"department": "support", "subject": "x"})
    assert noc.status_code == 503 and noc.headers["Retry-After"] == "1"
    assert noc.headers["content-type"].startswith("text/plain")
    stats = sim.stats()
    assert (stats["hostup"]["tickets"], stats["nocworx"]["tasks"]) == (0, 0)
    assert stats["hostup"]["5xx"] == 5
    # unauthenticated calls get the 5xx too: the fault comes first
    assert httpx.get(f"{sim.hostup_url}/support/departments").status_code >= 500


def test_latency_is_added_to_every_request(sim: RunningSimulator, hostup: httpx.Client) -> None:
    sim.configure(latency_ms=[80, 100])
    started = time.monotonic()
    assert hostup.get("/support/departments").status_code == 200
    assert time.monotonic() - started >= 0.08


# -- control API ----------------------------------------------------------------------------------


def test_stats_count_tickets_by_marker_and_report_duplicates(sim: RunningSimulator, hostup: httpx.Client,
                                                             nocworx: httpx.Client) -> None:
    body, twice = marked()
    _, once = marked()
    hostup.post("/support/tickets", json=hostup_ticket(message=body))
    hostup.post("/support/tickets", json=hostup_ticket(message=body))
    task = nocworx.post("/v1/ticket", json={"department": "support", "subject": "x", "comment": body}).json()
    hostup.post("/support/tickets", json=hostup_ticket(message=body_with_marker("x", uuid.UUID(once))))
    poll(nocworx, f"/v1/task/{task['uuid']}", resolved)
    stats = sim.stats()
    assert stats["tickets_by_marker"] == {twice: 3, once: 1}
    assert stats["duplicates"] == {twice: 3}
    assert (stats["hostup"]["tickets"], stats["nocworx"]["tickets"]) == (3, 1)
    made = sim.tickets()
    assert [t["provider"] for t in made if t["marker"] == twice] == ["hostup", "hostup", "nocworx"]


def test_request_log_filters_by_provider_and_arrival_time(sim: RunningSimulator, hostup: httpx.Client,
                                                          nocworx: httpx.Client) -> None:
    hostup.get("/support/departments")
    middle = time.time()
    nocworx.get("/v1/ticket")
    hostup.get("/support/tickets")
    log = sim.requests()
    assert [(r["provider"], r["path"]) for r in log] == [
        ("hostup", "/api/v2/support/departments"), ("nocworx", "/v1/ticket"),
        ("hostup", "/api/v2/support/tickets")]
    assert [r["path"] for r in sim.requests(provider="hostup", since=middle)] == ["/api/v2/support/tickets"]
    assert all(r["throttled"] is False and r["marker"] is None for r in log)


def test_reset_clears_state_but_keeps_settings(sim: RunningSimulator, hostup: httpx.Client) -> None:
    sim.configure(critical_per_hour=5)
    hostup.post("/support/tickets", json=hostup_ticket())
    sim.reset()
    stats = sim.stats()
    assert stats["hostup"]["tickets"] == 0 and stats["hostup"]["requests"] == 0
    assert sim.requests() == [] and sim.tickets() == []
    assert sim.configure()["critical_per_hour"] == 5
    assert hostup.post("/support/tickets", json=hostup_ticket()).json()["number"] == "10001"


def test_config_refuses_unknown_or_out_of_range_settings(sim: RunningSimulator) -> None:
    for patch in ({"no_such_knob": 1}, {"error_rate": 1.5}, {"retry_after_format": "epoch"},
                  {"latency_ms": [10, 5]}, {"task_delay_range_s": [5, 1]}, {"task_delay_range_s": [-1, 2]},
                  {"task_delay_range_s": [1]}, {"task_delay_range_s": "slow"}):
        response = httpx.put(f"{sim.url}/_sim/config", json=patch)
        assert response.status_code == 400, patch
        assert response.json()["problems"]
    assert httpx.get(f"{sim.url}/_sim/config").json()["error_rate"] == 0.0
