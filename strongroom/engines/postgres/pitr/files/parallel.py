"""Running the tasks of one backup or restore ``jobs`` at a time in threads.

Both the copy of a data directory and its restore are many independent tasks (a file,
a part of a large file, a source of a mapped file) whose work happens mostly outside
the GIL (hashing, zstd, age, system calls). The first failure cancels the tasks not yet
started and is raised once the running ones have ended.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed


def run_all(tasks: list[Callable[[], None]], jobs: int, name: str) -> None:
    """Run ``tasks`` in order (``jobs`` <= 1) or ``jobs`` at a time."""
    if jobs <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix=name) as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
