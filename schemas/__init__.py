"""The event contract: one JSON Schema per event type, loaded once, used on the way in and out."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import fastjsonschema
from jsonschema import Draft202012Validator, FormatChecker

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = "1"


@lru_cache(maxsize=1)
def event_types() -> frozenset[str]:
    """Read once: every message asks."""
    return frozenset(p.name.removesuffix(".json") for p in SCHEMA_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def validator(event_type: str) -> Draft202012Validator:
    path = SCHEMA_DIR / f"{event_type}.json"
    if not path.is_file():
        raise KeyError(f"no schema for event type {event_type!r}")
    schema = json.loads(path.read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=FormatChecker())


# The schemas use formats jsonschema checks like this; the compiled check must agree with it exactly.
_FORMATS = {"email": lambda value: "@" in value}


@lru_cache(maxsize=None)
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
    return [_describe(e) for e in found]


def _describe(error) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(message)"
    message = error.message
    if len(message) > 300:
        message = message[:300] + "…"
    return f"{where}: {message}"
