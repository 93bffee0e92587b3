"""The four stages, each run by the same consumer runtime: `reportflow consume STAGE`."""
from consumers import approval, creation, generation, notification
from consumers.stage import Stage

STAGES: dict[str, Stage] = {s.STAGE.name: s.STAGE for s in (creation, generation, approval, notification)}


def bindings() -> dict[str, list[str]]:
    """Which event types each stage's queue receives."""
    return {name: stage.event_types for name, stage in STAGES.items()}
