"""What a stage is: a name and the handlers it runs for each event type. Nothing about brokers or spans."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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
