"""Concurrency safety with Prefect global concurrency limits.

* Per target: ``target_lock(engine, target)`` holds the limit
  ``strongroom-target-<engine>-<target>`` (1 slot), so two backups (or a backup and a
  restore) of the same target never run at once, wherever they were started (schedule,
  fleet, UI, CLI). A second run waits up to ``wait_s`` seconds, then fails with
  :class:`~strongroom.errors.Conflict` (exit code 9) naming the target.
* Per engine and per database host: ``strongroom-engine-<engine>`` and
  ``strongroom-host-<host>``, used by the backup fleet (flows/fleet.py).

Slots are leases: if the holder dies (pod evicted, process killed), the lease expires
after ``LEASE_S`` seconds and the target is free again. The limits appear under
Concurrency in the Prefect UI, where an operator can see who holds what or change a limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import (
    AsyncExitStack,
    ExitStack,
    asynccontextmanager,
    contextmanager,
    suppress,
)

from strongroom.errors import Conflict

LEASE_S = 120.0
# How long a second run of the same target waits before giving up (seconds).
DEFAULT_WAIT_S = float(os.environ.get("STRONGROOM_LOCK_WAIT_S", "1800"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:100] or "x"


def target_limit_name(engine: str, target: str) -> str:
    return f"strongroom-target-{_slug(engine)}-{_slug(target)}"


def engine_limit_name(engine: str) -> str:
    return f"strongroom-engine-{_slug(engine)}"


def host_limit_name(host: str) -> str:
    return f"strongroom-host-{_slug(host)}"


async def ensure_limit(name: str, limit: int, *, update: bool = False) -> None:
    """Create the global concurrency limit if missing; with ``update``, also set its size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            current = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # ObjectAlreadyExists: a concurrent run created it meanwhile
            with suppress(ObjectAlreadyExists):
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
            return
        if (update and current.limit != limit) or not current.active:
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
            )


def _conflict(engine: str, target: str, wait_s: float | None) -> Conflict:
    waited = f"waited {wait_s:g} s" if wait_s is not None else "gave up"
    return Conflict(
        f"another backup or restore of {engine} target {target!r} is in progress "
        f"(Prefect concurrency limit {target_limit_name(engine, target)!r} is held); "
        f"{waited}. Retry when it has finished, or see Concurrency in the Prefect UI."
    )


@asynccontextmanager
async def atarget_lock(
    engine: str, target: str, *, wait_s: float | None = DEFAULT_WAIT_S
) -> AsyncIterator[None]:
    """Async form of :func:`target_lock`."""
    from prefect.concurrency.asyncio import concurrency

    name = target_limit_name(engine, target)
    await ensure_limit(name, 1)
    async with AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(
                concurrency(name, timeout_seconds=wait_s, lease_duration=LEASE_S, strict=True)
            )
        except TimeoutError:
            raise _conflict(engine, target, wait_s) from None
        yield


@contextmanager
def target_lock(
    engine: str, target: str, *, wait_s: float | None = DEFAULT_WAIT_S
) -> Iterator[None]:
    """Hold the target's slot while the block runs (one run per target at a time).

    Waits up to ``wait_s`` seconds (None: forever) for a run already holding it, then
    raises Conflict. Use around the work of a backup or restore flow::

        with target_lock("postgresql", target):
            manifest = engine_backup(...)
    """
    from prefect.concurrency.sync import concurrency
    from prefect.utilities.asyncutils import run_coro_as_sync

    name = target_limit_name(engine, target)
    run_coro_as_sync(ensure_limit(name, 1))
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, timeout_seconds=wait_s, lease_duration=LEASE_S, strict=True)
            )
        except TimeoutError:
            raise _conflict(engine, target, wait_s) from None
        yield
