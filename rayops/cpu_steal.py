"""CPU time the host took from this machine (`steal` in /proc/stat): on a shared VM it explains a slow wall clock
that the load average does not (a quiet-looking VM can lose a third of its CPU to its neighbours)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate CPU ticks of all cores: the total and the part stolen by the hypervisor."""

    total: int
    steal: int


def read_cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """The aggregate `cpu` line of /proc/stat (None where there is none, e.g. off Linux)."""
    try:
        first = path.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu" or len(first) < 9:
        return None
    ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    return CpuTimes(total=sum(ticks), steal=ticks[7])


def steal_fraction(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Share of CPU time stolen between two readings (0..1), or None without both readings or elapsed ticks."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)
