"""Who handles a stage's deliveries once the I/O thread has them: worker threads, each taking what is
waiting when it is free, or the I/O thread itself after each round of I/O (BatchPlan.on_io_thread: no
hand-off for a message handled alone). The consumer's loop asks the same two questions of either."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from reportflow.consumers.runtime.batching import BatchPlan

IO_ROUND_SECONDS = 0.25  # the longest a round of I/O waits for input


class WorkerThreads:
    def __init__(self, work: Callable[[], None], threads: int, stage_name: str):
        self._work = work
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{stage_name}-worker")
        self.described = f"{threads} worker threads"

    def delivered(self) -> None:
        self._executor.submit(self._work)

    def round_seconds(self, waiting: bool) -> float:
        return IO_ROUND_SECONDS

    def after_round(self) -> None:
        pass

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class OnIoThread:
    described = "handled on the I/O thread"

    def __init__(self, work: Callable[[], None]):
        self._work = work

    def delivered(self) -> None:
        pass  # handled after this round of I/O

    def round_seconds(self, waiting: bool) -> float:
        return 0 if waiting else IO_ROUND_SECONDS  # deliveries left: take in what else came, without waiting

    def after_round(self) -> None:
        self._work()

    def shutdown(self) -> None:
        pass


def dispatch_for(plan: BatchPlan, work: Callable[[], None], stage_name: str) -> WorkerThreads | OnIoThread:
    return OnIoThread(work) if plan.on_io_thread else WorkerThreads(work, plan.worker_threads, stage_name)
