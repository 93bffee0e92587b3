"""Email over a real SMTP conversation (aiosmtpd on loopback), and addresses that are checked."""

from __future__ import annotations

import pytest

from reportflow.shared.mail import InvalidAddress, SmtpMailer, build_email, stable_message_id


def test_an_email_with_a_pdf_travels_over_smtp(smtp):
    email = build_email(
        sender="reportflow <rf@example.com>",
        to=["ann@example.com", "cfo@client.example"],
        subject="Report approved: Q3",
        text="Attached.",
        message_id=stable_message_id("abc.1"),
        attachments=[("r.pdf", b"%PDF-1.7", "application/pdf")],
    )
    SmtpMailer(smtp.url).send(email)
    [received] = smtp.to("cfo@client.example")
    assert received["Subject"] == "Report approved: Q3"
    assert received["Message-ID"] == "<abc.1@reportflow.local>"
    assert next(received.iter_attachments()).get_content() == b"%PDF-1.7"
    assert smtp.messages[0]["envelope_to"] == ["ann@example.com", "cfo@client.example"]


@pytest.mark.parametrize(
    "address", ["not-an-address", "a@b", "x@example.com\nBcc: evil@example.com", "<x@example.com>", "a b@example.com"]
)
def test_bad_addresses_are_refused_before_anything_is_sent(address):
    with pytest.raises(InvalidAddress):
        build_email(sender="rf@example.com", to=[address], subject="s", text="t", message_id="<m@x>")


def test_a_subject_cannot_carry_extra_headers():
    email = build_email(
        sender="rf@example.com",
        to=["a@example.com"],
        subject="Hi\r\nBcc: evil@example.com",
        text="t",
        message_id="<m@x>",
    )
    assert email["Bcc"] is None


def test_smtp_urls_are_read_for_tls_and_login():
    mailer = SmtpMailer("smtp://user%40corp:s3cret@mail.example.com:587?starttls=true")
    assert (mailer.host, mailer.port, mailer.starttls, mailer.implicit_tls) == ("mail.example.com", 587, True, False)
    assert (mailer.username, mailer.password) == ("user@corp", "s3cret")
    assert SmtpMailer("smtps://mail.example.com").port == 465
    with pytest.raises(ValueError):
        SmtpMailer("http://mail.example.com")


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_the_mailer_logs_in_when_the_url_has_credentials():
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    from tests.helpers import free_port

    logins, received = [], []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((mechanism, auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=auth_data.password == b"s3cret")

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope.rcpt_tos)
            return "250 OK"

    port = free_port()
    controller = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    try:
        email = build_email(
            sender="rf@example.com", to=["a@example.com"], subject="s", text="t", message_id="<login@x>"
        )
        SmtpMailer(f"smtp://reportflow:s3cret@127.0.0.1:{port}").send(email)
    finally:
        controller.stop()
    assert [login[1:] for login in logins] == [("reportflow", "s3cret")]
    assert received == [["a@example.com"]]
