"""What a stage is: a name and the handlers it runs for each event type. Nothing about brokers or spans."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable


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

    @property
    def event_types(self) -> list[str]:
        return sorted(self.handlers)

    @property
    def all_handlers(self) -> list[Callable]:
        return [*self.handlers.values(), *self.on_invalid.values()]

    @property
    def dependencies(self) -> set[str]:
        return {name for handler in self.all_handlers for name in dependency_names(handler)}
