"""What each consumer process is doing, for `reportflow status`: every process writes a small JSON
file under <storage>/status, and the command reads them beside the broker's queue depths."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

STATUS_INTERVAL_SECONDS = 5


class StatusFile(threading.Thread):
    """snapshot() says what the process is doing (connected, messages settled, ...), as a dict."""

    def __init__(self, storage_dir: Path, stage: str, snapshot, provider):
        super().__init__(name="status-file", daemon=True)
        self.path = Path(storage_dir) / "status" / f"{stage}-{os.getpid()}.json"
        self.stage, self.snapshot, self.provider = stage, snapshot, provider
        self.started_at = time.time()

    def run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.write()
            time.sleep(STATUS_INTERVAL_SECONDS)

    def write(self) -> None:
        status = {
            "stage": self.stage,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            **self.snapshot(),
            "spans": self.provider.stats.snapshot() if self.provider is not None else None,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.path)


def read_status_files(storage_dir: Path, stale_after: float = 3 * STATUS_INTERVAL_SECONDS) -> list[dict]:
    """The processes that wrote lately, alive or not (a missing process shows as stale)."""
    found = []
    for path in sorted((Path(storage_dir) / "status").glob("*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        status["stale"] = time.time() - status.get("updated_at", 0) > stale_after
        found.append(status)
    return found
