"""duopool.common.tasks.TaskSet: background tasks held until done, cancelled together at stop."""

import asyncio

import pytest

from duopool.common.tasks import TaskSet

pytestmark = pytest.mark.unit


def test_tasks_are_held_until_done_and_closed_together():
    async def main():
        ts = TaskSet()
        done = asyncio.Event()
        quick = ts.spawn(asyncio.sleep(0))
        slow = ts.spawn(done.wait())
        assert len(ts) == 2
        await quick
        await asyncio.sleep(0)
        assert len(ts) == 1 and list(ts) == [slow]  # a finished task is let go
        await ts.close()
        assert slow.cancelled() and len(ts) == 0
        ts.spawn(asyncio.sleep(0.01))
        await ts.wait()  # waits without cancelling
        assert len(ts) == 0

    asyncio.run(main())
