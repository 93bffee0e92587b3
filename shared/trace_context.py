"""Trace context carried in message headers, read and written with the OpenTelemetry API alone: what a
publisher needs, so that the client's install does not bring the SDK. Which formats are read and written
is the propagator's business, installed by tracing.setup_tracing in the processes that trace."""

from __future__ import annotations

from opentelemetry import context, propagate, trace


def carrier_of_current() -> dict:
    """The current trace context as W3C headers, to store or send."""
    carrier: dict = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: dict | None) -> context.Context:
    """The trace context in message headers. AMQP header tables are case-sensitive, but trace headers
    come as HTTP taught their senders (X-B3-TraceId, Traceparent): they are read in any case."""
    headers = {}
    for key, value in (carrier or {}).items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(key, str) and isinstance(value, str):
            headers[key.lower()] = value
    return propagate.extract(headers)


def unsampled_remote(parent: context.Context) -> bool:
    """Whether a context is that of an upstream span whose trace is not sampled."""
    span_context = trace.get_current_span(parent).get_span_context()
    return span_context.is_valid and span_context.is_remote and not span_context.trace_flags.sampled
