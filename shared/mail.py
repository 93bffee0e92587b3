"""Outgoing email: built with the standard library, sent over SMTP or, with no SMTP configured, kept as .eml files."""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from opentelemetry import trace
from prometheus_client import Counter

from reportflow import schemas

if TYPE_CHECKING:
    from reportflow.shared.links import ApprovalLinks

_tracer = trace.get_tracer("reportflow.mail")
EMAILS = Counter(
    "reportflow_emails",
    "Emails handed to the mail server (or written), by outcome (sent, failed)",
    ["transport", "outcome"],
)
# Line breaks of every kind (\v, \f, \x1c-\x1e, \x85, \u2028, \u2029 too) and other control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


class InvalidAddress(ValueError):
    pass


def check_address(address: object) -> str:
    """The contract's address rule (schemas' $defs/email), here for the addresses an email is sent to:
    creation refuses a request with any other, so nothing accepted fails here later."""
    if not isinstance(address, str) or len(address) > 254 or not schemas.email_pattern().search(address):
        raise InvalidAddress(f"not an email address: {address!r}")
    return address


def one_line(text: str) -> str:
    """User text for a subject, a header or a line of its own: control characters and line breaks of
    every kind become a space, so it cannot start a header or a paragraph."""
    return " ".join(_CONTROL.sub(" ", text).split())


def quoted(text: str) -> str:
    """User text set apart in an email's body, each line behind "> ", so it cannot pass for ours."""
    lines = _CONTROL.sub("\n", text.replace("\r\n", "\n").replace("\t", " ")).split("\n")
    return "\n".join(f"> {line}".rstrip() for line in lines)


def build_email(
    *,
    sender: str,
    to: list[str],
    subject: str,
    text: str,
    message_id: str,
    attachments: Sequence[tuple[str, bytes, str]] = (),
) -> EmailMessage:
    """One email; attachments are (filename, content, mime type)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(check_address(a) for a in to)
    message["Subject"] = one_line(subject)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = message_id
    message.set_content(text)
    for filename, content, mime_type in attachments:
        maintype, subtype = mime_type.split("/", 1)
        message.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return message


def stable_message_id(key: str, domain: str = "reportflow.local") -> str:
    """The same notification always gets the same Message-ID, so a resend is recognisable as one."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", key)
    return f"<{safe}@{domain}>"


class Mailer(Protocol):
    transport: str  # what the metrics and the notification record call it: smtp, file

    def send(self, email: EmailMessage) -> None: ...


@dataclass(frozen=True)
class Postman:
    """How notification sends: a mailer (SMTP or folder), the From address, and the signer of approval
    links (None where no gateway is configured)."""

    mailer: Mailer
    sender: str
    links: ApprovalLinks | None = None

    def send(self, email: EmailMessage) -> None:
        try:
            self.mailer.send(email)
        except Exception:
            EMAILS.labels(self.mailer.transport, "failed").inc()
            raise
        EMAILS.labels(self.mailer.transport, "sent").inc()


class SmtpMailer:
    """smtp://host:port (STARTTLS when ?starttls=true), smtps://host:port (TLS from the start);
    user:password in the URL logs in."""

    transport = "smtp"

    def __init__(self, url: str, timeout: float = 30):
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError(f"REPORTFLOW_SMTP_URL must be smtp:// or smtps://, not {parts.scheme}://")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (465 if parts.scheme == "smtps" else 25)
        self.implicit_tls = parts.scheme == "smtps"
        self.starttls = parse_qs(parts.query).get("starttls", ["false"])[0].lower() in ("1", "true", "yes")
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout

    def send(self, message: EmailMessage) -> None:
        with _tracer.start_as_current_span("smtp send", kind=trace.SpanKind.CLIENT) as span:
            recipients = [a.strip() for a in message["To"].split(",")]
            span.set_attribute("server.address", self.host)
            span.set_attribute("server.port", self.port)
            span.set_attribute("email.recipients.count", len(recipients))
            context = ssl.create_default_context()
            client: smtplib.SMTP
            if self.implicit_tls:
                client = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
            else:
                client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            with client:
                if self.starttls:
                    client.starttls(context=context)
                if self.username:
                    client.login(self.username, self.password or "")
                client.send_message(message)


class FolderMailer:
    """With no SMTP server configured, emails are written as .eml files where a person can open them."""

    transport = "file"

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def send(self, message: EmailMessage) -> None:
        with _tracer.start_as_current_span("email write"):
            self.folder.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9._-]", "_", message["Message-ID"].strip("<>")) + ".eml"
            (self.folder / name).write_bytes(bytes(message))


def mailer_from_settings(smtp_url: str, storage_dir: Path):
    return SmtpMailer(smtp_url) if smtp_url else FolderMailer(Path(storage_dir) / "mail")
