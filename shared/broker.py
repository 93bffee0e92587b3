"""Reaching the broker: REPORTFLOW_AMQP_URL may name several nodes of a cluster, separated by commas.
Every connection (consumers, the client, bulk publishing, the gateway, the CLI) tries them in order and
takes the first that answers; when that node goes away, the reconnect tries them all again."""

from __future__ import annotations

import socket

import pika


def broker_urls(setting: str) -> list[str]:
    urls = [url.strip() for url in setting.split(",") if url.strip()]
    if not urls:
        raise ValueError("REPORTFLOW_AMQP_URL names no broker")
    return urls


def broker_user(setting: str) -> str:
    """The broker user a connection to these nodes logs in as: what a publisher sets as user_id, which the
    broker checks, so that consumers can tell who published (trust.publishers)."""
    return pika.URLParameters(broker_urls(setting)[0]).credentials.username


def broker_vhost(setting: str) -> str:
    """The virtual host these nodes are reached on, as pika reads it from the URL."""
    return pika.URLParameters(broker_urls(setting)[0]).virtual_host


def connection_parameters(
    setting: str, *, heartbeat: int | None = None, name: str | None = None
) -> list[pika.URLParameters]:
    parameters = []
    for url in broker_urls(setting):
        each = pika.URLParameters(url)
        if heartbeat is not None:
            each.heartbeat = heartbeat
        if name:
            each.client_properties = {"connection_name": name}
        each.connection_attempts, each.retry_delay = 1, 0  # the next node, not the same one again
        parameters.append(each)
    return parameters


def blocking_connection(setting: str, **options) -> pika.BlockingConnection:
    """A connection to the first node that answers."""
    return pika.BlockingConnection(connection_parameters(setting, **options))


def first_address(setting: str) -> tuple[str, int]:
    first = pika.URLParameters(broker_urls(setting)[0])
    return first.host, first.port


def connected_address(connection: pika.BlockingConnection) -> tuple[str, int]:
    params = connection._impl.params  # the node this connection reached
    return params.host, params.port


def reachable(setting: str, timeout: float = 1.0) -> bool:
    """Whether some node accepts a TCP connection: cheap enough for a readiness probe."""
    for url in broker_urls(setting):
        params = pika.URLParameters(url)
        try:
            with socket.create_connection((params.host, params.port), timeout=timeout):
                return True
        except OSError:
            continue
    return False
