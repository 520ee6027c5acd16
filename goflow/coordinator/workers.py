"""The coordinator's view of connected workers: credits, tasks in hand, liveness.

A worker runs the tasks it holds in the order it received them, so the head of
``in_hand`` is the task running now; the coordinator infers start times from that and
needs no extra "started" message per task.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from goflow.coordinator.task import Task


@dataclass
class WorkerInfo:
    identity: bytes
    name: str
    credits: int
    labels: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    host: str | None = None
    local: bool = False
    in_hand: deque = field(default_factory=deque)
    last_seen: float = field(default_factory=time.monotonic)
    joined_at: float = field(default_factory=time.time)
    completed: int = 0
    draining: bool = False
    """The worker asked to leave (``drain``): it gets nothing new and finishes what it holds."""

    @property
    def control_identity(self) -> bytes:
        return self.identity + b".ctl"

    @property
    def free(self) -> int:
        return 0 if self.draining else self.credits - len(self.in_hand)

    def accepts(self, labels: dict[str, str]) -> bool:
        return all(self.labels.get(key) == value for key, value in labels.items())

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.name, "pid": self.pid, "host": self.host, "labels": self.labels,
                "credits": self.credits, "in_hand": len(self.in_hand), "completed": self.completed,
                "local": self.local, "joined_at": self.joined_at, "draining": self.draining}


class WorkerTable:
    """Workers by identity, and the choice of worker for each task."""

    def __init__(self) -> None:
        self.workers: dict[bytes, WorkerInfo] = {}

    def add(self, worker: WorkerInfo) -> None:
        self.workers[worker.identity] = worker

    def remove(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.pop(identity, None)

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.get(identity)

    def by_name(self, name: str) -> WorkerInfo | None:
        for worker in self.workers.values():
            if worker.name == name:
                return worker
        return None

    def pick(self, task: Task, *, depth: int, behind_s: float) -> WorkerInfo | None:
        """The least-loaded worker that accepts ``task``'s labels and holds fewer than
        ``depth`` tasks (and fewer than its credits).

        ``depth`` 1: only idle workers qualify, for a task expected to be long, which must
        not queue behind another task while a different worker may soon be free. A task
        queued behind others (``depth`` > 1) never waits behind one that may run long: a task
        not measured short, or one running for more than ``behind_s`` (a worker runs its
        tasks in order, so only the head can be running; a long task only enters an empty hand).
        """
        best: WorkerInfo | None = None
        best_free = 0
        now = 0.0
        for worker in self.workers.values():
            if worker.draining:
                continue
            free = min(worker.credits, depth) - len(worker.in_hand)
            if free <= 0 or (task.labels and not worker.accepts(task.labels)):
                continue
            if depth > 1 and worker.in_hand:
                head = worker.in_hand[0]
                if not head.short:
                    continue
                if head.started_at is not None:
                    now = now or time.monotonic()
                    if now - head.started_at > behind_s:
                        continue
            if free > best_free:
                best, best_free = worker, free
                if not worker.in_hand:
                    break
        return best

    def has_capacity(self) -> bool:
        return any(worker.free > 0 for worker in self.workers.values())

    def __len__(self) -> int:
        return len(self.workers)
