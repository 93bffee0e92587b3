"""The HTTP gateway, running as its Procfile line runs it, against the real broker and database; and an
approver deciding from the link in their email, in a real browser (Debian's Chromium, driven by
Playwright)."""

from __future__ import annotations

import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from pypdf import PdfReader

from reportflow.consumers import STAGE_NAMES, creation, generation
from reportflow.shared.config import Settings
from reportflow.shared.documents import DocumentRenderer
from reportflow.shared.events import Event
from reportflow.shared.storage import FolderStorage
from reportflow.shared.topology import Topology, declare
from tests.helpers import (
    ROOT,
    TWO_STAGES,
    free_port,
    handle,
    open_first_stage,
    register_key,
    sample_request,
    wait_until,
)
from tests.pipeline import Pipeline, pipeline_environment

SECRET, TOKEN = "test-secret-key-for-approval-links-0123456789", "test-api-token-0123456789abcdefghijklmnop"
pytestmark = pytest.mark.e2e


@pytest.fixture
def gateway(tmp_path, exchange, broker, postgres_url, otlp):
    register_key(postgres_url, TOKEN, "operator", ["submit", "read-all"])
    port = free_port()
    pipeline = Pipeline(
        tmp_path,
        pipeline_environment(
            tmp_path,
            exchange,
            postgres_url,
            REPORTFLOW_ENV="test",
            REPORTFLOW_SECRET_KEY=SECRET,
            REPORTFLOW_GATEWAY_PORT=str(port),
            REPORTFLOW_GATEWAY_URL=f"http://127.0.0.1:{port}",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        ),
        names=("gateway",),
    )
    pipeline.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base) or pipeline.exited(), 30, what="the gateway")
        assert not pipeline.exited(), pipeline.logs()
        channel = broker.channel()
        from reportflow import consumers

        declare(channel, Topology(exchange), consumers.bindings())
        yield base, pipeline
    finally:
        pipeline.close()


def _answers(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/healthz", timeout=1).status == 200
    except OSError:
        return False


def call(method: str, url: str, body=None, token: str | None = TOKEN, opener=None, form: dict | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    if form is not None:
        from urllib.parse import urlencode

        data, headers["Content-Type"] = urlencode(form).encode(), "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        response = (opener or urllib.request.build_opener()).open(request, timeout=10)
        return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def links_for(base: str):
    return Settings(secret_key=SECRET, gateway_url=base, environment="test").approval_links()


# -- the JSON API ---------------------------------------------------------------------------------
def test_post_reports_publishes_with_confirms_and_answers_202_with_the_ids(gateway, tap, otlp):
    base, _ = gateway
    status, body, _ = call("POST", f"{base}/reports", sample_request(report_id="r-http"))
    assert status == 202, body
    answer = json.loads(body)
    assert answer["report_id"] == "r-http" and len(answer["trace_id"]) == 32
    [(_, payload, properties)] = tap.wait_for("report.requested")
    assert payload["title"] == "Q3 revenue review" and properties.message_id == answer["message_id"]
    assert answer["trace_id"] in properties.headers["traceparent"]
    server = wait_until(
        lambda: next((s for s in otlp.spans if s["kind"] == 2 and s["name"] == "POST /reports"), None),
        10,
        what="the HTTP span",
    )
    assert server["trace_id"] == answer["trace_id"] and server["parent_id"] is None  # the root of the report's trace
    assert server["service"] == "reportflow-gateway"


def test_post_reports_refuses_bad_bodies_and_callers_without_the_token(gateway, tap):
    base, _ = gateway
    assert call("POST", f"{base}/reports", sample_request(), token=None)[0] == 401
    assert call("POST", f"{base}/reports", sample_request(), token="wrong")[0] == 401
    status, body, _ = call("POST", f"{base}/reports", {"title": "no template"})
    assert status == 422 and any("'template' is a required property" in r for r in json.loads(body)["reasons"])
    assert not [e for e in tap.drain() if e[0] == "report.requested"]


def test_an_unavailable_broker_is_a_503_and_nothing_is_accepted(tmp_path, postgres_url):
    from reportflow.producers.gateway import create_app

    settings = Settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F",
        database_url=postgres_url,
        secret_key=SECRET,
        environment="test",
        storage_dir=tmp_path,
    )
    register_key(postgres_url, TOKEN, "operator", ["submit", "read-all"])
    client = create_app(settings).test_client()
    response = client.post("/reports", json=sample_request(), headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503 and "unavailable" in response.json["error"]


def test_outside_development_the_gateway_refuses_to_start_without_a_secret(postgres_url):
    from reportflow.producers.gateway import create_app

    with pytest.raises(ValueError, match="REPORTFLOW_SECRET_KEY"):
        create_app(Settings(database_url=postgres_url, environment="production"))


@pytest.fixture
def report_in_approval(postgres_url, uow_on, tmp_path):
    unit = uow_on(postgres_url)
    handle(
        unit,
        creation.on_report_requested,
        Event("report.requested", sample_request(report_id="r-gw", approval_stages=TWO_STAGES)),
    )
    handle(
        unit,
        generation.on_report_created,
        Event("report.created", {"report_id": "r-gw"}),
        renderer=DocumentRenderer(),
        storage=FolderStorage(tmp_path / "storage"),
    )
    open_first_stage(unit, "r-gw")
    return "r-gw"


def test_report_status_and_document_for_callers_with_the_token(gateway, report_in_approval):
    base, _ = gateway
    assert call("GET", f"{base}/reports/r-gw", token=None)[0] == 401
    status, body, _ = call("GET", f"{base}/reports/r-gw")
    report = json.loads(body)
    assert status == 200 and report["status"] == "in_approval"
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("review", "open"), ("sign-off", "pending")]
    status, pdf, headers = call("GET", report["documents"][0]["url"])
    assert status == 200 and headers["Content-Type"] == "application/pdf"
    assert "Q3 revenue review" in PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    assert call("GET", f"{base}/reports/nope")[0] == 404


# -- signed links ---------------------------------------------------------------------------------------
def open_link(url: str):
    """GET an approval page as a browser would, keeping its cookie; returns the opener and the form token."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    status, page, _ = call("GET", url, token=None, opener=opener)
    match = re.search(rb'name="form_token" value="([^"]+)"', page)
    return status, page, opener, match.group(1).decode() if match else None


def test_a_valid_link_opens_the_page_publishes_the_decision_once_and_then_is_used(gateway, report_in_approval, tap):
    base, _ = gateway
    links = links_for(base)
    url = links.url("r-gw", "review", "bob@example.com")
    status, page, opener, form_token = open_link(url)
    assert status == 200 and b"Q3 revenue review" in page and b"Approve" in page and b"Reject" in page
    status, page, _ = call(
        "POST",
        url,
        token=None,
        opener=opener,
        form={"form_token": form_token, "decision": "approve", "comment": "Fine by me"},
    )
    assert status == 200 and b"Thank you" in page
    [(_, decided, properties)] = tap.wait_for("approval.decided")
    assert decided == {
        "report_id": "r-gw",
        "stage": "review",
        "approver": {"email": "bob@example.com"},
        "decision": "approve",
        "comment": "Fine by me",
    }
    assert properties.message_id == links.claim(url.rsplit("/", 1)[1]).decision_message_id
    status, page, _ = call("GET", url, token=None)
    assert status == 409 and b"already used" in page
    status, page, _ = call(
        "POST", url, token=None, opener=opener, form={"form_token": form_token, "decision": "reject"}
    )
    assert status == 409
    time.sleep(0.5)
    assert len([e for e in tap.drain() if e[0] == "approval.decided"]) == 1


def test_delegate_to_on_the_approval_page_publishes_the_delegation(gateway, report_in_approval, tap):
    base, _ = gateway
    url = links_for(base).url("r-gw", "review", "eve@example.com")
    status, page, opener, form_token = open_link(url)
    assert status == 200 and b"Delegate to" in page
    form = {"form_token": form_token, "decision": "delegate", "comment": "On leave"}
    status, _, _ = call("POST", url, token=None, opener=opener, form={**form, "delegate_email": "not an address"})
    assert status == 400
    status, page, _ = call("POST", url, token=None, opener=opener, form={**form, "delegate_email": "Ian@Example.com"})
    assert status == 200 and b"ian@example.com" in page
    [(_, delegated, _)] = tap.wait_for("approval.delegated")
    assert delegated == {
        "report_id": "r-gw",
        "stage": "review",
        "approver": {"email": "eve@example.com"},
        "delegate": {"email": "ian@example.com"},
        "comment": "On leave",
    }


def test_a_reports_history_is_served_to_its_readers(gateway, report_in_approval):
    base, _ = gateway
    assert call("GET", f"{base}/reports/r-gw/history", token=None)[0] == 401
    status, body, _ = call("GET", f"{base}/reports/r-gw/history")
    assert status == 200
    steps = [s["step"] for s in json.loads(body)["history"]]
    assert steps == ["requested", "generated", "stage opened"]
    assert call("GET", f"{base}/reports/nope/history")[0] == 404


def test_forged_expired_closed_stage_outsider_and_cross_site_posts_publish_nothing(gateway, report_in_approval, tap):
    base, _ = gateway
    links = links_for(base)
    good = links.url("r-gw", "review", "bob@example.com")
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    expired = links.url("r-gw", "review", "bob@example.com", issued_at=time.time() - 8 * 24 * 3600)
    pages = {
        "forged": (forged, 403, b"not valid"),
        "expired": (expired, 403, b"expired"),
        "closed stage": (links.url("r-gw", "sign-off", "carol@example.com"), 409, b"not open yet"),
        "outsider": (links.url("r-gw", "review", "mallory@example.com"), 403, b"is not an approver"),
        "other secret": (
            links_for(base).__class__("another-secret", base, 3600).url("r-gw", "review", "bob@example.com"),
            403,
            b"not valid",
        ),
    }
    for name, (url, expected_status, words) in pages.items():
        status, page, _ = call("GET", url, token=None)
        assert (status, words in page) == (expected_status, True), name
        status, _, _ = call("POST", url, token=None, form={"form_token": "x", "decision": "approve"})
        assert status in (403, 409), name
    # The right link, but a form that did not come from its page (no cookie, forged or missing token).
    _, _, _, form_token = open_link(good)
    for form in (
        {"decision": "approve"},
        {"decision": "approve", "form_token": form_token},
        {"decision": "approve", "form_token": "forged"},
    ):
        status, page, _ = call("POST", good, token=None, form=form)
        assert status == 403 and b"did not come from the approval page" in page
    time.sleep(0.5)
    assert not [e for e in tap.drain() if e[0] == "approval.decided"]


# -- in a real browser -------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_an_approver_decides_from_the_email_in_a_browser_and_the_report_is_finalized(
    tmp_path, exchange, broker, postgres_url, smtp, otlp
):
    from playwright.sync_api import sync_playwright

    register_key(postgres_url, TOKEN, "operator", ["submit", "read-all"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pipeline = Pipeline(
        tmp_path,
        pipeline_environment(
            tmp_path,
            exchange,
            postgres_url,
            REPORTFLOW_ENV="test",
            REPORTFLOW_SMTP_URL=smtp.url,
            REPORTFLOW_SECRET_KEY=SECRET,
            REPORTFLOW_GATEWAY_PORT=str(port),
            REPORTFLOW_GATEWAY_URL=base,
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        ),
        names=(*STAGE_NAMES, "gateway"),
    )
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange)
        wait_until(lambda: _answers(base), 30, what="the gateway")
        request = sample_request(
            report_id="r-browser", approval_stages=[{"name": "review", "approvers": ["bob@example.com"]}]
        )
        assert call("POST", f"{base}/reports", request)[0] == 202

        def link_in_email():
            emails = [m["message"] for m in smtp.messages if "bob@example.com" in m["envelope_to"]]
            found = emails and re.search(r"http://127\.0\.0\.1:\d+/approve/\S+", emails[0].get_body().get_content())
            return found.group(0) if found else None

        url = wait_until(link_in_email, 60, what="bob's approval email with his link")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 900, "height": 760})
            page.goto(url)
            assert page.locator("h1").inner_text() == "Q3 revenue review"
            page.fill("#comment", "Approved from the email.")
            screenshot = tmp_path / "approval-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("REPORTFLOW_UPDATE_SCREENSHOTS"):
                (ROOT / "docs" / "approval-page.png").write_bytes(screenshot.read_bytes())
            page.click("button.approve")
            page.wait_for_selector("text=Thank you")
            browser.close()

        def finalized():
            status, body, _ = call("GET", f"{base}/reports/r-browser")
            return status == 200 and json.loads(body)["status"] == "finalized" and json.loads(body)

        report = wait_until(finalized, 60, what="the report finalized")
        [decision] = report["stages"][0]["decisions"]
        assert (decision["approver"], decision["comment"]) == ("bob@example.com", "Approved from the email.")
        wait_until(
            lambda: any(m["message"]["Subject"] == "Report approved: Q3 revenue review" for m in smtp.messages),
            30,
            what="the final email",
        )
        assert pipeline.stop()["gateway"] == 0  # flushes spans
    finally:
        pipeline.close()
    # The click is a trace of its own; the report's trace links to it at the decision.
    [click] = [s for s in otlp.spans if s["name"] == "POST /approve"]
    [request_span] = [s for s in otlp.spans if s["name"] == "POST /reports"]
    [decided] = [s for s in otlp.spans if s["name"].startswith("process ") and "approval.decided" in s["name"]]
    assert click["trace_id"] != request_span["trace_id"] and click["service"] == "reportflow-gateway"
    assert decided["trace_id"] == request_span["trace_id"]
    assert [link["trace_id"] for link in decided["links"]] == [click["trace_id"]]


# -- hardening ---------------------------------------------------------------------------------------------
def _pieces(token: str, size: int = 12) -> set[str]:
    return {token[i : i + size] for i in range(len(token) - size + 1)}


def test_no_part_of_a_link_token_reaches_the_spans_or_the_log(gateway, report_in_approval, otlp, tap):
    base, pipeline = gateway
    links = links_for(base)
    approver = links.url("r-gw", "review", "bob@example.com")
    opened, used = open_link(approver), None
    assert opened[0] == 200
    assert call("GET", f"{approver}/document", token=None, opener=opened[2])[0] == 200
    assert (
        call("POST", approver, token=None, opener=opened[2], form={"form_token": opened[3], "decision": "approve"})[0]
        == 200
    )
    used = call("GET", approver, token=None)
    expired = links.url("r-gw", "review", "eve@example.com", issued_at=time.time() - 8 * 24 * 3600)
    outsider = links.url("r-gw", "review", "mallory@example.com")
    garbled = approver[:-10] + "A" * 10
    unexpected = f"{base}/approve/" + links._fernet.encrypt(b"[1, 2, 3]").decode()  # our key, not our payload
    answers = {url: call("GET", url, token=None)[0] for url in (expired, outsider, garbled, unexpected)}
    assert used[0] == 409 and list(answers.values()) == [403, 403, 403, 403], answers
    assert pipeline.stop()["gateway"] == 0  # flushes its spans
    tokens = [url.rsplit("/", 1)[1] for url in (approver, expired, outsider, garbled, unexpected)]

    wire = json.dumps(otlp.spans)
    log = pipeline.logs()
    assert [s for s in otlp.spans if s["name"] == "GET /approve"], "the link's requests were traced"
    for token in tokens:
        leaked = [piece for piece in _pieces(token) if piece in wire or piece in log]
        assert not leaked, f"part of a link token left the request: {leaked[:3]}"
    # And the token itself says nothing to whoever reads it.
    import base64

    readable = base64.urlsafe_b64decode(tokens[0] + "=" * (-len(tokens[0]) % 4))
    assert not any(word in readable for word in (b"r-gw", b"review", b"bob@example.com"))


def test_a_body_larger_than_a_message_is_refused_before_it_is_read(gateway, tap):
    import socket

    base, _ = gateway
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /reports HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n\r\n{"
        )  # 300 MB announced, one byte sent
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_report_the_bus_would_refuse_for_its_size_is_a_413_and_nothing_is_published(gateway, tap):
    base, _ = gateway
    request = sample_request()
    request.pop("report_id", None)
    request["data"]["table"] = {"columns": ["text"], "rows": []}
    limit = 1_048_576
    size = lambda: len(json.dumps(request, separators=(",", ":")).encode())  # noqa: E731
    while size() < limit - 1000:
        request["data"]["table"]["rows"].append(["x" * 1000])
    request["data"]["table"]["rows"].append(["x" * (limit - 10 - size() - len(',[""]'))])
    # Under the HTTP cap by 10 bytes: the message, with the report id the gateway adds, is what is too large.
    body = json.dumps(request, separators=(",", ":")).encode()
    assert len(body) == limit - 10
    http = urllib.request.Request(
        f"{base}/reports",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(http, timeout=30)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as error:
        assert error.code == 413 and "over the limit" in json.loads(error.read())["reasons"][0]
    time.sleep(0.5)
    assert not [e for e in tap.drain() if e[0] == "report.requested"]


def test_bad_bodies_bearer_schemes_hosts_and_headers_get_clear_answers(gateway, report_in_approval):
    base, _ = gateway
    nested = b"[" * 50_000 + b"]" * 50_000
    http = urllib.request.Request(
        f"{base}/reports",
        data=nested,
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(http, timeout=10)
    except urllib.error.HTTPError as error:
        assert error.code == 400 and "not JSON" in json.loads(error.read())["error"]

    def with_authorization(value: str) -> int:
        request = urllib.request.Request(f"{base}/reports/r-gw", headers={"Authorization": value})
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as error:
            return error.code

    assert with_authorization(f"bearer {TOKEN}") == 200 and with_authorization(f"BEARER {TOKEN}") == 200
    assert with_authorization(TOKEN) == 401 and with_authorization(f"Basic {TOKEN}") == 401

    # Document URLs come from REPORTFLOW_GATEWAY_URL, whatever Host the request names.
    request = urllib.request.Request(
        f"{base}/reports/r-gw", headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"}
    )
    report = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert report["documents"][0]["url"] == f"{base}/reports/r-gw/document"

    page = call("GET", links_for(base).url("r-gw", "review", "bob@example.com"), token=None)
    for status, _, headers in (page, call("GET", f"{base}/reports/r-gw"), call("GET", f"{base}/nowhere")):
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], status
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    assert page[0] == 200 and page[2]["Cache-Control"] == "no-store"
    assert b"<style" not in page[1]  # the page's style is a file, so the policy allows no inline style


def test_a_link_submitted_twice_at_once_is_told_what_was_recorded(gateway, report_in_approval, tap):
    from concurrent.futures import ThreadPoolExecutor

    base, _ = gateway
    url = links_for(base).url("r-gw", "review", "bob@example.com")
    _, _, opener, form_token = open_link(url)
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda decision: call(
                    "POST", url, token=None, opener=opener, form={"form_token": form_token, "decision": decision}
                ),
                ["approve", "reject"] * 3,
            )
        )
    sent = [a for a in answers if a[0] == 200]
    assert len(sent) == 1 and sorted(a[0] for a in answers) == [200, 409, 409, 409, 409, 409]
    recorded = re.search(rb"decision to <strong>(\w+)</strong>", sent[0][1]).group(1).decode()
    for _status, page, _ in answers:
        assert f"<strong>{recorded}</strong>".encode() in page or f"to {recorded}".encode() in page, page
    [(_, decided, _)] = tap.wait_for("approval.decided")
    time.sleep(0.5)
    assert decided["decision"] == recorded and len([e for e in tap.drain() if e[0] == "approval.decided"]) == 1


def test_an_approver_who_already_decided_elsewhere_is_told_so_and_nothing_is_sent(
    gateway, report_in_approval, postgres_url, uow_on, tap
):
    from reportflow.consumers import approval
    from tests.helpers import decide

    base, _ = gateway
    handle(uow_on(postgres_url), approval.on_approval_decided, decide("r-gw", "review", "bob@example.com"))
    status, page, _ = call("GET", links_for(base).url("r-gw", "review", "bob@example.com"), token=None)
    assert status == 409 and b"has already decided stage" in page
    time.sleep(0.3)
    assert not [e for e in tap.drain() if e[0] == "approval.decided"]
