"""The event contract: one JSON Schema per event type, loaded once, used on the way in and out."""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from pathlib import Path

import fastjsonschema
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = "1"
# What upstream systems publish; reportflow publishes every other event type (schemas/asyncapi.yaml).
UPSTREAM_EVENT_TYPES = (
    "report.requested",
    "approval.decided",
    "approval.delegated",
    "report.withdrawn",
    "report.resubmitted",
)
MAX_REASONS = 100  # a huge invalid message would otherwise make an invalid-report event as huge


# JSON Schema patterns are ECMA-262 regular expressions, where `$` is the end of the input. In Python's
# re, `$` also matches before a final newline, so "bob@example.com\n" would pass "^...$". Both checks
# read `$` as the end of the input (\Z), as fastjsonschema already does.
_DOLLAR = re.compile(r"(?<!\\)\$")


@cache
def ecma_pattern(pattern: str) -> re.Pattern:
    return re.compile(_DOLLAR.sub(r"\\Z", pattern))


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not ecma_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


@lru_cache(maxsize=1)
def event_types() -> frozenset[str]:
    """Read once: every message asks."""
    return frozenset(p.name.removesuffix(".json") for p in SCHEMA_DIR.glob("*.json"))


@cache
def validator(event_type: str) -> Draft202012Validator:
    return _Validator(schema(event_type), format_checker=FormatChecker())


@cache
def schema(event_type: str) -> dict:
    path = SCHEMA_DIR / f"{event_type}.json"
    if not path.is_file():
        raise KeyError(f"no schema for event type {event_type!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def email_pattern() -> re.Pattern:
    """The contract's one rule for an email address, which every schema states the same way."""
    return ecma_pattern(schema("report.requested")["$defs"]["email"]["pattern"])


# The schemas use formats jsonschema checks like this; the compiled check must agree with it exactly.
_FORMATS = {"email": lambda value: "@" in value}


@cache
def _compiled_check(event_type: str):
    """The schema compiled to Python: thirty times faster than jsonschema, but it stops at the first
    problem. Every message in and out is checked, so a valid one (nearly all) takes only this."""
    return fastjsonschema.compile(validator(event_type).schema, formats=_FORMATS)


def errors(event_type: str, payload: object) -> list[str]:
    """Every way payload breaks the schema of event_type, as short readable reasons."""
    try:
        _compiled_check(event_type)(payload)
        return []
    except fastjsonschema.JsonSchemaException:
        pass  # jsonschema, the reference, decides and names every reason
    found = sorted(validator(event_type).iter_errors(payload), key=lambda e: list(e.absolute_path))
    reasons = [_describe(e) for e in found[:MAX_REASONS]]
    if len(found) > MAX_REASONS:
        reasons.append(f"(message): and {len(found) - MAX_REASONS} more problems")
    # The two checks are held to the same verdict by a test; should they ever differ, refuse.
    return reasons or ["(message): does not match the schema"]


def _describe(error) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(message)"
    message = error.message
    if len(message) > 300:
        message = message[:300] + "…"
    return f"{where}: {message}"
