"""What a stage is: a name, the handlers it runs for each event type, and what it can tell the runtime
about a message (what operators filter on, where a follow-up event's trace lives). Nothing about
brokers or spans."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field


def dependency_names(handler: Callable) -> list[str]:
    """What a handler needs besides (message, uow), named by its parameters: the bootstrap provides them."""
    return list(inspect.signature(handler).parameters)[2:]


@dataclass(frozen=True)
class Stage:
    name: str
    # event type -> handler(event, uow, **dependencies)
    handlers: dict[str, Callable]
    # event type -> handler(invalid_message, uow, **dependencies), for messages that cannot be read;
    # a type with no entry here sends such messages to the dead-letter queue with the reasons.
    on_invalid: dict[str, Callable] = field(default_factory=dict)
    # message -> {"approval.stage": ..., ...}: the business facts operators filter on, for its process span.
    describe: Callable[[object], dict] | None = None
    # timer event type -> handler(event, uow, **dependencies), for what handlers set with uow.schedule(); these
    # types are fired by the stage's timer poller and never bound to its queue.
    timers: dict[str, Callable] = field(default_factory=dict)
    # (message, session) -> the stored trace context of what the message is about, when it may arrive
    # in another trace (a decision days later): the message is then processed in that trace.
    stored_trace: Callable[[object, object], dict | None] | None = None
    # Whether the runtime may handle several of its messages in one transaction under a backlog: not a
    # stage whose handler takes long (a PDF render), which would hold the batch's transaction open.
    batch: bool = True
    # Whether its handlers wait on nothing but the database (no SMTP server, no render): the runtime then
    # has no other waits to overlap with worker threads, and handles its batches on the I/O thread.
    waits_only_on_database: bool = False

    @property
    def event_types(self) -> list[str]:
        return sorted(self.handlers)

    @property
    def all_handlers(self) -> list[Callable]:
        return [*self.handlers.values(), *self.on_invalid.values(), *self.timers.values()]

    @property
    def dependencies(self) -> set[str]:
        return {name for handler in self.all_handlers for name in dependency_names(handler)}
