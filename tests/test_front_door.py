"""The front door: `make demo` (infra/demo.sh) on its own starts the pipeline it needs, runs one report to
the approved PDF and its emails, and stops what it started; beside a pipeline that is consuming, it starts
nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TEST_AMQP_URL, free_port
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def demo_env(tmp_path: Path, exchange: str) -> dict:
    return {
        **os.environ,
        "REPORTFLOW_ENV": "development",
        "REPORTFLOW_AMQP_URL": TEST_AMQP_URL,
        "REPORTFLOW_EXCHANGE": exchange,
        "REPORTFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "REPORTFLOW_STORAGE_DIR": str(tmp_path / "storage"),
        "REPORTFLOW_GATEWAY_PORT": str(free_port()),
        "REPORTFLOW_DEMO_LOG": str(tmp_path / "demo-pipeline.log"),
        "TRACING_ENABLED": "false",
    }


def run_demo(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "infra" / "demo.sh"), str(BIN)], capture_output=True, text=True, env=env, timeout=240, check=False
    )


def test_make_demo_with_no_pipeline_starts_one_and_stops_it(tmp_path, broker, exchange):
    env = demo_env(tmp_path, exchange)
    run = run_demo(env)
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "demo-pipeline.log").read_text()
    assert "starting one for the demo" in run.stdout
    assert "status:   finalized" in run.stdout and "document final:" in run.stdout, run.stdout
    assert "stopped the pipeline the demo started" in run.stdout
    # Nothing it started still consumes: the stage queues have no consumer left.
    check = subprocess.run([str(BIN / "reportflow"), "status", "--consuming"], env=env, timeout=60, check=False)
    assert check.returncode == 1


def test_make_demo_beside_a_running_pipeline_uses_it(tmp_path, broker, exchange):
    env = demo_env(tmp_path, exchange)
    subprocess.run([str(BIN / "reportflow"), "db", "upgrade"], env=env, check=True, timeout=120)
    pipeline = Pipeline(tmp_path, {k: v for k, v in env.items() if k.startswith(("REPORTFLOW_", "TRACING_"))})
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange)
        run = run_demo(env)
        assert run.returncode == 0, run.stdout + run.stderr + pipeline.logs()
        assert "starting one" not in run.stdout and "status:   finalized" in run.stdout, run.stdout
        assert not pipeline.exited(), "the demo stopped a pipeline it did not start"
    finally:
        pipeline.stop()
