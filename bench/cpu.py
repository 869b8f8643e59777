"""CPU accounting around a sample, to tell a slow tool from a busy machine.

Per sample: CPU used by the whole host (/proc/stat), by the PostgreSQL server (postmaster
plus its children, including exited backends and archive-push commands), and by the tool
itself (from wait4). What is left is CPU used by everything else on the machine: when it
is large, that sample was disturbed by other work.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _host_ticks() -> tuple[int, int]:
    """(busy, steal) ticks of all CPUs since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal, steal


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] is the state (field 3)


def _children(pid: int) -> list[list[str]]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(fields)
    return found


def _tree_ticks(pid: int) -> int:
    """CPU of ``pid`` and its reaped children, plus its live direct children (and theirs).

    A child reaped during the /proc scan would be missed (neither live nor yet in the
    parent's cutime), so the scan is repeated until the parent's cutime did not move."""
    for _ in range(20):
        before = _stat_fields(pid)
        if before is None:
            return 0
        children = _children(pid)
        after = _stat_fields(pid)
        if after is None:
            return 0
        if after[11:15] == before[11:15]:
            # utime, stime, cutime, cstime are fields 14-17
            return sum(int(x) for x in after[11:15]) + sum(
                int(x) for fields in children for x in fields[11:15]
            )
    raise RuntimeError(f"CPU accounting of process {pid} did not settle")


@dataclass
class CpuSnapshot:
    host_busy: int
    steal: int
    server: int


class CpuMeter:
    """Snapshots before/after a sample; ``server_pid`` is the postmaster's PID."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        # the server's own processes (checkpointer, walwriter, archiver...), no clients
        self.baseline = len(_children(server_pid)) if server_pid else 0

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the previous sample's backends have exited and been reaped."""
        if not self.server_pid:
            return
        deadline = time.monotonic() + timeout
        while len(_children(self.server_pid)) > self.baseline and time.monotonic() < deadline:
            time.sleep(0.02)

    def snapshot(self) -> CpuSnapshot:
        busy, steal = _host_ticks()
        server = _tree_ticks(self.server_pid) if self.server_pid else 0
        return CpuSnapshot(busy, steal, server)

    def delta(self, before: CpuSnapshot, tool_cpu_s: float | None) -> dict[str, float]:
        after = self.snapshot()
        host = (after.host_busy - before.host_busy) / CLK_TCK
        server = (after.server - before.server) / CLK_TCK
        result = {
            "host_busy_cpu_s": host,
            "postgres_cpu_s": server,
            "steal_s": (after.steal - before.steal) / CLK_TCK,
        }
        if tool_cpu_s is not None:
            result["other_cpu_s"] = max(0.0, host - server - tool_cpu_s)
        return result


def host_busy_fraction(window: float) -> float:
    """Share of all CPUs busy over the next ``window`` seconds (0..1)."""
    start, _ = _host_ticks()
    time.sleep(window)
    end, _ = _host_ticks()
    return (end - start) / CLK_TCK / (window * (os.cpu_count() or 1))


def wait_quiet(threshold: float, window: float = 0.5, timeout: float = 30.0) -> tuple[float, float]:
    """Wait until other work on the host uses less than ``threshold`` of its CPUs (this
    benchmark is idle between samples). Returns (seconds waited, last busy fraction)."""
    start = time.monotonic()
    while True:
        busy = host_busy_fraction(window)
        waited = time.monotonic() - start
        if busy < threshold or waited >= timeout:
            return waited, busy


def is_disturbed(sample: dict[str, object], limit: float) -> bool:
    """True when other work used more than ``limit`` of the host's CPUs during a sample."""
    other = sample.get("other_cpu_s")
    wall = sample.get("wall_s")
    if not isinstance(other, float) or not isinstance(wall, float) or wall <= 0:
        return False
    return other > max(0.2, limit * wall * (os.cpu_count() or 1))


def current_priority(pid: int) -> tuple[int, int | None]:
    """(process nice, autogroup nice or None) of ``pid``, to restore them later."""
    group: int | None = None
    with contextlib.suppress(OSError, IndexError, ValueError):
        group = int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])
    return os.getpriority(os.PRIO_PROCESS, pid), group


def restore_priority(pid: int, saved: tuple[int, int | None]) -> None:
    nice, group = saved
    with contextlib.suppress(OSError):
        if group is not None:
            Path(f"/proc/{pid}/autogroup").write_text(str(group))
        os.setpriority(os.PRIO_PROCESS, pid, nice)


def prioritize(pid: int, nice: int) -> list[str]:
    """Give ``pid`` (and, with autogroup scheduling, its whole session) CPU priority over
    unrelated work on a shared machine: ``nice`` for the process (inherited by the
    processes it starts later), and the same nice for its autogroup, because with
    ``kernel.sched_autogroup_enabled`` a process's nice only counts within its session.
    Returns what could not be applied (empty if all was)."""
    problems = []
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as exc:
        problems.append(f"setpriority({pid}, {nice}): {exc}")
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        try:
            autogroup.write_text(str(nice))
        except OSError as exc:
            problems.append(f"{autogroup}: {exc}")
    return problems
