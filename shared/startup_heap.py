"""What a long-lived reportflow process built to start (modules, schemas, engines, templates, its
dependencies) lives as long as the process. Left to the cyclic collector, every full collection walks all
of it: 65-150 ms on a stage process, every few seconds under load, and so the p99 of whatever arrived
meanwhile (docs/performance.md). Frozen after one collection, it is never walked again; a full collection
walks only what the work made."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Call once, when the process is built and before it takes work."""
    gc.collect()
    gc.freeze()
