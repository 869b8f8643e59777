"""Concurrency safety with Prefect global concurrency limits.

* Per target: ``target_lock(engine, target)`` holds the limit
  ``strongroom-target-<engine>-<target>`` (1 slot), so two backups (or a backup and a
  restore) of the same target never run at once, wherever they were started (schedule,
  fleet, UI, CLI). A second run waits up to ``wait_s`` seconds, then fails with
  :class:`~strongroom.errors.Conflict` (exit code 9) naming the target.
* Per engine and per database host: ``strongroom-engine-<engine>`` and
  ``strongroom-host-<host>``, used by the backup fleet (flows/fleet.py) through
  :func:`hold_slots`, which asks again every ``poll_s`` seconds while they are full
  (Prefect's own wait sleeps for the server's Retry-After, up to 30 s, while the slot
  may already be free).

Slots are leases: if the holder dies (pod evicted, process killed), the lease expires
after ``LEASE_S`` seconds and the target is free again. The limits appear under
Concurrency in the Prefect UI, where an operator can see who holds what or change a limit.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
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
# How often hold_slots asks again for full limits (seconds).
SLOT_POLL_S = 0.5
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


def _locked(exc: BaseException) -> bool:
    """Whether a slot acquisition failed because the limit is full (HTTP 423)."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return getattr(response, "status_code", None) == 423


@asynccontextmanager
async def hold_slots(
    names: list[str], *, poll_s: float = SLOT_POLL_S, wait_s: float | None = None
) -> AsyncIterator[float]:
    """Hold one slot of each limit in ``names`` (all or none) while the block runs; yields
    the seconds waited. While any is full it asks again every ``poll_s`` seconds (with
    jitter); after ``wait_s`` seconds (None: never) it raises TimeoutError."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.asyncio import concurrency

    started = time.monotonic()
    while True:
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(
                    concurrency(names, lease_duration=LEASE_S, strict=True, max_retries=0)
                )
            except ConcurrencySlotAcquisitionError as exc:
                if not _locked(exc):
                    raise
                waited = time.monotonic() - started
                if wait_s is not None and waited >= wait_s:
                    raise TimeoutError(f"limits {names} stayed full for {waited:.0f} s") from None
                await asyncio.sleep(poll_s * random.uniform(0.8, 1.2))  # noqa: S311
                continue
            yield time.monotonic() - started
            return
