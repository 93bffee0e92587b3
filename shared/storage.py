"""Where documents are kept, chosen by REPORTFLOW_STORAGE_URL: a folder (file:///path, the default for one
machine) or any S3-compatible object store (s3://bucket/prefix: AWS, MinIO, ...). Stages, the gateway and
the CLI find a document by its key, from the database, and read and write it only through the adapter:
nothing assumes that two processes share a disk.

S3 is reached with boto3 (AWS's own client, kept in step with the API), configured the standard way:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for MinIO and friends."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from opentelemetry import trace

_tracer = trace.get_tracer("reportflow.storage")


class DocumentCorrupt(ValueError):
    """A document read back is not the one that was stored: its SHA-256 differs from the recorded one."""


class Storage(Protocol):
    def put(self, key: str, content: bytes) -> None: ...
    def get(self, key: str, sha256: str | None = None) -> bytes: ...
    def location(self, key: str) -> str: ...


class _Checked:
    """What every adapter does around its own reads and writes: a span, and the SHA-256 check. An adapter
    gives _put and _get."""

    def _put(self, key: str, content: bytes) -> None:
        raise NotImplementedError

    def _get(self, key: str) -> bytes:
        raise NotImplementedError

    def put(self, key: str, content: bytes) -> None:
        _check_key(key)
        with _tracer.start_as_current_span("store document", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("document.storage_key", key)
            span.set_attribute("document.size_bytes", len(content))
            self._put(key, content)

    def get(self, key: str, sha256: str | None = None) -> bytes:
        """The document; with sha256, it is checked to be the one stored (DocumentCorrupt if not)."""
        _check_key(key)
        with _tracer.start_as_current_span("read document", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("document.storage_key", key)
            content = self._get(key)
            if sha256 is not None and hashlib.sha256(content).hexdigest() != sha256:
                raise DocumentCorrupt(f"document {key!r} does not match its recorded SHA-256")
            return content


class FolderStorage(_Checked):
    """Documents in a folder of this machine. Writes go to a temporary file renamed into place, so a
    reader never sees half a PDF and a crash leaves no torn file."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _put(self, key: str, content: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        os.replace(tmp, path)

    def _get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def location(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key {key!r} leaves the storage folder")
        return path


class S3Storage(_Checked):
    """Documents as objects in a bucket, under a prefix. A PUT is atomic in S3: an object is seen whole or
    not at all."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client = client or boto3.client("s3")

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _put(self, key: str, content: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=content, ContentType="application/pdf")

    def _get(self, key: str) -> bytes:
        return self._client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object(key)}"


def storage_from_url(url: str) -> Storage:
    """file:///path (or a bare path) -> FolderStorage; s3://bucket[/prefix] -> S3Storage."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"REPORTFLOW_STORAGE_URL {url!r} names no bucket (s3://BUCKET/PREFIX)")
        return S3Storage(parts.netloc, unquote(parts.path))
    if parts.scheme in ("file", ""):
        return FolderStorage(Path(unquote(parts.path) if parts.scheme == "file" else url))
    raise ValueError(f"REPORTFLOW_STORAGE_URL must be file:///path or s3://bucket/prefix, not {url!r}")


def _check_key(key: str) -> None:
    if not key or key.startswith("/") or ".." in key.split("/") or any(ord(c) < 32 for c in key):
        raise ValueError(f"not a storage key: {key!r}")
