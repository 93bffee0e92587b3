"""The consumer's connection to the broker, kept open: opened on the first node that answers, handed to
whoever serves on it, and opened again with backoff (on any node) when that one goes away.

pika's BlockingConnection is not thread-safe: other threads hand its thread work with call_on_io. That thread
does I/O, and handles deliveries itself only for stages whose handlers are short (a long PDF render runs on
a worker thread, so heartbeats keep flowing)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pika
import pika.exceptions

from reportflow.shared.broker import blocking_connection, connected_address

log = logging.getLogger("reportflow.consumer")

RECONNECT_BACKOFF_SECONDS = (1, 2, 5, 10, 30)
STOP_CHECK_SECONDS = 0.2  # how soon a stop asked for during a backoff is seen


class ConnectionLost(RuntimeError):
    pass


class BrokerConnection:
    def __init__(self, amqp_url: str, heartbeat_seconds: int, name: str):
        self._url = amqp_url
        self._heartbeat = heartbeat_seconds
        self.name = name
        self.opened = 0  # more than one means the connection was re-established
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._io_thread: int | None = None
        self._pending: set[Future] = set()

    def run(
        self,
        serve: Callable[[pika.BlockingConnection], None],
        stopping: threading.Event,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        """serve(connection) on every connection opened, until stopping is set; tick() at every try."""
        attempt = 0
        while not stopping.is_set():
            tick()
            try:
                self._serve_one(serve)
                attempt = 0
            except (pika.exceptions.AMQPError, OSError, ConnectionLost) as exc:
                if stopping.is_set():
                    break
                delay = RECONNECT_BACKOFF_SECONDS[min(attempt, len(RECONNECT_BACKOFF_SECONDS) - 1)]
                attempt += 1
                log.warning("%s: broker connection lost (%r); reconnecting in %ss", self.name, exc, delay)
                _back_off(delay, stopping)

    def _serve_one(self, serve) -> None:
        connection = blocking_connection(self._url, heartbeat=self._heartbeat, name=self.name)
        log.info("%s: connected to %s:%s", self.name, *connected_address(connection))
        with self._lock:
            self._connection, self._io_thread = connection, threading.get_ident()
        self.opened += 1
        try:
            serve(connection)
        except Exception as exc:
            # A connection lost while a callback ran inside process_data_events gives that callback the
            # error; the next call then fails on the closed I/O loop with whatever pika raises (a
            # ValueError). Whatever it is, with the connection closed it is a lost connection.
            if connection.is_open:
                raise
            raise ConnectionLost(f"connection closed: {exc!r}") from exc
        finally:
            self._fail_pending()
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def call_on_io(self, fn) -> Future:
        """Run fn on the I/O thread (at once when called there); the returned future fails if the
        connection is lost first."""
        future: Future = Future()

        def run() -> None:
            with self._lock:
                self._pending.discard(future)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

        with self._lock:
            connection = self._connection
            if connection is None or not connection.is_open:
                raise ConnectionLost("no broker connection")
            on_io_thread = threading.get_ident() == self._io_thread
            if not on_io_thread:
                self._pending.add(future)
        if on_io_thread:
            run()
        else:
            connection.add_callback_threadsafe(run)
        return future

    def _fail_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, set()
            self._connection = None
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(ConnectionLost("broker connection closed before the message was settled"))


def _back_off(seconds: float, stopping: threading.Event) -> None:
    """Sleep until the time is up or stopping is set. Not stopping.wait(): the SIGTERM handler sets stopping
    on this same thread, and one that ran while wait() held the event's lock would wait on it for good."""
    deadline = time.monotonic() + seconds
    while not stopping.is_set() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(STOP_CHECK_SECONDS, left))
