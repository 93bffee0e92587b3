"""The contract as a document: schemas/asyncapi.yaml is valid AsyncAPI (checked by the AsyncAPI project's
own parser), names every JSON Schema and only those, says who receives what as the stages do, and every
example in it is a message the schemas accept. Those examples are today's messages: they must stay
valid as later versions add fields (additive changes within a major schema_version)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from reportflow import consumers, schemas
from tests.helpers import ROOT

DOCUMENT = ROOT / "schemas" / "asyncapi.yaml"
PARSER = ROOT / "tests" / "asyncapi"


@pytest.fixture(scope="module")
def parsed() -> dict:
    if not (PARSER / "node_modules" / "@asyncapi" / "parser").is_dir() or not shutil.which("node"):
        pytest.fail("the AsyncAPI parser is not installed: make test installs it (tests/asyncapi, npm ci)")
    run = subprocess.run(
        ["node", str(PARSER / "validate.mjs"), str(DOCUMENT)], capture_output=True, text=True, timeout=120, cwd=PARSER
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_the_asyncapi_document_is_valid_by_the_asyncapi_parser(parsed):
    errors = [d for d in parsed["diagnostics"] if d["severity"] == 0]
    assert errors == [] and parsed["document"] is not None


def test_every_schema_has_its_message_and_every_message_its_schema(parsed):
    document = yaml.safe_load(DOCUMENT.read_text())
    referenced = {
        m["payload"]["schema"]["$ref"].removeprefix("./").removesuffix(".json")
        for m in document["components"]["messages"].values()
    }
    assert referenced == set(schemas.event_types())
    assert set(parsed["document"]["messages"]) == set(schemas.event_types())
    assert set(parsed["document"]["channels"]) == set(schemas.event_types())


def test_who_receives_what_is_what_the_stages_bind(parsed):
    received = {
        (o["id"].split("Receives")[0], o["channel"])
        for o in parsed["document"]["operations"]
        if o["action"] == "receive"
    }
    bound = {(stage, event_type) for stage, types in consumers.bindings().items() for event_type in types}
    assert received == bound


def test_todays_messages_stay_valid():
    document = yaml.safe_load(DOCUMENT.read_text())
    for message in document["components"]["messages"].values():
        for example in message["examples"]:
            assert schemas.errors(message["name"], example["payload"]) == [], message["name"]
            assert example["headers"]["schema_version"] == schemas.SCHEMA_VERSION
