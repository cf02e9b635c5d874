"""Work the API and the CLI leave for the workers as procrastinate jobs, deferred by name.

The workers register the tasks (worker.testsend); this side knows only their names, so
api/ and bin/ defer jobs without importing worker/.
"""

from __future__ import annotations

from typing import Any, cast

import procrastinate

QUEUE = "pgcast"  # the queue the workers' procrastinate worker listens to
TEST_SEND = "pgcast.test_send"  # args: ids (test_sends ids)


def _app(url: str) -> procrastinate.App:
    return procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=url, min_size=1, max_size=1))


async def defer_test_send(url: str, ids: list[int]) -> int:
    """Leave one pgcast.test_send job for the workers; returns the job id."""
    app = _app(url)
    async with app.open_async():
        task = app.configure_task(name=TEST_SEND, queue=QUEUE)
        job_id: int = await task.defer_async(ids=cast(Any, ids))
    return job_id
