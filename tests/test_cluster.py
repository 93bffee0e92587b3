"""reportflow on a real three-node RabbitMQ cluster (infra/rabbitmq-cluster.sh: three nodes of Debian's
rabbitmq-server on loopback), with quorum queues, PostgreSQL and S3 documents: nodes stopped mid-run,
nothing lost, nothing twice, and two generation processes sharing the work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from reportflow.producers.bulk import BulkPublisher
from reportflow.shared import failures
from reportflow.shared.broker import blocking_connection
from reportflow.shared.broker_api import BrokerApi
from reportflow.shared.events import Event
from tests.helpers import ROOT, free_port, wait_until
from tests.helpers import dead_letters as helpers_dead_letters
from tests.outcomes import check_everything_arrived_once, small_request, statuses
from tests.pipeline import STAGES, AutoApprover, Pipeline

pytestmark = pytest.mark.cluster
SCRIPT = ROOT / "infra" / "rabbitmq-cluster.sh"
VHOST = "reportflow-cluster-test"
API = "http://guest:guest@127.0.0.1:15681"  # rf-a's management API


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's own temporary folder: the nodes run as the rabbitmq user, who cannot enter it.
    folder = Path(tempfile.mkdtemp(prefix="reportflow-cluster-"))
    env = {"REPORTFLOW_CLUSTER_VHOST": VHOST, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    up = subprocess.run([str(SCRIPT), "up", str(folder)], capture_output=True, text=True, timeout=300, env=env)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield up.stdout.strip().splitlines()[-1]  # the three AMQP URLs
    finally:
        subprocess.run([str(SCRIPT), "down", str(folder)], capture_output=True, timeout=180, env=env)


def node_ctl(node: str, *args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "-n", node, *args], check=True, capture_output=True, timeout=120)


def leader(api: BrokerApi, queue: str) -> str:
    return api.queue_leaders(VHOST)[queue]


def renders(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(m) for m in re.findall(r'^reportflow_renders_total\{outcome="ok"\} (\S+)$', text, re.M))


def reconnect_seconds(log: str, stops: list[float]) -> list[float]:
    """For each reconnection a process logged after a node stopped: seconds since the latest stop."""
    found = []
    for stamp in re.findall(r"^(\S+ \S+) INFO reportflow.consumer .* connected to ", log, re.M):
        moment = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        before = [stop for stop in stops if stop < moment]
        if before:
            found.append(moment - max(before))
    return found


def test_fifty_reports_survive_nodes_stopping_under_them(
    cluster, tmp_path, exchange, postgres_url, smtp, s3, record_property
):
    api = BrokerApi(API)
    bucket = s3.bucket("reportflow-cluster")
    names = (*STAGES, "generation@2")
    metrics = {name: free_port() for name in ("generation", "generation@2")}
    pipeline = Pipeline(
        tmp_path,
        {
            "REPORTFLOW_AMQP_URL": cluster,
            "REPORTFLOW_QUEUE_TYPE": "quorum",
            "REPORTFLOW_EXCHANGE": exchange,
            "REPORTFLOW_DATABASE_URL": postgres_url,
            "REPORTFLOW_STORAGE_URL": f"s3://{bucket}/cluster",
            "REPORTFLOW_STORAGE_DIR": str(tmp_path / "scratch"),
            "REPORTFLOW_SMTP_URL": smtp.url,
            "REPORTFLOW_OUTBOX_RELAY_SECONDS": "2",
            "REPORTFLOW_HEARTBEAT_SECONDS": "5",
            "TRACING_ENABLED": "false",
            "REPORTFLOW_METRICS_BIND": "127.0.0.1",
            **s3.env,
        },
        names=names,
        per_process={name: {"REPORTFLOW_METRICS_PORT": str(port)} for name, port in metrics.items()},
    )
    approver = AutoApprover(exchange, amqp_url=cluster, queue_type="quorum")
    report_ids = [f"cl-{n:02d}" for n in range(50)]
    try:
        pipeline.start()
        wait_until(
            lambda: all(q.get("consumers") for q in _work_queues(api, exchange)) or pipeline.exited(),
            90,
            what="every stage consuming on the cluster",
        )
        assert not pipeline.exited(), pipeline.logs()
        approver.start()
        assert (
            BulkPublisher(cluster, exchange).publish(Event("report.requested", small_request(r)) for r in report_ids).ok
        )
        wait_until(lambda: statuses(postgres_url)["finalized"] >= 3, 180, what="the run under way")

        first = leader(api, f"{exchange}.generation")  # the node leading generation's queue goes away
        stops = [time.time()]
        node_ctl(first, "stop_app")
        time.sleep(20)
        node_ctl(first, "start_app")
        node_ctl(first, "await_startup")
        second = next(
            n["name"]
            for n in api.nodes()
            if n["running"] and n["name"] != first and n["name"] != leader(api, f"{exchange}.generation")
        )  # then another, not the leader
        stops.append(time.time())
        node_ctl(second, "stop_app")
        shown = subprocess.run(
            [str(Path(sys.executable).parent / "reportflow"), "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "REPORTFLOW_AMQP_URL": cluster,
                "REPORTFLOW_EXCHANGE": exchange,
                "REPORTFLOW_BROKER_API_URL": API,
            },
        )
        try:
            wait_until(
                lambda: statuses(postgres_url)["finalized"] == len(report_ids), 400, what="fifty finalized reports"
            )
            wait_until(
                lambda: len({m["message"]["Message-ID"] for m in smtp.messages}) >= 4 * len(report_ids),
                60,
                what="every email",
            )
        finally:
            node_ctl(second, "start_app")
        outcome = check_everything_arrived_once(postgres_url, report_ids, smtp, notification_kills=0)
        per_process = {name: renders(port) for name, port in metrics.items()}
        dead_letters = next(q.get("messages", 0) for q in _queues(api) if q["name"] == f"{exchange}.dead-letter")
        if dead_letters:  # say what they were, for whoever reads the failure
            broker = blocking_connection(cluster)
            dead = [
                {
                    k: v
                    for k, v in (headers or {}).items()
                    if k in (failures.STAGE, failures.ROUTING_KEY, failures.ERROR)
                }
                for headers, _body in helpers_dead_letters(broker, exchange)
            ]
            broker.close()
            print("dead letters:", dead)
        back = [s for name in names for s in reconnect_seconds(pipeline.log(name), stops)]
    finally:
        if approver.is_alive():
            approver.stop()
        pipeline.close()
    # Both generation processes rendered, and no report twice: a draft and a final version each.
    assert all(count > 0 for count in per_process.values()) and sum(per_process.values()) == 2 * len(report_ids), (
        per_process
    )
    assert dead_letters == 0, dead
    objects = s3.client().list_objects_v2(Bucket=bucket)["KeyCount"]
    assert objects == 2 * len(report_ids)
    assert back and max(back) < 10, back  # every consumer on the stopped node was back on another within 10 s
    # reportflow status names the nodes, the one down, and the node leading each work queue.
    assert f"{second} (down)" in shown.stdout, shown.stdout + shown.stderr
    assert re.search(rf"{exchange}\.generation\s+\d+\s+\d+\s+rf-[abc]@localhost", shown.stdout), shown.stdout
    figures = {
        "renders per generation process": per_process,
        "reconnect seconds": [round(b, 2) for b in back],
        **outcome,
    }
    record_property("cluster", figures)
    print(f"cluster run: {figures}")


def _queues(api: BrokerApi) -> list[dict]:
    return api._get(f"/api/queues/{VHOST}?columns=name,consumers,messages,leader")


def _work_queues(api: BrokerApi, exchange: str) -> list[dict]:
    wanted = {f"{exchange}.{stage}" for stage in STAGES}
    found = [q for q in _queues(api) if q["name"] in wanted]
    return found if len(found) == len(wanted) else [{"consumers": 0}]
