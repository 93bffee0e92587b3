"""What the benchmark's processes use, read from /proc: resident memory, CPU time, their descendants."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found + [g for c in found for g in descendants(c)]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process and its children (the render process), in MB."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process, all its threads, and of the children it has reaped (so a server's
    short-lived backends still count once they are gone); 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def pids_named(command: str) -> list[int]:
    """The processes whose command name is `command` (a server's: postgres, beam.smp)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == command:
                found.append(int(comm.parent.name))
        except OSError:
            pass
    return found


class CpuMeter:
    """The CPU spent between readings by the measured processes (with their children: Celery's pool) and by
    the servers they talk to, per message. A message handled alone costs more than one in a batch, and more
    again on a machine whose caches go cold between messages: this says how much, for both chains."""

    def __init__(self, pids: list[int]):
        self._groups: dict[str, Callable[[], list[int]]] = {
            "processes": lambda: [*pids, *(c for p in pids for c in descendants(p))],
            "postgresql": lambda: pids_named("postgres"),
            "rabbitmq": lambda: pids_named("beam.smp"),
        }
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        return {group: sum(cpu_seconds(p) for p in pids()) for group, pids in self._groups.items()}

    def per_message(self, messages: int) -> dict[str, float]:
        """Milliseconds of CPU per message of each group since the last reading (or the start)."""
        now = self._read()
        spent = {group: (now[group] - self._last[group]) * 1000 / max(1, messages) for group in now}
        self._last = now
        return spent
