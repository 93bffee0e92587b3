"""Finished spans as an OTLP ExportTraceServiceRequest, written straight to protobuf's wire format.

The SDK's encoder builds a protobuf object for every attribute, key and value, and hashes each span's
resource (as JSON) to group spans by it: about 55 µs a span of sixteen attributes, twice what making the
span costs. This writes the same message as bytes, keeping those of attributes that repeat. The OTLP proto
(opentelemetry/proto/trace/v1/trace.proto, common.proto) gives the field numbers below; what it says,
the SDK's encoder says too, and tests/test_otlp_wire.py holds the two to the same message.

http_exporter() is the SDK's OTLP/HTTP exporter with this encoder, sending by urllib3 where the
environment asks for nothing that only requests does."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points

from opentelemetry.trace import SpanKind

_log = logging.getLogger(__name__)
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_KIND = {  # the SDK's SpanKind to OTLP's Span.SpanKind (which keeps 0 for UNSPECIFIED)
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags: whether the parent's remoteness is known, and is
_KEYS_KEPT = 4096  # attribute names are code's, so few; the bound is for a program that makes them up
_VALUES_KEPT = 16  # an attribute with more values than this (an id) is encoded each time
# Values that are kept: not floats, since 0.0 and -0.0 are one key; True and 1 are too, hence the class.
_KEYABLE = (str, int, bool)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


# Most fields are numbered below 16 and most strings are short: their tags and lengths are one byte, kept.
_LEN_TAGS = tuple(_tag(field, _LEN) for field in range(16))
_ONE_BYTE = tuple(bytes((n,)) for n in range(0x80))


def _field(field: int, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes or an embedded message."""
    size = len(payload)
    tag = _LEN_TAGS[field] if field < 16 else _tag(field, _LEN)
    return tag + (_ONE_BYTE[size] if size < 0x80 else _varint(size)) + payload


_SPAN = {name: _tag(number, wire) for name, number, wire in [  # tags of Span's fields
    ("trace_id", 1, _LEN), ("span_id", 2, _LEN), ("parent_span_id", 4, _LEN),
    ("kind", 6, _VARINT), ("start", 7, _I64), ("end", 8, _I64),
    ("dropped_attributes", 10, _VARINT), ("dropped_events", 12, _VARINT), ("dropped_links", 14, _VARINT),
    ("flags", 16, _I32),
]}  # fmt: skip
_TRACE_ID_16 = _SPAN["trace_id"] + b"\x10"
_SPAN_ID_8 = _SPAN["span_id"] + b"\x08"
_PARENT_ID_8 = _SPAN["parent_span_id"] + b"\x08"
_FIXED64, _FIXED32, _DOUBLE = struct.Struct("<Q"), struct.Struct("<I"), struct.Struct("<d")


def _value(value) -> bytes:
    """An AnyValue. Each member is in a oneof, so even "", 0 and False are written."""
    if isinstance(value, str):
        return _field(1, value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: a negative is ten bytes
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if value is None:
        return b""
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(6, b"".join(_field(1, _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"an attribute value of type {type(value).__name__}")


def _key_value(key: str, value) -> bytes:
    return _field(1, key.encode("utf-8", "replace")) + _field(2, _value(value))


class SpanEncoder:
    """Encodes batches of finished spans; keeps the bytes of attributes that repeat between batches."""

    def __init__(self):
        self._kept: dict[tuple[int, str], dict] = {}  # (field, key): {(value, class): the KeyValue field}

    def request(self, spans) -> bytes:
        """The ExportTraceServiceRequest of these spans, grouped by resource and then by scope."""
        grouped: dict[int, tuple] = {}
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope or None
            scopes = grouped.setdefault(id(resource), (resource, {}))[1]
            scopes.setdefault(id(scope), (scope, []))[1].append(self.span(span))
        return b"".join(_field(1, self._resource_spans(resource, scopes)) for resource, scopes in grouped.values())

    def span(self, span) -> bytes:
        context = span.get_span_context()
        parent = span.parent
        parts = [
            _TRACE_ID_16 + context.trace_id.to_bytes(16, "big"),
            _SPAN_ID_8 + context.span_id.to_bytes(8, "big"),
        ]
        if context.trace_state:
            parts.append(_field(3, ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
        if parent is not None:
            parts.append(_PARENT_ID_8 + parent.span_id.to_bytes(8, "big"))
        parts.append(_field(5, span.name.encode("utf-8", "replace")))
        parts.append(_SPAN["kind"] + _varint(_KIND[span.kind]))
        if span.start_time:
            parts.append(_SPAN["start"] + _FIXED64.pack(span.start_time))
        if span.end_time:
            parts.append(_SPAN["end"] + _FIXED64.pack(span.end_time))
        parts.append(self._attributes(9, span.attributes))
        if span.dropped_attributes:
            parts.append(_SPAN["dropped_attributes"] + _varint(span.dropped_attributes))
        for event in span.events:
            parts.append(_field(11, self._event(event)))
        if span.dropped_events:
            parts.append(_SPAN["dropped_events"] + _varint(span.dropped_events))
        for link in span.links:
            parts.append(_field(13, self._link(link)))
        if span.dropped_links:
            parts.append(_SPAN["dropped_links"] + _varint(span.dropped_links))
        if span.status is not None:
            parts.append(_field(15, _status(span.status)))
        parts.append(_SPAN["flags"] + _FIXED32.pack(_flags(parent)))
        return b"".join(parts)

    def _attributes(self, field: int, attributes) -> bytes:
        """Each attribute as field `field` of the enclosing message, a KeyValue. A key's KeyValues are kept
        for its first few values: most attributes (system, operation, destination, server) repeat."""
        if not attributes:
            return b""
        out = []
        # A span's attributes are a read-only view of the SDK's BoundedAttributes, whose items() calls back
        # into Python for each value; its copy() is a plain dict.
        for key, value in (attributes.copy() if hasattr(attributes, "copy") else attributes).items():
            kept = self._kept.get((field, key))
            if kept is None and len(self._kept) < _KEYS_KEPT:
                kept = self._kept[(field, key)] = {}
            keyable = value.__class__ in _KEYABLE
            encoded = kept.get((value, value.__class__)) if keyable and kept is not None else None
            if encoded is None:
                encoded = _field(field, _key_value(key, value))
                if keyable and kept is not None and len(kept) < _VALUES_KEPT:
                    kept[(value, value.__class__)] = encoded
            out.append(encoded)
        return b"".join(out)

    def _event(self, event) -> bytes:
        out = b"\x09" + _FIXED64.pack(event.timestamp) if event.timestamp else b""
        out += _field(2, event.name.encode("utf-8", "replace")) if event.name else b""
        out += self._attributes(3, event.attributes)
        return out + (b"\x20" + _varint(event.dropped_attributes) if event.dropped_attributes else b"")

    def _link(self, link) -> bytes:
        context = link.context
        out = b"\x0a\x10" + context.trace_id.to_bytes(16, "big") + b"\x12\x08" + context.span_id.to_bytes(8, "big")
        out += self._attributes(4, link.attributes)
        out += b"\x28" + _varint(link.dropped_attributes) if link.dropped_attributes else b""
        return out + b"\x35" + _FIXED32.pack(_flags(context))

    def _resource_spans(self, resource, scopes: dict) -> bytes:
        out = _field(1, self._attributes(1, resource.attributes))
        for scope, spans in scopes.values():
            out += _field(2, self._scope_spans(scope, spans))
        return out + (_field(3, resource.schema_url.encode()) if resource.schema_url else b"")

    def _scope_spans(self, scope, spans: list[bytes]) -> bytes:
        described = b""
        if scope is not None:
            described += _field(1, scope.name.encode()) if scope.name else b""
            described += _field(2, scope.version.encode()) if scope.version else b""
            described += self._attributes(3, scope.attributes)
        out = _field(1, described) + b"".join(_field(2, span) for span in spans)
        return out + (_field(3, scope.schema_url.encode()) if scope is not None and scope.schema_url else b"")


def _status(status) -> bytes:
    out = _field(2, status.description.encode("utf-8", "replace")) if status.description else b""
    return out + (b"\x18" + _varint(status.status_code.value) if status.status_code.value else b"")


def _flags(parent) -> int:
    return _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE


# What only the exporter's default transport, requests, acts on: a proxy named in the environment, or a
# session from a credential provider. With any of these set, requests is kept.
_REQUESTS_ONLY_VARIABLES = (
    *("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"),
    *(
        "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
        "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
    ),
)


def _urllib3_transport(options: dict):
    """The SDK's own urllib3 transport (its transport package's, found by its entry point), with the TLS
    settings the exporter would give requests; None to keep requests. The CA bundle is the OTLP
    certificate setting, else the one requests would read from the environment, else requests' own
    (certifi). A request of 64 spans costs urllib3 about 180 µs of CPU, requests about 490
    (docs/performance.md)."""
    if {"session", "_transport"} & options.keys() or any(os.environ.get(v) for v in _REQUESTS_ONLY_VARIABLES):
        return None
    import certifi
    from opentelemetry.sdk import environment_variables as variables

    def setting(option: str, name: str) -> str | None:
        return (
            options.get(option)
            or os.environ.get(getattr(variables, f"OTEL_EXPORTER_OTLP_TRACES_{name}"))
            or os.environ.get(getattr(variables, f"OTEL_EXPORTER_OTLP_{name}"))
        )

    certificate = setting("client_certificate_file", "CLIENT_CERTIFICATE")
    key = setting("client_key_file", "CLIENT_KEY")
    (transport,) = entry_points(group="opentelemetry_http_transport", name="urllib3")
    return transport.load()(
        verify=setting("certificate_file", "CERTIFICATE")
        or os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or certifi.where(),
        cert=(certificate, key) if certificate and key else certificate,
    )


def http_exporter(endpoint: str | None, **options):
    """The SDK's OTLP/HTTP exporter (endpoint, headers, TLS, compression, retries, all its OTEL_* variables)
    with its spans encoded by SpanEncoder and sent by urllib3 where requests is not needed. export() is the
    SDK's step for step but for the encoder; the SDK is pinned, and the end-to-end tests read what it sends."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    transport = _urllib3_transport(options)
    if transport is not None:
        options["_transport"] = transport

    class CompactOTLPSpanExporter(OTLPSpanExporter):
        def __init__(self, **options):
            super().__init__(**options)
            self._encoder = SpanEncoder()

        def export(self, spans) -> SpanExportResult:
            if self._shutdown:
                return SpanExportResult.FAILURE
            with self._metrics.export_operation(len(spans)) as result:
                try:
                    body = self._encoder.request(spans)
                except Exception as error:  # a span it cannot encode fails its batch, not the process
                    _log.error("could not encode a batch of %d spans: %s", len(spans), error)
                    result.error = error
                    return SpanExportResult.FAILURE
                if 0 < self._max_request_size < len(body):  # as the SDK's: a collector would refuse it
                    _log.warning("dropped a batch of %d spans: %d bytes, above max_request_size", len(spans), len(body))
                    result.error = ValueError("request too large")
                    return SpanExportResult.FAILURE
                sent = self._client.export(body)
                if not sent.success:
                    result.error = sent.error
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return CompactOTLPSpanExporter(endpoint=endpoint, **options)
