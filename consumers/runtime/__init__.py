"""The consumer runtime: runs any stage on RabbitMQ. Broker connection, threads, acknowledgements, the
inbox and outbox, tracing and dead letters live here, once, in a module each (see consumer.py), so that
stage handlers stay plain functions of (event, unit of work, dependencies)."""

from reportflow.consumers.runtime.consumer import Consumer
from reportflow.consumers.runtime.messages import Delivery, Outcome, OutgoingMessage
from reportflow.consumers.runtime.processing import Processor

__all__ = ["Consumer", "Delivery", "OutgoingMessage", "Outcome", "Processor"]
