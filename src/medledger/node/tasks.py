"""The node's background tasks (replication, the sweep of expired uploads), supervised: a task
that crashes — or returns, which a background task never should — is logged and started again
after a pause that grows while it keeps crashing, so one bad input cannot silently stop a
node's replication for good. Each task's state is in `/health` and in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("medledger.tasks")

# A task that ran this long before crashing restarts after the shortest pause again.
STABLE_SECONDS = 60.0


class TaskObserver(Protocol):
    def task_state(self, name: str, alive: bool, restarted: bool) -> None: ...


@dataclass
class TaskState:
    name: str
    alive: bool = False
    restarts: int = 0
    last_error: str = ""
    last_crash: float = 0.0  # Unix time
    started: float = 0.0  # Unix time of the current (or last) start


class Supervisor:
    def __init__(
        self,
        observer: TaskObserver | None = None,
        first_pause: float = 1.0,
        max_pause: float = 60.0,
    ) -> None:
        self._observer = observer
        self._first_pause = first_pause
        self._max_pause = max_pause
        self._states: dict[str, TaskState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` as the background task `name`, restarting it whenever it ends."""
        if name in self._tasks:
            raise ValueError(f"task {name} is already supervised")
        self._states[name] = TaskState(name)
        self._notify(name, restarted=False)
        self._tasks[name] = asyncio.create_task(self._keep(name, run), name=name)

    def state(self, name: str) -> TaskState:
        return self._states[name]

    def status(self) -> dict[str, dict[str, Any]]:
        """Each task: alive, restarts, and the last error (type and message, no content)."""
        return {
            s.name: {
                "alive": s.alive,
                "restarts": s.restarts,
                "last_error": s.last_error,
                "last_crash": s.last_crash,
            }
            for s in self._states.values()
        }

    @property
    def all_alive(self) -> bool:
        return all(s.alive for s in self._states.values())

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        state = self._states[name]
        crashes_in_a_row = 0
        while True:
            state.alive = True
            state.started = time.time()
            self._notify(name, restarted=False)
            try:
                await run()
                error = "returned (a background task must run until stopped)"
            except asyncio.CancelledError:
                state.alive = False
                self._notify(name, restarted=False)
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            state.alive = False
            state.restarts += 1
            state.last_error = error
            state.last_crash = time.time()
            crashes_in_a_row = (
                1 if state.last_crash - state.started > STABLE_SECONDS else (crashes_in_a_row + 1)
            )
            pause = min(self._first_pause * 2 ** min(crashes_in_a_row - 1, 20), self._max_pause)
            log.error(
                "background task crashed; restarting it",
                extra={"task": name, "error": error, "restarts": state.restarts, "pause": pause},
            )
            self._notify(name, restarted=True)
            await asyncio.sleep(pause)

    def _notify(self, name: str, restarted: bool) -> None:
        if self._observer is not None:
            state = self._states[name]
            self._observer.task_state(name, state.alive, restarted)
