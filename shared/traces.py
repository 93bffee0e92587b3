"""A report's trace in the terminal: read as OTLP JSON from Jaeger's query API v3, or from the span
files a process writes when no collector is configured, and printed as an indented waterfall."""

from __future__ import annotations

import base64
import binascii
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpanRow:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    error: str | None
    links: int


def _hex(value: str | None) -> str | None:
    """OTLP/JSON ids are hex; some writers give base64. Either way, hex out."""
    if not value:
        return None
    try:
        int(value, 16)
        if len(value) in (16, 32):
            return value.lower()
    except ValueError:
        pass
    try:
        return base64.b64decode(value).hex()
    except (binascii.Error, ValueError):
        return value


def spans_from_otlp_json(document: dict) -> list[SpanRow]:
    """Spans from an OTLP JSON export request, or from an API v3 answer ({"result": {...}})."""
    document = document.get("result", document)
    rows = []
    for resource_spans in document.get("resourceSpans", []):
        attributes = resource_spans.get("resource", {}).get("attributes", [])
        service = next((a["value"].get("stringValue") for a in attributes if a.get("key") == "service.name"), "?")
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                status = span.get("status", {})
                failed = status.get("code") in (2, "STATUS_CODE_ERROR")
                rows.append(
                    SpanRow(
                        trace_id=_hex(span["traceId"]) or "?",
                        span_id=_hex(span["spanId"]) or "?",
                        parent_id=_hex(span.get("parentSpanId")),
                        name=span.get("name", "?"),
                        service=service,
                        start_ns=int(span.get("startTimeUnixNano", 0)),
                        end_ns=int(span.get("endTimeUnixNano", 0)),
                        error=(status.get("message") or "error") if failed else None,
                        links=len(span.get("links", [])),
                    )
                )
    return rows


def load_from_files(folder: Path, trace_id: str) -> list[SpanRow]:
    rows = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if trace_id in line:  # ids are hex in these files: skip what cannot match
                    rows += [r for r in spans_from_otlp_json(json.loads(line)) if r.trace_id == trace_id]
    return rows


def load_from_jaeger(query_url: str, trace_id: str, timeout: float = 10) -> list[SpanRow]:
    url = f"{query_url.rstrip('/')}/api/v3/traces/{trace_id}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return spans_from_otlp_json(json.loads(response.read()))


def waterfall(rows: list[SpanRow]) -> str:
    """Indented by parentage, in start order; offsets from the first span's start."""
    if not rows:
        return "no spans found for this trace"
    by_parent: dict[str | None, list[SpanRow]] = {}
    ids = {r.span_id for r in rows}
    for row in rows:
        by_parent.setdefault(row.parent_id if row.parent_id in ids else None, []).append(row)
    origin = min(r.start_ns for r in rows)
    end = max(r.end_ns for r in rows)
    width = max(len(r.service) for r in rows)
    lines = [
        f"trace {rows[0].trace_id}: {len(rows)} spans over {(end - origin) / 1e9:.3f} s",
        f"{'start':>10} {'duration':>10}  {'service':<{width}}  span",
    ]

    def walk(parent: str | None, depth: int) -> None:
        for row in sorted(by_parent.get(parent, []), key=lambda r: r.start_ns):
            flags = (f"  [error: {row.error}]" if row.error else "") + (f"  [{row.links} link(s)]" if row.links else "")
            lines.append(
                f"{(row.start_ns - origin) / 1e6:>8.1f}ms {(row.end_ns - row.start_ns) / 1e6:>8.1f}ms  "
                f"{row.service:<{width}}  {'  ' * depth}{row.name}{flags}"
            )
            walk(row.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)
