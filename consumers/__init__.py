"""The four stages, each run by the same consumer runtime: `reportflow consume STAGE`.

The stage modules are imported when first asked for (STAGES, bindings()), so that `reportflow` commands
that run no stage do not load the renderer and the database layer."""

from __future__ import annotations

from importlib import import_module

STAGE_NAMES = ("creation", "generation", "approval", "notification")


def __getattr__(name: str):
    if name == "STAGES":
        stages = {stage: import_module(f"reportflow.consumers.{stage}").STAGE for stage in STAGE_NAMES}
        globals()["STAGES"] = stages
        return stages
    raise AttributeError(f"module 'consumers' has no attribute {name!r}")


def bindings() -> dict[str, list[str]]:
    """Which event types each stage's queue receives."""
    from reportflow.consumers import STAGES

    return {name: stage.event_types for name, stage in STAGES.items()}
