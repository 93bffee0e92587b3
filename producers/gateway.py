"""The HTTP gateway: one more producer, for people and for upstreams that do not speak AMQP. It
publishes the same events any upstream would, and reads reports from the database.

    POST /reports                  report.requested (Bearer token)  -> 202 {report_id, trace_id}
    GET  /reports/{id}             status, stages, decisions, documents (Bearer token)
    GET  /reports/{id}/document    the approved PDF, else the draft (Bearer token)
    GET  /reports/{id}/history     every step of the report, in order (Bearer token)
    GET  /approve/{token}          an approver's page, from the personal link in their email
    POST /approve/{token}          the decision (approval.decided), or a delegation (approval.delegated)
    GET  /approve/{token}/document the draft the approver is asked about

An approval link's token is a credential. Before anything else sees a request (the tracing
instrumentation, Flask's routing and logging), the token is taken out of the path: routes, spans and
log lines only ever show /approve and /approve/document."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import signal
import threading
import time
from contextlib import contextmanager

import kombu.exceptions
from flask import Flask, Response, jsonify, render_template, request, send_file
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from reportflow import schemas
from reportflow.producers.api_auth import ApiAuthentication
from reportflow.producers.client import InvalidEvent, MessageTooLarge, ReportflowClient, Unroutable
from reportflow.producers.refused import Refused
from reportflow.shared import broker
from reportflow.shared.api_keys import Caller
from reportflow.shared.config import Settings
from reportflow.shared.db import make_engine
from reportflow.shared.documents import ASSETS
from reportflow.shared.events import new_report_id
from reportflow.shared.links import LinkRefused
from reportflow.shared.mail import InvalidAddress, check_address
from reportflow.shared.models import Report, Submission, UsedLink
from reportflow.shared.report_history import report_history
from reportflow.shared.report_views import report_view

log = logging.getLogger("reportflow.gateway")
BROKER_DOWN = (kombu.exceptions.OperationalError, ConnectionError, OSError, Unroutable)
LINK_TOKEN = "reportflow.link_token"  # where the environ keeps a link's token once it is out of the path
_LINK_PATH = re.compile(r"^/approve/(?P<token>[^/]+)(?P<rest>/document)?/?$")
# Pages and answers are private and never framed; the pages' only other resource is their stylesheet.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Gateway(Flask):
    def __call__(self, environ, start_response):
        # Outside every wsgi_app wrapper (the Flask instrumentation wraps that), so nothing downstream sees it.
        return super().__call__(token_out_of_path(environ), start_response)


def token_out_of_path(environ: dict) -> dict:
    """/approve/TOKEN[/document] becomes /approve[/document], the token kept in environ[LINK_TOKEN]."""
    found = _LINK_PATH.match(environ.get("PATH_INFO", ""))
    if found:
        environ[LINK_TOKEN] = found["token"]
        environ["PATH_INFO"] = "/approve" + (found["rest"] or "")
        query = environ.get("QUERY_STRING")
        for raw in ("REQUEST_URI", "RAW_URI"):
            if raw in environ:
                environ[raw] = environ.get("SCRIPT_NAME", "") + environ["PATH_INFO"] + (f"?{query}" if query else "")
    return environ


def create_app(settings: Settings, client_factory=None) -> Flask:
    links = settings.approval_links()  # refuses a missing or weak secret outside development
    development_token = settings.checked_api_token()  # development only; per-client keys everywhere
    app = Gateway(__name__, template_folder=str(ASSETS / "gateway"), static_folder=str(ASSETS / "gateway" / "static"))
    # A body larger than a message may be is refused before it is read (waitress is capped alike, in serve()).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_message_bytes
    engine = make_engine(settings.database_url, timeout_seconds=settings.database_timeout_seconds)
    storage = settings.document_storage()
    public_url = settings.gateway_url.rstrip("/")
    client_factory = client_factory or (
        lambda: ReportflowClient(
            settings.amqp_url,
            settings.exchange,
            app_id="reportflow-gateway",
            max_message_bytes=settings.max_message_bytes,
        )
    )

    authentication = ApiAuthentication(engine, development_token, settings.gateway_auth_failures)

    def authorized(scope: str) -> Caller:
        return authentication.caller(request.headers.get("Authorization", ""), request.remote_addr or "?", scope)

    def readable(session: Session, caller: Caller, report_id: str) -> Report:
        """The report, if this caller may read it: read-all, or read and its own submission. Another's
        report is a 404, as if it did not exist."""
        report = session.get(Report, report_id)
        if report is not None and not caller.may("read-all"):
            submitted = session.get(Submission, report_id)
            if submitted is None or submitted.api_key != caller.name:
                report = None
        if report is None:
            raise Refused(f"no report {report_id!r}", 404)
        return report

    def is_page() -> bool:
        return request.path.startswith("/approve")

    @app.errorhandler(Refused)
    def refusal(refused: Refused):
        if is_page():
            return render_template("refused.html", message=str(refused)), refused.status
        return jsonify(error=str(refused)), refused.status, refused.headers

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return refusal(
            Refused(f"the body is larger than {settings.max_message_bytes} bytes, the most a message may carry", 413)
        )

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.post("/reports")
    def request_report():
        caller = authorized("submit")
        try:
            body = json.loads(request.get_data(cache=False))
        except (ValueError, RecursionError):
            raise Refused("the body is not JSON (or is nested too deeply)", 400) from None
        if not isinstance(body, dict):
            raise Refused("the body must be a JSON object", 422)
        body["report_id"] = body.get("report_id") or new_report_id()
        reasons = schemas.errors("report.requested", body)
        if reasons:
            return jsonify(error="the request does not match the report.requested schema", reasons=reasons), 422
        claimed_now = claim_submission(body["report_id"], caller)
        try:
            with client_factory() as client:
                published = client.request_report(body)
        except (InvalidEvent, *BROKER_DOWN) as exc:
            if claimed_now:  # nothing was accepted: the id is free again
                forget_submission(body["report_id"])
            if isinstance(exc, MessageTooLarge):
                return jsonify(error="the report is larger than a message may be", reasons=exc.reasons), 413
            if isinstance(exc, InvalidEvent):
                reasons = exc.reasons
                return jsonify(error="the request does not match the report.requested schema", reasons=reasons), 422
            log.warning("broker unavailable for POST /reports: %r", exc)
            raise Refused("the message broker is unavailable; nothing was accepted, try again", 503) from None
        return jsonify(report_id=published.report_id, trace_id=published.trace_id, message_id=published.message_id), 202

    def claim_submission(report_id: str, caller: Caller) -> bool:
        """The report id is this caller's before anything is published: another key cannot take it over by
        sending the same id, and the caller's read scope sees it. False: the caller had claimed it before."""
        with Session(engine) as session:
            session.add(Submission(report_id=report_id, api_key=caller.name))
            try:
                session.commit()
                return True
            except IntegrityError:
                session.rollback()
                earlier = session.get(Submission, report_id)
                if earlier is None or earlier.api_key != caller.name:
                    raise Refused(f"report id {report_id!r} is taken", 409) from None
                return False

    def forget_submission(report_id: str) -> None:
        with Session(engine) as session, session.begin():
            session.query(Submission).filter_by(report_id=report_id).delete()

    @app.get("/reports/<report_id>")
    def report_status(report_id: str):
        caller = authorized("read")
        with Session(engine) as session:
            report = readable(session, caller, report_id)
            view = report_view(report)
            for document in view["documents"]:
                # From the configured public URL, never from the request's Host header.
                document["url"] = f"{public_url}/reports/{report.id}/document"
            return jsonify(view)

    @app.get("/reports/<report_id>/history")
    def report_history_view(report_id: str):
        caller = authorized("read")
        with Session(engine) as session:
            readable(session, caller, report_id)
            return jsonify(report_id=report_id, history=report_history(session, report_id))

    @app.get("/reports/<report_id>/document")
    def report_document(report_id: str):
        caller = authorized("read")
        with Session(engine) as session:
            report = readable(session, caller, report_id)
            document = report.document("final") or report.document("draft")
            if document is None:
                raise Refused(f"no document for report {report_id!r}", 404)
            return _pdf(storage.get(document.storage_key), f"{report_id}-{document.kind}.pdf")

    @contextmanager
    def open_stage():
        """The link's claim, its report and its open stage, in a session closed afterwards."""
        token = request.environ.get(LINK_TOKEN, "")
        try:
            claim = links.claim(token)
        except LinkRefused as refused:
            raise Refused(str(refused), 403) from None
        with Session(engine) as session:
            report = session.get(Report, claim.report_id)
            if report is None or report.stage_named(claim.stage) is None:
                raise Refused("This approval link names a report or stage that does not exist.", 404)
            used = session.get(UsedLink, claim.nonce)
            if used is not None:
                raise Refused(f"This approval link was already used, to {used.decision}. Each link works once.", 409)
            stage, not_decidable = report.stage_open_to(claim.stage, claim.approver)
            if not_decidable:
                raise Refused(
                    f"Nothing can be decided with this link: {not_decidable.reason}.",
                    {"not_approver": 403, "unknown": 404}.get(not_decidable.kind, 409),
                )
            yield token, claim, session, report, stage

    @app.get("/approve")
    def approval_page():
        with open_stage() as (token, claim, _, report, stage):
            form_token = links.form_token(claim)
            page = render_template(
                "approve.html",
                report=report,
                stage=stage,
                approver=claim.approver,
                form_token=form_token,
                document_url=f"/approve/{token}/document",
            )
        response = Response(page)
        # Double submit: the form's token must match this cookie, which another site can neither read
        # nor set for this one.
        response.set_cookie(
            "reportflow_form",
            form_token,
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
            path=f"/approve/{token}",
        )
        return response

    @app.get("/approve/document")
    def approval_document():
        with open_stage() as (_, _, _, report, _):
            draft = report.document("draft")
            if draft is None:
                raise Refused("The draft is not ready yet.", 404)
            return _pdf(storage.get(draft.storage_key), f"{report.id}-draft.pdf")

    @app.post("/approve")
    def decide():
        decision = request.form.get("decision")
        comment = (request.form.get("comment") or "").strip()[:5000] or None
        delegate_to = (request.form.get("delegate_email") or "").strip().lower()
        with open_stage() as (_, claim, session, report, stage):
            form_token = request.form.get("form_token")
            if not links.check_form_token(claim, form_token) or request.cookies.get("reportflow_form") != form_token:
                raise Refused("This form did not come from the approval page; nothing was sent.", 403)
            if decision not in ("approve", "reject", "delegate"):
                raise Refused("Choose Approve, Reject or Delegate.", 400)
            if decision == "delegate":
                try:
                    check_address(delegate_to)
                except InvalidAddress:
                    raise Refused("To delegate, give the email address of the person to decide instead.", 400) from None
            title, stage_name = report.title, stage.name  # the session expires them at commit
            # The link is claimed before the message is published: the same link submitted twice at once
            # waits here on the row, then finds it used and is told what was recorded.
            session.add(
                UsedLink(
                    nonce=claim.nonce,
                    report_id=report.id,
                    stage_name=stage_name,
                    approver_email=claim.approver,
                    decision=decision,
                )
            )
            try:
                session.flush()
            except IntegrityError:
                session.rollback()
                recorded = session.get(UsedLink, claim.nonce)
                return render_template(
                    "decided.html", report_title=title, stage=stage_name, decision=recorded.decision, already=True
                ), 409
            try:
                with client_factory() as client:
                    if decision == "delegate":
                        client.delegate(
                            report.id,
                            stage_name,
                            claim.approver,
                            delegate_to,
                            delegate_name=(request.form.get("delegate_name") or "").strip()[:200] or None,
                            comment=comment,
                            message_id=claim.decision_message_id,
                        )
                    else:
                        client.decide(
                            report.id,
                            stage_name,
                            claim.approver,
                            approve=decision == "approve",
                            comment=comment,
                            message_id=claim.decision_message_id,
                        )
            except BROKER_DOWN as exc:
                log.warning("broker unavailable for a decision: %r", exc)
                raise Refused(
                    "The decision could not be sent just now; nothing was recorded. Try again.", 503
                ) from None
            session.commit()
        return render_template(
            "decided.html", report_title=title, stage=stage_name, decision=decision, delegate=delegate_to
        ), 200

    @app.get("/healthz")
    def health():
        return jsonify(status="ok")

    return app


def _pdf(content: bytes, name: str) -> Response:
    return send_file(io.BytesIO(content), mimetype="application/pdf", download_name=name)


def _not_ready(settings: Settings):
    """Why the gateway cannot take requests now (no broker node, no database), or None."""
    engine = make_engine(settings.database_url, timeout_seconds=settings.database_timeout_seconds)

    def check() -> str | None:
        if not broker.reachable(settings.amqp_url):
            return "no broker node answers"
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return None

    return check


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings | None = None) -> None:
    """`reportflow gateway`: the gateway behind waitress, traced like every other process."""
    import waitress
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from reportflow.shared.health import serve_health
    from reportflow.shared.startup_heap import freeze_startup_objects
    from reportflow.shared.tracing import setup_logging, setup_tracing

    settings = settings or Settings.load()
    setup_logging(settings.log_level, settings.log_format, "reportflow-gateway")
    if settings.development:
        if not _loopback(settings.gateway_bind):
            raise SystemExit(
                f"REPORTFLOW_ENV=development: the gateway signs links with the published development "
                f"key, so it listens on loopback only, not {settings.gateway_bind!r}"
            )
        log.warning(
            "development mode: approval links are signed with the published development key unless "
            "REPORTFLOW_SECRET_KEY is set, and the development API token works; loopback only"
        )
    provider = setup_tracing("reportflow-gateway", settings.tracing, settings.environment)
    app = create_app(settings)
    # Alive while this process answers at all: the process ends when its server loop does.
    health = serve_health(settings, live=lambda: True, ready=_not_ready(settings), provider=provider)
    if provider is not None:
        FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
    server = waitress.create_server(
        app,
        host=settings.gateway_bind,
        port=settings.gateway_port,
        threads=8,
        max_request_body_size=settings.max_message_bytes,
    )
    # The handler only sets a flag. Raised from it, SystemExit could land in a weakref callback run by a
    # collection, where Python prints and swallows it, and the stop asked for would be lost.
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    log.info(
        "gateway listening on http://%s:%d (public URL %s)",
        settings.gateway_bind,
        settings.gateway_port,
        settings.gateway_url,
    )
    freeze_startup_objects()
    http = threading.Thread(target=server.run, name="gateway-http", daemon=True)
    http.start()
    try:
        while http.is_alive() and not stop_requested.is_set():
            # is_set() and sleep take no lock, so the handler, run on this thread, never waits on one it holds.
            time.sleep(0.2)
    finally:
        server.trigger.pull_trigger(server.close)  # stop accepting, on the server loop's own thread
        server.task_dispatcher.shutdown()  # requests in hand get 5 s to finish; queued ones are cancelled
        if health is not None:
            health.stop()
        if provider is not None:
            provider.shutdown()
        log.info("gateway stopped")
    if not stop_requested.is_set():
        raise SystemExit("the gateway's server loop ended unasked; its error is above")
