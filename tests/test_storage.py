"""Where documents are kept: a folder, or an S3 API (moto's server on loopback), behind one adapter."""

from __future__ import annotations

import hashlib

import pytest

from reportflow.shared.config import Settings
from reportflow.shared.storage import DocumentCorrupt, FolderStorage, S3Storage, storage_from_url


@pytest.fixture(params=["folder", "s3"])
def storage(request, tmp_path):
    if request.param == "folder":
        return FolderStorage(tmp_path / "documents")
    server = request.getfixturevalue("s3")
    return S3Storage(server.bucket("reports"), "tenant-a", client=server.client())


def test_a_document_goes_in_and_comes_back_whole_and_checked(storage):
    content = b"%PDF-1.7 " + bytes(range(256)) * 100
    storage.put("reports/r-1/draft.pdf", content)
    assert storage.get("reports/r-1/draft.pdf", sha256=hashlib.sha256(content).hexdigest()) == content
    storage.put("reports/r-1/draft.pdf", b"%PDF-1.7 tampered")
    with pytest.raises(DocumentCorrupt):
        storage.get("reports/r-1/draft.pdf", sha256=hashlib.sha256(content).hexdigest())


@pytest.mark.parametrize("key", ["../outside.pdf", "/etc/passwd", "reports/a/../../x", "reports/r\n/x.pdf", ""])
def test_keys_cannot_leave_their_place(storage, key):
    with pytest.raises(ValueError):
        storage.put(key, b"%PDF")


def test_the_adapter_is_chosen_by_url(tmp_path, s3):
    assert isinstance(Settings(storage_dir=tmp_path).document_storage(), FolderStorage)
    folder = storage_from_url(f"file://{tmp_path}/docs")
    assert isinstance(folder, FolderStorage) and folder.location("k.pdf") == f"{tmp_path}/docs/k.pdf"
    s3.bucket("reports")
    remote = Settings(storage_url="s3://reports/eu/prod").document_storage()  # AWS_* from the environment
    remote.put("reports/r-2/final.pdf", b"%PDF final")
    assert remote.location("reports/r-2/final.pdf") == "s3://reports/eu/prod/reports/r-2/final.pdf"
    assert s3.client().get_object(Bucket="reports", Key="eu/prod/reports/r-2/final.pdf")["Body"].read() == b"%PDF final"
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        storage_from_url("ftp://example/x")


@pytest.mark.e2e
def test_the_pipeline_shares_no_disk_documents_live_in_s3_only(tmp_path, exchange, broker, postgres_url, smtp, s3, tap):
    """Every process gets a folder of its own and the S3 API: reports finish, the emails carry the PDFs read
    back from S3, and no PDF is written to any local folder."""
    from tests.helpers import TEST_AMQP_URL, sample_request, wait_until
    from tests.pipeline import STAGES, AutoApprover, Pipeline

    bucket = s3.bucket("reportflow-documents")
    folders = {stage: tmp_path / f"{stage}-disk" for stage in STAGES}
    pipeline = Pipeline(
        tmp_path,
        {
            "REPORTFLOW_AMQP_URL": TEST_AMQP_URL,
            "REPORTFLOW_EXCHANGE": exchange,
            "REPORTFLOW_DATABASE_URL": postgres_url,
            "REPORTFLOW_STORAGE_URL": f"s3://{bucket}/prod",
            "REPORTFLOW_SMTP_URL": smtp.url,
            "TRACING_ENABLED": "false",
            **s3.env,
        },
        per_process={stage: {"REPORTFLOW_STORAGE_DIR": str(folder)} for stage, folder in folders.items()},
    )
    approver = AutoApprover(exchange)
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange)
        approver.start()
        from reportflow.producers import ReportflowClient

        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            for n in range(3):
                client.request_report(sample_request(report_id=f"r-s3-{n}"))
        tap.wait_for("report.finalized", 3, timeout=120)
        finals = wait_until(
            lambda: (
                [m for m in smtp.messages if m["message"]["Subject"].startswith("Report approved")]
                if len([m for m in smtp.messages if m["message"]["Subject"].startswith("Report approved")]) == 3
                else None
            ),
            60,
            what="three final emails",
        )
    finally:
        approver.stop()
        pipeline.close()
    stored = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert stored == {f"prod/reports/r-s3-{n}/{kind}.pdf" for n in range(3) for kind in ("draft", "final")}
    for email in finals:
        [attachment] = list(email["message"].iter_attachments())
        report_id = attachment.get_filename().removesuffix("-final.pdf")
        body = s3.client().get_object(Bucket=bucket, Key=f"prod/reports/{report_id}/final.pdf")["Body"].read()
        assert attachment.get_content() == body
    assert not [p for p in tmp_path.rglob("*.pdf")], "a PDF was written to a local folder"
