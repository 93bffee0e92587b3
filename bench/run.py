"""`make bench`: what the pipeline costs. These machines are shared and noisy, so every figure is a
ratio against a baseline measured in the same run, never an absolute time on its own.

    python -m bench.run [--quick]

Writes bench/results/<date>.json and latest.json (one object per figure: name, value, unit,
baseline, ratio, target, met), a Markdown table and a PNG chart beside them."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pika
from sqlalchemy import text

from bench.passthrough import first_event
from bench.proc import CpuMeter, rss_mb
from reportflow.consumers import STAGE_NAMES
from reportflow.producers.bulk import BulkPublisher
from reportflow.shared.config import Settings
from reportflow.shared.db import make_engine
from reportflow.shared.events import Event
from reportflow.shared.migrate import upgrade
from reportflow.shared.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/reportflow-test")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/reportflow_test")
PYTHON = sys.executable
BIN = Path(sys.executable).parent


# -- plumbing --------------------------------------------------------------------------------------------
class Figures(list):
    def add(self, name, value, unit, baseline, ratio=None, target=None, met=None, **extra):
        figure = {
            "name": name,
            "value": round(value, 3),
            "unit": unit,
            "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 3),
            "target": target,
            "met": met,
            **extra,
        }
        self.append(figure)
        print(
            f"  {name}: {figure['value']} {unit}"
            + (f"  (ratio {figure['ratio']} vs {baseline})" if ratio else "")
            + (f"  target {target}: {'met' if met else 'MISSED'}" if target else ""),
            flush=True,
        )
        return figure


class Sink:
    """Counts what arrives on a queue bound to one routing key, with the arrival time per report id."""

    def __init__(self, exchange: str, routing_key: str, exchange_type: str = "topic", parse=None):
        self.arrivals: dict[str, float] = {}
        self._parse = parse or (lambda body: json.loads(body)["report_id"])
        self._connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = self._connection.channel()
        self.queue = f"{exchange}.sink" if exchange else routing_key
        if exchange:
            channel.exchange_declare(exchange, exchange_type=exchange_type, durable=True)
            channel.queue_declare(self.queue)
            channel.queue_bind(self.queue, exchange, routing_key=routing_key)
        else:
            channel.queue_declare(self.queue, durable=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, args=(channel,), daemon=True)
        self._thread.start()

    def _consume(self, channel) -> None:
        channel.basic_consume(
            self.queue,
            lambda ch, m, p, body: self.arrivals.setdefault(self._parse(body), time.perf_counter()),
            auto_ack=True,
        )
        while not self._stop.is_set():
            self._connection.process_data_events(time_limit=0.05)

    def wait(self, count: int, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.arrivals)} of {count} arrived at {self.queue}")
            time.sleep(0.01)
        return max(self.arrivals.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        channel = self._connection.channel()
        channel.queue_delete(self.queue)
        self._connection.close()


def spawn(args: list[str], env: dict | None = None, name: str = "process") -> subprocess.Popen:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / f"{name}.log", "ab")
    return subprocess.Popen(
        args,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=RESULTS,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def consumers_on(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def wait_consuming(queues: list[str], processes: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(consumers_on(q) for q in queues):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            raise RuntimeError(f"consumers did not start on {queues}; see {RESULTS}/*.log")
        time.sleep(0.2)


def delete_broker_objects(exchange: str, stages, extra: tuple[str, ...] = ()) -> None:
    """What a section declared: the topology's queues for its stages (work, retry tiers, dead letters)."""
    topology = Topology(exchange, retry_delays=Settings.retry_delays)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for queue in [*topology.all_queues(stages), *extra]:
        channel.queue_delete(queue)
    for name in (topology.exchange, topology.dead_letter_exchange):
        channel.exchange_delete(name)
    connection.close()


def fresh_database() -> None:
    engine = make_engine(DATABASE_URL)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    upgrade(DATABASE_URL)


def stage_env(exchange: str, tracing: bool, otlp_port: int, **extra) -> dict:
    return {
        "REPORTFLOW_AMQP_URL": AMQP_URL,
        "REPORTFLOW_EXCHANGE": exchange,
        "REPORTFLOW_DATABASE_URL": DATABASE_URL,
        "REPORTFLOW_STORAGE_DIR": str(RESULTS / "storage"),
        "TRACING_ENABLED": str(tracing).lower(),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "REPORTFLOW_CONFIG_DIR": str(RESULTS),
        "REPORTFLOW_TRACING_STATS_SECONDS": "0",
        **extra,
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# -- 1. hop cost ---------------------------------------------------------------------------------------------
def hop(n: int, mode: str, otlp_port: int) -> float:
    """Messages per second through one hop: 'raw' pika, or the runtime with tracing 'on' or 'off'."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.hop"
    sink = Sink(exchange, "report.generated")
    if mode == "raw":
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, routing_key="report.created")
        connection.close()
        process = spawn([PYTHON, "-m", "bench.raw_hop", AMQP_URL, exchange, queue, "4"], name="hop-raw")
    else:
        fresh_database()
        process = spawn(
            [PYTHON, "-m", "bench.passthrough", "hop", "report.created"],
            stage_env(exchange, mode == "on", otlp_port),
            name=f"hop-{mode}",
        )
    try:
        wait_consuming([queue], [process])
        publisher = BulkPublisher(AMQP_URL, exchange)
        publisher.publish(Event("report.created", first_event(f"warm-{i}")) for i in range(100))
        sink.wait(100)
        started = time.perf_counter()
        publisher.publish(Event("report.created", first_event(f"r-{i}")) for i in range(n))
        finished = sink.wait(100 + n)
        return n / (finished - started)
    finally:
        stop(process)
        sink.close()
        delete_broker_objects(exchange, ["hop"])


def _tracing_cost(otlp_port: int, iterations: int, mode: str, ratio: float, upstream: str = "root") -> dict:
    out = subprocess.run(
        [PYTHON, "-m", "bench.tracing_cost", str(otlp_port), str(iterations), mode, str(ratio), upstream],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "REPORTFLOW_DATABASE_URL": DATABASE_URL},
        cwd=RESULTS,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def tracing_cpu(
    otlp_port: int, iterations: int, ratios: tuple[float, ...], repeats: int
) -> dict[float | str, tuple[float, float]]:
    """CPU µs per message that tracing adds to a hop at each sampling ratio, traced and untraced each in a
    process of its own (bench/tracing_cost.py), and spans per message. The runs are interleaved and each
    mode keeps its least CPU over `repeats` runs: the difference is a few hundred µs against about a
    millisecond of other work, and a busy neighbour only ever adds time. Under "sdk": what the SDK alone
    spends on a traced hop's two spans."""
    best: dict = {}
    for _ in range(repeats):
        for key in [("off", 1.0), ("sdk", 1.0), *(("on", r) for r in ratios)]:
            run = _tracing_cost(otlp_port, iterations, *key)
            if key not in best or run["cpu_seconds"] < best[key]["cpu_seconds"]:
                best[key] = run
    baseline = best[("off", 1.0)]["cpu_seconds"]
    costs = {
        r: (
            (best[("on", r)]["cpu_seconds"] - baseline) / iterations * 1e6,
            best[("on", r)]["spans"].get("started", 0) / (iterations + 200),
        )
        for r in ratios
    }
    # The floor: the same two spans, made and exported by the SDK alone (bench/tracing_cost.py, mode sdk).
    costs["sdk"] = (best[("sdk", 1.0)]["cpu_seconds"] / iterations * 1e6, 2.0)
    return costs


def tracing_cpu_paired(
    otlp_port: int, iterations: int, ratios: tuple[float, ...], repeats: int, upstream: str = "root"
) -> dict[float, dict]:
    """Tracing's CPU per message per hop with the traced and the untraced hop in one process, in alternating
    blocks (bench/tracing_cost.py, mode paired): the median of the blocks' differences, and its quartiles.
    Between separate processes the untraced hop alone moved by more than the unsampled cost it is set
    against (docs/performance.md); within a process, both sides move together. A whole run still moves
    with the machine's speed, which only ever slows it: each ratio keeps its least median over `repeats`.
    upstream: the trace context each message comes with (bench/tracing_cost.py)."""
    best: dict[float, dict] = {}
    for _ in range(repeats):
        for ratio in ratios:
            run = _tracing_cost(otlp_port, iterations, "paired", ratio, upstream)
            if ratio not in best or run["tracing_us"] < best[ratio]["tracing_us"]:
                best[ratio] = run
    return best


# -- 2. four-stage chain: reportflow vs Celery ----------------------------------------------------------------
# Rounds of the half-capacity pace in a full run (see main): each runs both chains twice, ABBA, and reportflow
# untraced once, in the middle.
HALF_CAPACITY_ROUNDS = 2

CHAIN = [
    ("stage1", "report.created"),
    ("stage2", "report.generated"),
    ("stage3", "report.approved"),
    ("stage4", "report.finalized"),
]


@dataclass
class ChainRun:
    """One chain's run: its burst throughput, each paced message's latency, and the CPU per message its
    processes and the servers spent in each phase ("burst", "paced"; CpuMeter.per_message)."""

    throughput: float
    latencies: list[float]
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def pooled(cls, *runs: ChainRun) -> ChainRun:
        """Runs of one chain as one: every paced latency, and the mean of the runs' throughputs and CPU per
        message (each run paced the same number of messages)."""
        cpu = {
            phase: {key: statistics.mean(r.cpu[phase][key] for r in runs) for key in runs[0].cpu[phase]}
            for phase in runs[0].cpu
        }
        return cls(statistics.mean(r.throughput for r in runs), [x for r in runs for x in r.latencies], cpu)


def chain_reportflow(n_burst: int, rate: int, seconds: float, otlp_port: int, tracing: bool = True) -> ChainRun:
    """Burst throughput, then per-message latencies at a paced rate (none when seconds is 0)."""
    fresh_database()
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    sink = Sink(exchange, "report.invalid")
    processes = [
        spawn(
            [PYTHON, "-m", "bench.passthrough", name, consumed],
            stage_env(exchange, tracing, otlp_port),
            name=f"chain-{name}",
        )
        for name, consumed in CHAIN
    ]
    queues = [f"{exchange}.{name}" for name, _ in CHAIN]
    try:
        wait_consuming(queues, processes)
        publisher = BulkPublisher(AMQP_URL, exchange)
        publisher.publish(Event("report.created", first_event(f"warm-{i}")) for i in range(100))
        sink.wait(100)
        meter = CpuMeter([p.pid for p in processes])
        started = time.perf_counter()
        publisher.publish(Event("report.created", first_event(f"burst-{i}")) for i in range(n_burst))
        run = ChainRun(n_burst / (sink.wait(100 + n_burst) - started), [])
        run.cpu["burst"] = meter.per_message(n_burst)
        if seconds:
            run.latencies = _paced(lambda rid: _publish_one(exchange, rid), sink, rate, seconds, 100 + n_burst)
            run.cpu["paced"] = meter.per_message(len(run.latencies))
        return run
    finally:
        stop(*processes)
        sink.close()
        delete_broker_objects(exchange, [name for name, _ in CHAIN])


def _add_paced(
    figures: Figures,
    pace: str,
    ours: list[float],
    theirs: list[float],
    target: str | None,
    keep_samples: bool,
    celery: str = "Celery",
    runs: tuple[list[list[float]], ...] | None = None,
    ours_label: str = "reportflow",
    celery_figures: bool = True,
) -> None:
    """p50 and p99 per hop of a paced load, reportflow's against Celery's (celery names which Celery chain).
    target: "ratio" (p99 at most twice Celery's), "8 ms" (p99 per hop), or None. runs: each chain's runs,
    where the latencies pool several, whose own p99s the JSON keeps beside the pooled one. ours_label names
    reportflow's variant; celery_figures: False where Celery's own figures were added already."""
    chains = [(ours_label, ours, theirs)] + ([(celery, theirs, None)] if celery_figures else [])
    for index, (label, latencies, baseline) in enumerate(chains):
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        each = {"p99_per_hop_each_run": [round(percentile(r, 99) / 4, 3) for r in runs[index]]} if runs else {}
        figures.add(
            f"chain paced {pace} p50 per hop, {label}",
            p50 / 4,
            "ms",
            celery if baseline else "itself",
            (p50 / percentile(baseline, 50)) if baseline else None,
        )
        ratio = (p99 / percentile(baseline, 99)) if baseline else None
        aim, met = None, None
        if baseline and target == "ratio":
            aim, met = "<= 2x", ratio <= 2
        elif baseline and target == "8 ms":
            aim, met = "<= 8 ms", p99 / 4 <= 8
        figures.add(
            f"chain paced {pace} p99 per hop, {label}",
            p99 / 4,
            "ms",
            celery if baseline else "itself",
            ratio,
            aim,
            met,
            samples=latencies if keep_samples else None,
            **each,
        )


def _add_cpu(figures: Figures, phase: str, ours: dict, theirs: dict, bursts: tuple[dict, dict] | None = None) -> None:
    """CPU per message of the four stage processes (reportflow) or the four workers with their pools
    (Celery), PostgreSQL's and RabbitMQ's beside it. bursts: each chain's burst figures, which a paced
    phase is set against; without them (the burst itself), reportflow is set against Celery."""
    for label, spent, other, burst in (
        ("reportflow", ours, theirs, bursts[0] if bursts else None),
        ("Celery", theirs, None, bursts[1] if bursts else None),
    ):
        servers = {"postgresql_ms": round(spent["postgresql"], 3), "rabbitmq_ms": round(spent["rabbitmq"], 3)}
        if burst is not None:
            baseline, ratio = "the same chain's burst", spent["processes"] / burst["processes"]
            if other is not None:
                servers["against_celery"] = round(spent["processes"] / other["processes"], 3)
        elif other is not None:
            baseline, ratio = "Celery chain", spent["processes"] / other["processes"]
        else:
            baseline, ratio = "itself", None
        figures.add(f"chain CPU per message, {phase}, {label}", spent["processes"], "ms", baseline, ratio, **servers)


def cold_work(items: int, pause: float = 0.005) -> tuple[float, float]:
    """Median seconds of a piece of a hop's own CPU work (an event encoded, read and checked against its
    schema), done back to back, and done after a pause as long as a stage waits between messages at half
    capacity. Where the second costs more, a machine's caches went cold in the pause: every message a
    stage handles alone pays that, in any framework."""
    from reportflow.shared.events import CONTENT_TYPE, encode, parse, validate

    event = Event("report.created", first_event("cold-work"))

    def work() -> None:
        parsed = parse(event.type, event.message_id, CONTENT_TYPE, encode(event), 1 << 20)
        assert isinstance(parsed, Event) and isinstance(validate(parsed), Event)

    def median_after(wait: float) -> float:
        times = []
        for _ in range(items):
            if wait:
                time.sleep(wait)
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    work()
    return median_after(0), median_after(pause)


_channels: dict[str, object] = {}


def _publish_one(exchange: str, report_id: str) -> None:
    """One upstream publish with a confirm, as the paced load does."""
    if exchange not in _channels:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        channel.confirm_delivery()
        _channels[exchange] = channel
    event = Event("report.created", first_event(report_id))
    from reportflow.shared.events import encode, message_properties

    _channels[exchange].basic_publish(
        exchange, event.type, encode(event), pika.BasicProperties(**message_properties(event))
    )


def _paced(publish, sink: Sink, rate: int, seconds: float, already: int) -> list[float]:
    """Publish at `rate` per second for `seconds`; the latency of each, from publish to the sink."""
    sent: dict[str, float] = {}
    count = int(rate * seconds)
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.001, due - now))
        report_id = f"paced-{i}"
        sent[report_id] = time.perf_counter()
        publish(report_id)
    sink.wait(already + count)
    return [(sink.arrivals[r] - t) * 1000 for r, t in sent.items()]


def chain_celery(n_burst: int, rate: int, seconds: float, durable: bool = False, traced: bool = False) -> ChainRun:
    """The bare chain, or (durable) one whose tasks do reportflow's durable work, and (traced) with
    opentelemetry-instrumentation-celery exporting to the same OTLP sink (bench/celery_chain.py)."""
    from bench import celery_chain

    env = {
        "BENCH_CELERY_BROKER": AMQP_URL,
        "BENCH_CELERY_DATABASE": DATABASE_URL,
        "BENCH_CELERY_DURABLE": "1" if durable else "0",
        "BENCH_CELERY_TRACED": "1" if traced else "0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{OTLP_PORT}",
    }
    if durable:
        celery_chain.create_tables()
    workers = [
        spawn(
            [
                str(BIN / "celery"),
                "-A",
                "bench.celery_chain",
                "worker",
                "-Q",
                f"bench.{name}",
                "-n",
                f"{name}@%h",
                "--loglevel=WARNING",
            ],
            env,
            name=f"celery-{name}",
        )
        for name, _ in CHAIN
    ]
    parse = lambda body: json.loads(body)[0][0]  # noqa: E731 - Celery protocol 2: [args, kwargs, embed]
    sink = Sink("", "bench.sink", parse=parse)
    try:
        wait_consuming([f"bench.{name}" for name, _ in CHAIN], workers)
        for i in range(100):
            celery_chain.stage1.apply_async((f"warm-{i}",), queue="bench.stage1")
        sink.wait(100)
        meter = CpuMeter([w.pid for w in workers])  # each with its pool's processes
        started = time.perf_counter()
        for i in range(n_burst):
            celery_chain.stage1.apply_async((f"burst-{i}",), queue="bench.stage1")
        run = ChainRun(n_burst / (sink.wait(100 + n_burst) - started), [])
        run.cpu["burst"] = meter.per_message(n_burst)
        if seconds:
            run.latencies = _paced(
                lambda rid: celery_chain.stage1.apply_async((rid,), queue="bench.stage1"),
                sink,
                rate,
                seconds,
                100 + n_burst,
            )
            run.cpu["paced"] = meter.per_message(len(run.latencies))
        return run
    finally:
        stop(*workers)
        sink.close()
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for name, _ in CHAIN:
            channel.queue_delete(f"bench.{name}")
        connection.close()


# -- 3 and 4. generation ------------------------------------------------------------------------------------
def report_request(report_id: str, rows: int) -> dict:
    request = json.loads((ROOT / "producers" / "examples" / "q3-revenue.json").read_text())
    request["report_id"] = report_id
    request["data"]["table"]["rows"] = [[f"m{i}", "North", "Analytics", f"{i * 1000:,}", "1.0%"] for i in range(rows)]
    return request


def store_reports(report_ids: list[str], rows: int) -> None:
    """Reports as creation leaves them, written straight to the database."""
    from sqlalchemy.orm import sessionmaker

    from reportflow.consumers.creation import on_report_requested
    from reportflow.shared.db import UnitOfWork

    engine = make_engine(DATABASE_URL)
    factory = sessionmaker(engine, expire_on_commit=False)
    for report_id in report_ids:
        with UnitOfWork(factory, "bench") as uow:
            uow.claim(str(uuid.uuid4()), "report.requested")
            on_report_requested(Event("report.requested", report_request(report_id, rows)), uow)
            uow.commit({})
    engine.dispose()


def bare_render_seconds(rows: int, repeat: int) -> tuple[float, int]:
    """A bare HTML(...).write_pdf() of the same HTML the stage renders, in this process."""
    from weasyprint import HTML

    from reportflow.shared.documents import DocumentRenderer
    from reportflow.shared.models import Report

    request = report_request("bare", rows)
    report = Report(
        id="bare",
        title=request["title"],
        template="standard",
        status="created",
        submitter=request["submitter"],
        client=request["client"],
        data=request["data"],
        created_at=datetime.datetime.now(datetime.UTC),
    )
    html = DocumentRenderer().html(report)
    css = (ROOT / "shared" / "templates" / "report.css").read_text()
    document = html.replace("</head>", f"<style>{css}</style></head>")
    HTML(string=document).write_pdf()  # warm: fonts, first layout
    started = time.perf_counter()
    for _ in range(repeat):
        pdf = HTML(string=document).write_pdf()
    return (time.perf_counter() - started) / repeat, len(pdf)


def generation_run(n: int, rows: int, processes: int, otlp_port: int) -> tuple[float, float, float]:
    """Seconds per report through the generation stage (backlog drained by `processes` consumers), the
    peak memory of one generation consumer with its render process, and its resident memory once idle."""
    fresh_database()
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    sink = Sink(exchange, "report.generated")
    env = stage_env(exchange, True, otlp_port)
    consumers = [
        spawn([str(BIN / "reportflow"), "consume", "generation"], env, name=f"generation-{i}") for i in range(processes)
    ]
    try:
        wait_consuming([f"{exchange}.generation"], consumers)
        while consumers_on(f"{exchange}.generation") < processes:
            time.sleep(0.2)
        ids = [f"g-{i}" for i in range(n + 2 * processes)]
        store_reports(ids, rows)
        publisher = BulkPublisher(AMQP_URL, exchange)
        created = lambda r: Event("report.created", {k: v for k, v in first_event(r).items()})  # noqa: E731
        publisher.publish(created(r) for r in ids[: 2 * processes])  # warm each render process
        sink.wait(2 * processes)
        started = time.perf_counter()
        publisher.publish(created(r) for r in ids[2 * processes :])
        elapsed = sink.wait(n + 2 * processes) - started
        peak = max(rss_mb(c.pid, "VmHWM") for c in consumers)
        time.sleep(3)  # a render process left too large is replaced: its successor has loaded by now
        return elapsed / n, peak, max(rss_mb(c.pid, "VmRSS") for c in consumers)
    finally:
        stop(*consumers)
        sink.close()
        delete_broker_objects(exchange, STAGE_NAMES)


# -- 5. end to end ------------------------------------------------------------------------------------------------
def end_to_end(n: int) -> tuple[float, list[float]]:
    from aiosmtpd.controller import Controller

    from reportflow.producers import ReportflowClient
    from tests.helpers import free_port
    from tests.pipeline import AutoApprover

    fresh_database()
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    arrivals: dict[str, float] = {}

    class Mail:
        async def handle_DATA(self, server, session, envelope):
            subject = next(
                (
                    line
                    for line in envelope.content.decode(errors="replace").splitlines()
                    if line.startswith("Subject: Report approved: ")
                ),
                None,
            )
            if subject:
                arrivals.setdefault(subject.rsplit(" ", 1)[-1], time.perf_counter())
            return "250 OK"

    port = free_port()
    smtp = Controller(Mail(), hostname="127.0.0.1", port=port)
    smtp.start()
    env = stage_env(exchange, True, OTLP_PORT, REPORTFLOW_SMTP_URL=f"smtp://127.0.0.1:{port}")
    from tests.pipeline import STAGES, procfile_commands

    commands = {name: command for name, command in procfile_commands().items() if name in STAGES}
    processes = [
        spawn(["/bin/sh", "-c", command.strip()], env, name=f"e2e-{name}") for name, command in commands.items()
    ]
    approver = AutoApprover(exchange)
    approver.queue = f"{exchange}.auto-approver"
    try:
        wait_consuming([f"{exchange}.{s}" for s in commands], processes)
        approver.start()
        sent = {}
        with ReportflowClient(AMQP_URL, exchange) as client:
            for i in range(n):
                request = report_request(f"e{i}", 20)
                request["title"] = f"Bench e{i}"
                sent[f"e{i}"] = time.perf_counter()
                client.request_report(request)
        deadline = time.monotonic() + 600
        while len(arrivals) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        latencies = [(arrivals[r] - t) * 1000 for r, t in sent.items() if r in arrivals]
        per_minute = len(latencies) / ((max(arrivals.values()) - min(sent.values())) / 60)
        return per_minute, latencies
    finally:
        approver.stop()
        stop(*processes)
        smtp.stop()
        delete_broker_objects(exchange, commands, extra=(f"{exchange}.auto-approver",))


# -- 6. bulk publishing -----------------------------------------------------------------------------------------
def bulk(n: int) -> tuple[float, float]:
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(f"{exchange}.bulk", durable=True)
    channel.queue_bind(f"{exchange}.bulk", exchange, routing_key="#")
    try:
        events = [Event("report.requested", {"report_id": f"b{i}", "title": "t"}) for i in range(n)]
        started = time.perf_counter()
        result = BulkPublisher(AMQP_URL, exchange).publish(events)
        confirmed = n / (time.perf_counter() - started)
        assert result.ok and result.confirmed == n
        from reportflow.shared.events import encode, message_properties

        started = time.perf_counter()
        for event in events:  # the baseline: raw pika, no confirms, no spans
            channel.basic_publish(
                exchange, event.type, encode(event), pika.BasicProperties(**message_properties(event))
            )
        raw = n / (time.perf_counter() - started)
        return confirmed, raw
    finally:
        channel.queue_delete(f"{exchange}.bulk")
        channel.exchange_delete(exchange)
        connection.close()


# -- 7. memory under a backlog ------------------------------------------------------------------------------------
def memory_under_backlog(n: int, otlp_port: int) -> tuple[float, float]:
    """RSS of a consumer draining an n-message backlog: at the start of the drain and at its end (MB)."""
    fresh_database()
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.hop"
    sink = Sink(exchange, "report.generated")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": f"{exchange}.dead-letter"})
    channel.queue_bind(queue, exchange, routing_key="report.created")
    connection.close()
    BulkPublisher(AMQP_URL, exchange).publish(Event("report.created", first_event(f"m-{i}")) for i in range(n))
    process = spawn(
        [PYTHON, "-m", "bench.passthrough", "hop", "report.created"],
        stage_env(exchange, True, otlp_port),
        name="memory",
    )
    samples = []
    try:
        while len(sink.arrivals) < n:
            if process.poll() is not None:
                raise RuntimeError("the consumer exited")
            if len(sink.arrivals) > n * 0.05:
                samples.append(rss_mb(process.pid))
            time.sleep(0.25)
        return samples[0], max(samples)
    finally:
        stop(process)
        sink.close()
        delete_broker_objects(exchange, ["hop"])


SECTIONS = ("hop", "chain", "generation", "scaling", "end-to-end", "bulk", "memory")


# -- the run --------------------------------------------------------------------------------------------------
OTLP_PORT = 0


def main() -> None:
    global OTLP_PORT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke check, not figures to quote")
    parser.add_argument("--only", default="", help="comma-separated sections to run: " + ",".join(SECTIONS))
    args = parser.parse_args()
    q = args.quick
    only = set(filter(None, args.only.split(","))) or set(SECTIONS)
    if only - set(SECTIONS):
        parser.error(f"unknown sections: {sorted(only - set(SECTIONS))}")
    from tests.helpers import free_port

    OTLP_PORT = free_port()
    collector = spawn([PYTHON, "-m", "bench.otlp_sink", str(OTLP_PORT)], name="otlp-sink")
    from reportflow.shared.config import TracingSettings
    from reportflow.shared.tracing import setup_tracing

    setup_tracing("bench-producer", TracingSettings())  # the producer side traces, as an upstream would
    figures = Figures()
    try:
        if "hop" in only:
            print("1. hop cost", flush=True)
            n = 300 if q else 3000
            raw, on, off = hop(n, "raw", OTLP_PORT), hop(n, "on", OTLP_PORT), hop(n, "off", OTLP_PORT)
            figures.add("hop throughput, raw pika", raw, "msg/s", "itself")
            figures.add("hop throughput, runtime, tracing on", on, "msg/s", "raw pika hop", on / raw)
            figures.add("hop throughput, runtime, tracing off", off, "msg/s", "raw pika hop", off / raw)
            figures.add(
                "hop wall-clock cost of tracing", (1 / on - 1 / off) * 1e6, "µs", "same hop, tracing off", on / off
            )
            # 1: every trace kept; 0.25: config/production.yaml's ratio; 0: the cost a trace left unsampled adds.
            ratios = (1.0, 0.25, 0.1, 0.0)
            costs = tracing_cpu(OTLP_PORT, 500 if q else 3000, ratios, 1 if q else 5)
            paired = tracing_cpu_paired(OTLP_PORT, 500 if q else 6000, ratios, 1 if q else 3)
            # Targets: every trace kept, and the cost an unsampled message adds (docs/performance.md), set
            # against the paired figure, whose untraced side ran beside it.
            targets = {1.0: 150, 0.0: 25}
            floor, _ = costs.pop("sdk")
            figures.add("tracing CPU per hop, the SDK alone on the same two spans", floor, "µs", "itself")
            for ratio, (traced, spans_per_message) in costs.items():
                target = targets.get(ratio)
                same_process = paired[ratio]
                figures.add(
                    f"tracing CPU per message per hop, sampling {ratio:g}",
                    same_process["tracing_us"],
                    "µs",
                    "the same hop with tracing off, in the same process",
                    None,
                    f"<= {target} µs" if target else None,
                    (same_process["tracing_us"] <= target) if target else None,
                    quartiles=[round(q, 1) for q in same_process["tracing_us_quartiles"]],
                    pairs=same_process["pairs"],
                    spans_per_message=spans_per_message,
                    against_sdk_alone=round(same_process["tracing_us"] / floor, 2) if ratio == 1.0 else None,
                )
                figures.add(
                    f"tracing CPU per message per hop, sampling {ratio:g}, separate processes",
                    traced,
                    "µs",
                    "the least of each over the runs, tracing off",
                )
            # Above, each message starts its trace, as at a chain's first hop. Every later hop gets a message in
            # a trace its upstream decided on; unsampled, that is what most of a chain's hops are.
            [in_trace] = tracing_cpu_paired(OTLP_PORT, 500 if q else 6000, (0.0,), 1 if q else 3, "unsampled").values()
            figures.add(
                "tracing CPU per message per hop, sampling 0, in a trace its upstream did not sample",
                in_trace["tracing_us"],
                "µs",
                "the same hop with tracing off, in the same process",
                None,
                f"<= {targets[0.0]} µs",
                in_trace["tracing_us"] <= targets[0.0],
                quartiles=[round(q, 1) for q in in_trace["tracing_us_quartiles"]],
                pairs=in_trace["pairs"],
            )

        if "chain" in only:
            print("2. four-stage chain vs Celery", flush=True)
            burst, rate, seconds = (200, 200, 3) if q else (2000, 200, 15)
            warm, after_pause = cold_work(100 if q else 400)
            figures.add(
                "a hop's own CPU work after a 5 ms pause (this machine)",
                after_pause * 1e6,
                "µs",
                "the same work back to back",
                after_pause / warm,
                back_to_back_us=round(warm * 1e6, 1),
            )
            ours = chain_reportflow(burst, rate, seconds, OTLP_PORT)
            theirs = chain_celery(burst, rate, seconds)
            figures.add(
                "chain burst throughput, reportflow",
                ours.throughput,
                "msg/s",
                "Celery chain",
                ours.throughput / theirs.throughput,
                ">= 1.0x",
                ours.throughput / theirs.throughput >= 1.0,
            )
            figures.add("chain burst throughput, Celery", theirs.throughput, "msg/s", "itself")
            untraced = chain_reportflow(burst, rate, 0, OTLP_PORT, tracing=False).throughput
            figures.add(
                "chain burst throughput, reportflow, tracing off",
                untraced,
                "msg/s",
                "Celery chain",
                untraced / theirs.throughput,
            )
            # Equal work: Celery tasks that commit what a reportflow hop commits, traced and not.
            equal_traced = chain_celery(burst, rate, 0, durable=True, traced=True).throughput
            equal = chain_celery(burst, rate, 0, durable=True).throughput
            figures.add(
                "chain burst throughput, Celery with equal durable work, traced", equal_traced, "msg/s", "itself"
            )
            figures.add("chain burst throughput, Celery with equal durable work", equal, "msg/s", "itself")
            figures.add(
                "chain burst throughput, reportflow, against equal work",
                ours.throughput,
                "msg/s",
                "Celery with equal durable work, traced",
                ours.throughput / equal_traced,
                ">= 1.5x",
                ours.throughput / equal_traced >= 1.5,
            )
            figures.add(
                "chain burst throughput, reportflow, tracing off, against equal work",
                untraced,
                "msg/s",
                "Celery with equal durable work",
                untraced / equal,
            )
            # The same latencies where both chains keep up: half the burst rate the slower of the two reached
            # (half reportflow's would overrun a Celery chain whose burst is below it, and say nothing of
            # either); and at 100/s, which a machine of two cores carries for both (at 200/s it is 95% busy).
            # The target's pace is run in rounds of reportflow, Celery, Celery, reportflow (HALF_CAPACITY_ROUNDS
            # of them), and each chain's runs pooled: these machines' speed drifts over minutes (the same
            # chain's p50 doubled between runs a minute apart; one sitting's two reportflow runs gave a p99 of 17
            # and 38 ms), and one run each, in one order, put the drift into the ratio.
            half = max(10, int(min(ours.throughput, theirs.throughput) / 2))
            # Untraced too, in the middle of each round (where the traced and the Celery runs centre): how much
            # of the gap to bare Celery, which traces nothing, is tracing's.
            ours_runs, theirs_runs, untraced_runs = [], [], []
            for _ in range(1 if q else HALF_CAPACITY_ROUNDS):
                ours_runs.append(chain_reportflow(burst // 4, half, seconds, OTLP_PORT))
                theirs_runs.append(chain_celery(burst // 4, half, seconds))
                untraced_runs.append(chain_reportflow(burst // 4, half, seconds, OTLP_PORT, tracing=False))
                theirs_runs.append(chain_celery(burst // 4, half, seconds))
                ours_runs.append(chain_reportflow(burst // 4, half, seconds, OTLP_PORT))
            ours_half, theirs_half = ChainRun.pooled(*ours_runs), ChainRun.pooled(*theirs_runs)
            ours_light, theirs_light = (
                chain_reportflow(burst // 4, 100, seconds, OTLP_PORT),
                chain_celery(burst // 4, 100, seconds),
            )
            _add_paced(
                figures,
                f"{half}/s (half capacity)",
                ours_half.latencies,
                theirs_half.latencies,
                "ratio",
                keep_samples=not q,
                runs=([r.latencies for r in ours_runs], [r.latencies for r in theirs_runs]),
            )
            _add_paced(
                figures,
                f"{half}/s (half capacity)",
                [x for r in untraced_runs for x in r.latencies],
                theirs_half.latencies,
                None,
                keep_samples=False,
                runs=([r.latencies for r in untraced_runs],),
                ours_label="reportflow, tracing off",
                celery_figures=False,
            )
            for pace, ours_paced, theirs_paced, target in (
                (f"{rate}/s", ours, theirs, "8 ms"),
                ("100/s", ours_light, theirs_light, None),
            ):
                _add_paced(figures, pace, ours_paced.latencies, theirs_paced.latencies, target, keep_samples=not q)
            # Latency on equal terms too: against the Celery chain that commits what a reportflow hop commits,
            # traced, at half the burst of the slower of the two (that chain's, on every machine so far).
            equal_half = max(5, int(min(ours.throughput, equal_traced) / 2))
            ours_equal, theirs_equal = (
                chain_reportflow(burst // 4, equal_half, seconds, OTLP_PORT),
                chain_celery(burst // 4, equal_half, seconds, durable=True, traced=True),
            )
            _add_paced(
                figures,
                f"{equal_half}/s (half the equal-work chain's capacity)",
                ours_equal.latencies,
                theirs_equal.latencies,
                None,
                keep_samples=not q,
                celery="Celery with equal durable work, traced",
            )
            # What each message cost the chain's processes: in the burst (reportflow batches), and handled
            # alone at half capacity and at 100/s, against the burst.
            _add_cpu(figures, "burst", ours.cpu["burst"], theirs.cpu["burst"])
            for pace, ours_paced, theirs_paced in (
                (f"paced {half}/s (half capacity)", ours_half, theirs_half),
                ("paced 100/s", ours_light, theirs_light),
            ):
                _add_cpu(
                    figures,
                    pace,
                    ours_paced.cpu["paced"],
                    theirs_paced.cpu["paced"],
                    (ours.cpu["burst"], theirs.cpu["burst"]),
                )

        if "generation" in only:
            print("3. generation vs a bare render", flush=True)
            cases = [
                ("1-page", 5, 6 if q else 30, 3 if q else 10),
                ("5-page 200-row", 200, 3 if q else 15, 3 if q else 10),
            ]
            if not q:  # the schema's limit: a minute of rendering per report on these machines
                cases.append(("5,000-row", 5000, 2, 2))
            for label, rows, count, repeat in cases:
                bare, _ = bare_render_seconds(rows, repeat)
                stage, peak, idle = generation_run(count, rows, 1, OTLP_PORT)
                figures.add(
                    f"generation per report, {label}",
                    stage * 1000,
                    "ms",
                    "bare write_pdf of the same HTML",
                    stage / bare,
                    "<= 1.10x",
                    stage / bare <= 1.10,
                )
                figures.add(f"bare write_pdf, {label}", bare * 1000, "ms", "itself")
                if rows == 200:
                    figures.add("generation consumer peak RSS (with its render process)", peak, "MB", "itself")
                if rows == 5000:
                    figures.add(
                        "generation consumer RSS after 5,000-row reports (with its render process)",
                        idle,
                        "MB",
                        "itself",
                        None,
                        "< 300 MB",
                        idle < 300,
                    )
            approved = final_version_ratio(3 if q else 10)
            figures.add(
                "approved version vs a draft render, 5-page 200-row",
                approved,
                "x",
                "draft render",
                approved,
                "<= 0.25x",
                approved <= 0.25,
            )

        if "scaling" in only:
            print("4. scaling generation", flush=True)
            count = 8 if q else 40
            one, _, _ = generation_run(count, 200, 1, OTLP_PORT)
            two, _, _ = generation_run(count, 200, 2, OTLP_PORT)
            figures.add("generation, 1 process", 60 / one, "reports/min", "itself")
            figures.add(
                "generation, 2 processes", 60 / two, "reports/min", "1 process", one / two, ">= 1.8x", one / two >= 1.8
            )

        if "end-to-end" in only:
            print("5. end to end", flush=True)
            per_minute, latencies = end_to_end(5 if q else 40)
            figures.add("end to end, two approval stages", per_minute, "reports/min", "itself")
            for p in (50, 95, 99):
                figures.add(
                    f"end to end p{p}, request to final email",
                    percentile(latencies, p),
                    "ms",
                    "itself",
                    samples=latencies if p == 50 and not q else None,
                )

        if "bulk" in only:
            print("6. bulk publishing", flush=True)
            confirmed, raw_rate = bulk(2000 if q else 20000)
            figures.add(
                "bulk publish with confirms (producer client)",
                confirmed,
                "msg/s",
                "raw pika, no confirms",
                confirmed / raw_rate,
                ">= 10,000 msg/s",
                confirmed >= 10000,
            )
            figures.add("raw pika publish, no confirms", raw_rate, "msg/s", "itself")

        if "memory" in only:
            print("7. memory under a backlog", flush=True)
            first, peak = memory_under_backlog(1000 if q else 10000, OTLP_PORT)
            figures.add(
                "consumer RSS growth over a backlog drain",
                peak - first,
                "MB",
                f"RSS early in the drain ({first:.0f} MB)",
                peak / first,
                "flat (< 10 MB)",
                peak - first < 10,
            )
    finally:
        stop(collector)
    write(figures, q, partial=only != set(SECTIONS))


def final_version_ratio(repeat: int) -> float:
    from reportflow.shared.documents import DocumentRenderer
    from reportflow.shared.models import Report

    request = report_request("ratio", 200)
    report = Report(
        id="ratio",
        title=request["title"],
        template="standard",
        status="created",
        submitter=request["submitter"],
        client=request["client"],
        data=request["data"],
        created_at=datetime.datetime.now(datetime.UTC),
    )
    renderer = DocumentRenderer()
    draft = renderer.render(report)
    approval = [
        {
            "name": "review",
            "rule": "all",
            "decisions": [
                {
                    "approver": "bob@example.com",
                    "decision": "approve",
                    "comment": "ok",
                    "decided_at": "2026-11-24 10:00",
                }
            ],
        }
    ]
    started = time.perf_counter()
    for _ in range(repeat):
        renderer.render(report)
    draft_seconds = (time.perf_counter() - started) / repeat
    started = time.perf_counter()
    for _ in range(repeat):
        renderer.final_version(report, draft.pdf, draft.pages, approval)
    return (time.perf_counter() - started) / repeat / draft_seconds


def write(figures: Figures, quick: bool, partial: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    # A partial run (--only) never stands in for a whole one: it gets its own names, and latest.* is left alone.
    suffix = ("-quick" if quick else "") + ("-partial" if partial else "")
    latest = f"latest{suffix}" if partial else "latest"
    samples = {f["name"]: f.pop("samples") for f in figures if f.get("samples")}
    for f in figures:
        f.pop("samples", None)
    for name in (f"{stamp}{suffix}.json", f"{latest}.json"):
        (RESULTS / name).write_text(json.dumps(list(figures), indent=2, ensure_ascii=False) + "\n")
    table = ["| figure | value | baseline | ratio | target | met |", "| --- | ---: | --- | ---: | --- | --- |"]
    for f in figures:
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        table.append(
            f"| {f['name']} | {f['value']:,} {f['unit']} | {f['baseline']} | "
            f"{'' if f['ratio'] is None else f['ratio']} | {f['target'] or ''} | {met} |"
        )
    markdown = "\n".join(table) + "\n"
    for name in (f"{stamp}{suffix}.md", f"{latest}.md"):
        (RESULTS / name).write_text(markdown)
    chart(figures, samples, RESULTS / f"{stamp}{suffix}.png", RESULTS / f"{latest}.png")
    print(f"\nwrote {RESULTS}/{latest}.json, {latest}.md and {stamp}{suffix}.png\n\n{markdown}")


def _series_label(figure_name: str) -> str:
    """The samples hang on a figure; the curve shows every message's whole latency, not that figure."""
    if figure_name.startswith("chain paced"):
        pace = figure_name.removeprefix("chain ").split(" p", 1)[0]  # "paced 200/s", "paced 59/s (half capacity)"
        return f"four-stage chain, {pace}, {figure_name.split(' per hop, ', 1)[-1]}: publish to last hop"
    return "end to end: request to final email"


def chart(figures: list[dict], samples: dict, path: Path, latest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, values in samples.items():
        ordered = sorted(values)
        left.plot(ordered, [i / len(ordered) for i in range(1, len(ordered) + 1)], label=_series_label(name))
    left.set_xscale("log")
    left.set_xlabel("latency (ms, log scale)")
    left.set_ylabel("fraction of messages")
    left.set_title("Latency distributions")
    if samples:
        left.legend(fontsize=7)
    bars = [f for f in figures if f["unit"] in ("msg/s",)]
    right.barh([f["name"] for f in bars], [f["value"] for f in bars], color="#4b6387")
    right.set_xscale("log")
    right.set_xlabel("messages per second (log scale)")
    right.set_title("Throughput")
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(latest, dpi=110)


if __name__ == "__main__":
    main()
