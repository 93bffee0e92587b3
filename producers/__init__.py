"""What upstream systems use to talk to reportflow: a kombu-based client and `reportflow publish`."""

from reportflow.producers.client import InvalidEvent, MessageTooLarge, PublishedEvent, ReportflowClient, Unroutable

__all__ = ["ReportflowClient", "PublishedEvent", "InvalidEvent", "MessageTooLarge", "Unroutable"]
