"""Background tasks a service starts and does not await at once (calls off the token path, clean-ups,
effects applied over gRPC): held until done — asyncio keeps only weak references to running tasks — and
cancelled together at stop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Runs ``coro`` in a task of its own, held here until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def add(self, task: asyncio.Task) -> None:
        """Holds a task started elsewhere until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancels the tasks still running and waits for them to end."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self) -> None:
        """Waits for the tasks running now to end (without cancelling them)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task]:
        return iter(list(self._tasks))
