"""The upstream's install: the wheel as PyPI would serve it, installed bare into a fresh virtual environment,
publishes a request to the real broker, and brings neither the renderer, the database layer nor the
gateway. Installed, the project is `reportflow` and nothing else at the top of site-packages."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile

import pytest

from tests.helpers import ROOT, TEST_AMQP_URL, sample_request

# What only the extras bring: none of it may be importable after `pip install reportflow`.
ONLY_IN_EXTRAS = (
    "weasyprint",
    "sqlalchemy",
    "flask",
    "alembic",
    "psycopg",
    "jinja2",
    "honcho",
    "boto3",
    "opentelemetry.sdk",
)

PUBLISH_WITH_THE_CLIENT = """
import importlib.util, json, sys
from reportflow.producers import ReportflowClient
absent = [name for name in sys.argv[3].split(",") if importlib.util.find_spec(name) is None]
with ReportflowClient(amqp_url=sys.argv[1], exchange=sys.argv[2]) as client:
    published = client.request_report(json.load(sys.stdin))
print(json.dumps({"report_id": published.report_id, "absent": absent}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    (built,) = out.glob("reportflow-*.whl")
    return built


@pytest.fixture(scope="module")
def bare_install(wheel, tmp_path_factory):
    """A fresh virtual environment with `pip install reportflow` and nothing else."""
    env_dir = tmp_path_factory.mktemp("upstream-venv")
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return env_dir


def test_the_wheel_puts_only_reportflow_at_the_top_of_site_packages(wheel):
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert {top for top in tops if not top.endswith(".dist-info")} == {"reportflow"}
    # The data a bare install needs travels with it: the contract and the example request.
    assert "reportflow/schemas/report.requested.json" in names
    assert "reportflow/schemas/asyncapi.yaml" in names
    assert "reportflow/producers/examples/q3-revenue.json" in names


def test_the_bare_install_publishes_with_the_client_and_brings_no_pipeline(bare_install, broker, exchange, tap):
    python = bare_install / "bin" / "python"
    run = subprocess.run(
        [str(python), "-c", PUBLISH_WITH_THE_CLIENT, TEST_AMQP_URL, exchange, ",".join(ONLY_IN_EXTRAS)],
        input=json.dumps(sample_request()),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert run.returncode == 0, run.stderr
    published = json.loads(run.stdout)
    assert sorted(published["absent"]) == sorted(ONLY_IN_EXTRAS)
    ((routing_key, payload, properties),) = tap.wait_for("report.requested")
    assert payload["report_id"] == published["report_id"]
    assert properties.content_type == "application/json" and properties.delivery_mode == 2


def test_the_bare_install_has_the_command_and_names_the_extra_a_command_needs(bare_install):
    reportflow = bare_install / "bin" / "reportflow"
    version = subprocess.run([str(reportflow), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("reportflow, version "), version.stderr
    help_text = subprocess.run([str(reportflow), "publish", "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "request" in help_text.stdout, help_text.stderr
    consume = subprocess.run([str(reportflow), "consume", "generation"], capture_output=True, text=True, timeout=60)
    assert consume.returncode != 0
    assert "pip install 'reportflow[pipeline]'" in consume.stderr and "Traceback" not in consume.stderr
