"""A loop on a thread of its own, beside the connection and the workers (the outbox relay, the timer
poller): started with the consumer, stopped with it, never keeping the process alive."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Runs the subclass's _run on a daemon thread; _run waits on _stopping between rounds and returns
    once it is set."""

    def __init__(self, thread_name: str):
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError
