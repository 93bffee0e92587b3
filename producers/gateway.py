"""The HTTP gateway: one more producer, for people and for upstreams that do not speak AMQP. It
publishes the same events any upstream would, and reads reports from the database.

    POST /reports                  report.requested (Bearer token)  -> 202 {report_id, trace_id}
    GET  /reports/{id}             status, stages, decisions, documents (Bearer token)
    GET  /reports/{id}/document    the approved PDF, else the draft (Bearer token)
    GET  /approve/{token}          an approver's page, from the personal link in their email
    POST /approve/{token}          the decision: approval.decided
    GET  /approve/{token}/document the draft the approver is asked about"""
from __future__ import annotations

import hmac
import logging
import signal
from contextlib import contextmanager

import kombu.exceptions
from flask import Flask, Response, abort, jsonify, render_template, request, send_file, url_for
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import schemas
from producers.client import ReportflowClient, Unroutable
from shared.config import Settings
from shared.db import make_engine
from shared.documents import ASSETS, FolderStorage
from shared.links import LinkRefused
from shared.models import Report, UsedLink

log = logging.getLogger("reportflow.gateway")
BROKER_DOWN = (kombu.exceptions.OperationalError, ConnectionError, OSError, Unroutable)


def create_app(settings: Settings, client_factory=None) -> Flask:
    if not settings.secret_key and settings.environment != "development":
        raise ValueError("REPORTFLOW_SECRET_KEY is required outside development")
    app = Flask(__name__, template_folder=str(ASSETS / "gateway"))
    engine = make_engine(settings.database_url)
    storage = FolderStorage(settings.storage_dir)
    links = settings.approval_links()
    client_factory = client_factory or (lambda: ReportflowClient(settings.amqp_url, settings.exchange,
                                                                 app_id="reportflow-gateway"))

    def api_caller() -> None:
        expected = settings.api_token
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            abort(Response('{"error": "a valid Bearer token is required"}', 401, {
                "Content-Type": "application/json", "WWW-Authenticate": 'Bearer realm="reportflow"'}))

    @app.post("/reports")
    def request_report():
        api_caller()
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="the body must be a JSON object"), 422
        body = {**body, "report_id": body.get("report_id") or None}
        if body["report_id"] is None:
            body.pop("report_id")
        problems = schemas.errors("report.requested", body)
        if problems:
            return jsonify(error="the request does not match the report.requested schema", reasons=problems), 422
        try:
            with client_factory() as client:
                published = client.request_report(body)
        except BROKER_DOWN as exc:
            log.warning("broker unavailable for POST /reports: %r", exc)
            return jsonify(error="the message broker is unavailable; nothing was accepted, try again"), 503
        return jsonify(report_id=published.report_id, trace_id=published.trace_id,
                       message_id=published.message_id), 202

    @app.get("/reports/<report_id>")
    def report_status(report_id: str):
        api_caller()
        with Session(engine) as session:
            report = session.get(Report, report_id)
            if report is None:
                return jsonify(error=f"no report {report_id!r}"), 404
            return jsonify(
                report_id=report.id, title=report.title, status=report.status, trace_id=report.trace_id,
                stages=[{"position": s.position, "name": s.name, "rule": s.rule, "status": s.status,
                         "approvers": s.approvers,
                         "decisions": [{"approver": d.approver_email, "decision": d.decision, "comment": d.comment,
                                        "decided_at": d.decided_at.isoformat()} for d in s.decisions]}
                        for s in report.stages],
                documents=[{"kind": d.kind, "pages": d.pages, "size_bytes": d.size_bytes, "sha256": d.sha256,
                            "url": url_for("report_document", report_id=report.id, _external=True)}
                           for d in report.documents])

    @app.get("/reports/<report_id>/document")
    def report_document(report_id: str):
        api_caller()
        with Session(engine) as session:
            report = session.get(Report, report_id)
            document = report and (report.document("final") or report.document("draft"))
            if document is None:
                return jsonify(error=f"no document for report {report_id!r}"), 404
            return send_file(storage.path(document.storage_key), mimetype="application/pdf",
                             download_name=f"{report_id}-{document.kind}.pdf")

    class Refused(Exception):
        """A link that cannot be used now: answered with a page that says why, and nothing published."""

        def __init__(self, message: str, status: int):
            super().__init__(message)
            self.status = status

    @app.errorhandler(Refused)
    def refusal_page(refused: Refused):
        return render_template("refused.html", message=str(refused)), refused.status

    @contextmanager
    def open_stage(token: str):
        """The claim in a link, its report and its open stage, in a session closed afterwards."""
        try:
            claim = links.claim(token)
        except LinkRefused as refused:
            raise Refused(str(refused), 403) from None
        with Session(engine) as session:
            report = session.get(Report, claim.report_id)
            stage = report and next((s for s in report.stages if s.name == claim.stage), None)
            if stage is None:
                raise Refused("This approval link names a report or stage that does not exist.", 404)
            if session.get(UsedLink, claim.nonce) is not None:
                raise Refused("This approval link was already used. Each link works once.", 409)
            if report.status == "rejected" or stage.status != "open":
                state = "was rejected" if report.status == "rejected" else \
                    ("is not open yet" if stage.status == "pending" else "is closed")
                raise Refused(f"This stage ({stage.name}) {state}; nothing can be decided here now.", 409)
            if claim.approver not in stage.approvers:
                raise Refused("This link is not for an approver of this stage.", 403)
            yield claim, session, report, stage

    @app.get("/approve/<token>")
    def approval_page(token: str):
        with open_stage(token) as (claim, _, report, stage):
            form_token = links.form_token(token)
            page = render_template("approve.html", report=report, stage=stage, approver=claim.approver,
                                   form_token=form_token, document_url=url_for("approval_document", token=token))
        response = Response(page)
        # Double submit: the form's token must match this cookie, which another site can neither read
        # nor set for this one.
        response.set_cookie("reportflow_form", form_token, httponly=True, samesite="Strict",
                            secure=request.is_secure, path=f"/approve/{token}")
        return response

    @app.get("/approve/<token>/document")
    def approval_document(token: str):
        with open_stage(token) as (_, _, report, _):
            draft = report.document("draft")
            if draft is None:
                raise Refused("The draft is not ready yet.", 404)
            return send_file(storage.path(draft.storage_key), mimetype="application/pdf",
                             download_name=f"{report.id}-draft.pdf")

    @app.post("/approve/<token>")
    def decide(token: str):
        form_token = request.form.get("form_token")
        if not links.check_form_token(token, form_token) or request.cookies.get("reportflow_form") != form_token:
            raise Refused("This form did not come from the approval page; nothing was sent.", 403)
        decision = request.form.get("decision")
        if decision not in ("approve", "reject"):
            raise Refused("Choose Approve or Reject.", 400)
        comment = (request.form.get("comment") or "").strip()[:5000] or None
        with open_stage(token) as (claim, session, report, stage):
            title, stage_name = report.title, stage.name  # the session expires them at commit
            try:
                with client_factory() as client:
                    client.decide(report.id, stage.name, claim.approver, approve=decision == "approve",
                                  comment=comment, message_id=claim.decision_message_id)
                session.add(UsedLink(nonce=claim.nonce, report_id=report.id, stage_name=stage.name,
                                     approver_email=claim.approver, decision=decision))
                session.commit()
            except BROKER_DOWN as exc:
                log.warning("broker unavailable for a decision: %r", exc)
                raise Refused("The decision could not be sent just now; nothing was recorded. Try again.", 503) from None
            except IntegrityError:
                pass  # the same link, submitted twice at once: one message id, so one decision
        return render_template("decided.html", report_title=title, stage=stage_name, decision=decision), 200

    @app.get("/healthz")
    def health():
        return jsonify(status="ok")

    return app


def serve(settings: Settings | None = None) -> None:
    """`reportflow gateway`: the gateway behind waitress, traced like every other process."""
    import waitress
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from shared.tracing import setup_logging, setup_tracing

    settings = settings or Settings.load()
    setup_logging(settings.log_level, settings.log_format, "reportflow-gateway")
    provider = setup_tracing("reportflow-gateway", settings.tracing, settings.environment)
    app = create_app(settings)
    if provider is not None:
        FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
    log.info("gateway listening on http://%s:%d (public URL %s)", settings.gateway_bind, settings.gateway_port,
             settings.gateway_url)
    server = waitress.create_server(app, host=settings.gateway_bind, port=settings.gateway_port, threads=8)

    def stop(*_):
        raise SystemExit(0)  # out of the server loop, so the spans still queued are flushed below

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        server.close()
        if provider is not None:
            provider.shutdown()
        log.info("gateway stopped")
