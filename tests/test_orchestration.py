"""What an orchestrator sees of a process (/livez, /readyz, /metrics), and a consumer that fails over to
another broker address when its node goes away. The lost node is a proxy the test cuts, in front of the
machine's broker; the three-node cluster is tested on its own."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from reportflow.producers import ReportflowClient
from tests.helpers import TEST_AMQP_URL, free_port, sample_request, wait_until
from tests.pipeline import Pipeline
from tests.proxy import TcpProxy

pytestmark = pytest.mark.e2e
BROKER_PORT = urlsplit(TEST_AMQP_URL).port or 5672


def through(proxy: TcpProxy) -> str:
    return TEST_AMQP_URL.replace(f":{BROKER_PORT}/", f":{proxy.port}/")


def probe(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        found = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if found and ",".join(sorted(found.group(1).split(","))) == wanted:
            return float(found.group(2))
    return 0.0


@pytest.fixture
def proxies():
    made = []

    def make() -> TcpProxy:
        made.append(TcpProxy(BROKER_PORT))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def test_a_consumer_tells_its_health_and_counts_what_it_handled(tmp_path, exchange, broker, sqlite_url, tap, proxies):
    node = proxies()
    port = free_port()
    pipeline = Pipeline(
        tmp_path,
        {
            "REPORTFLOW_AMQP_URL": through(node),
            "REPORTFLOW_EXCHANGE": exchange,
            "REPORTFLOW_DATABASE_URL": sqlite_url,
            "REPORTFLOW_METRICS_PORT": str(port),
            "REPORTFLOW_METRICS_BIND": "127.0.0.1",
            "TRACING_ENABLED": "false",
        },
        names=("creation",),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        pipeline.start()
        wait_until(lambda: probe(f"{base}/readyz")[0] == 200 or pipeline.exited(), 60, what="creation ready")
        assert probe(f"{base}/livez")[0] == 200
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            for n in range(5):
                client.request_report(sample_request(report_id=f"r-metrics-{n}"))
            client.request_report(sample_request(report_id="r-metrics-0"))  # a second request for it: refused
        tap.wait_for("report.created", 5)
        tap.wait_for("report.invalid", 1)

        def counted():
            text = probe(f"{base}/metrics")[1]
            return (
                text
                if metric(
                    text,
                    "reportflow_messages_total",
                    stage="creation",
                    event_type="report.requested",
                    outcome="handled",
                )
                == 6
                else None
            )

        text = wait_until(counted, 20, what="six handled messages counted")
        assert metric(text, "reportflow_handling_seconds_count", stage="creation", event_type="report.requested") == 6
        assert (
            metric(text, "reportflow_time_in_queue_seconds_count", stage="creation", event_type="report.requested") == 6
        )
        assert metric(text, "reportflow_messages_in_flight", stage="creation") == 0

        node.cut()  # its only broker node goes away: alive, but not ready
        wait_until(lambda: probe(f"{base}/readyz")[0] == 503, 30, what="/readyz to turn unready")
        status, why = probe(f"{base}/readyz")
        assert "broker" in why and probe(f"{base}/livez")[0] == 200
        node.restore()
        wait_until(lambda: probe(f"{base}/readyz")[0] == 200, 60, what="/readyz ready again")
    finally:
        pipeline.close()


def test_a_consumer_fails_over_to_the_next_broker_address_and_back_to_work(
    tmp_path, exchange, broker, sqlite_url, tap, proxies
):
    first, second = proxies(), proxies()
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/{urlsplit(TEST_AMQP_URL).path.lstrip('/')}"
    nodes = ",".join([dead, through(first), through(second)])  # the first address never answers
    pipeline = Pipeline(
        tmp_path,
        {
            "REPORTFLOW_AMQP_URL": nodes,
            "REPORTFLOW_EXCHANGE": exchange,
            "REPORTFLOW_DATABASE_URL": sqlite_url,
            "TRACING_ENABLED": "false",
            # A node can vanish without closing its connections (a partition, a frozen host): then only the
            # heartbeat tells. Now and then the proxy's cut reaches the consumer that way, seen only at the
            # next heartbeat (15 s at the default 30); a deployment that wants fast failover sets it low too.
            "REPORTFLOW_HEARTBEAT_SECONDS": "4",
        },
        names=("creation",),
    )
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange, stages=("creation",))
        with ReportflowClient(nodes, exchange) as client:  # the client skips the dead address too
            client.request_report(sample_request(report_id="r-before-failover"))
        tap.wait_for("report.created")
        first.cut()  # the node it is on goes away; the message below waits in the queue for it
        cut_at = time.monotonic()
        with ReportflowClient(nodes, exchange) as client:
            client.request_report(sample_request(report_id="r-after-failover"))
        tap.wait_for("report.created", 2)
        assert time.monotonic() - cut_at < 10, "back at work on another node within 10 s"
        assert f"connected to 127.0.0.1:{second.port}" in pipeline.logs()
    finally:
        pipeline.close()


def test_the_gateway_tells_its_health_too(tmp_path, exchange, postgres_url, proxies):
    node = proxies()
    port, metrics_port = free_port(), free_port()
    pipeline = Pipeline(
        tmp_path,
        {
            "REPORTFLOW_AMQP_URL": through(node),
            "REPORTFLOW_EXCHANGE": exchange,
            "REPORTFLOW_DATABASE_URL": postgres_url,
            "REPORTFLOW_ENV": "development",
            "REPORTFLOW_GATEWAY_PORT": str(port),
            "REPORTFLOW_METRICS_PORT": str(metrics_port),
            "REPORTFLOW_METRICS_BIND": "127.0.0.1",
            "REPORTFLOW_TRACE_DIR": str(tmp_path / "traces"),
        },
        names=("gateway",),
    )
    base = f"http://127.0.0.1:{metrics_port}"
    try:
        pipeline.start()
        wait_until(lambda: probe(f"{base}/readyz")[0] == 200 or pipeline.exited(), 30, what="the gateway ready")
        assert probe(f"{base}/livez")[0] == 200
        assert 'reportflow_spans_total{state="started"}' in probe(f"{base}/metrics")[1]  # its span pipeline
        node.close()  # no broker node answers any more
        wait_until(lambda: probe(f"{base}/readyz") == (503, "no broker node answers\n"), 20, what="unready")
    finally:
        pipeline.close()
