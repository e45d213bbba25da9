"""Stolen CPU time from /proc/stat: parsed from the aggregate line, as a share of the ticks in between."""

from __future__ import annotations

from rayops.cpu_steal import CpuTimes, read_cpu_times, steal_fraction


def test_the_aggregate_line_gives_total_and_steal_ticks(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 20 800 10 0 5 60 0 0\ncpu0 50 2 10 400 5 0 2 30 0 0\n")
    assert read_cpu_times(stat) == CpuTimes(total=1000, steal=60)
    stat.write_text("intr 1 2 3\n")
    assert read_cpu_times(stat) is None
    assert read_cpu_times(tmp_path / "missing") is None


def test_steal_fraction_is_the_share_of_elapsed_ticks():
    assert steal_fraction(CpuTimes(1000, 60), CpuTimes(2000, 360)) == 0.3
    assert steal_fraction(CpuTimes(1000, 60), CpuTimes(1000, 60)) is None
    assert steal_fraction(None, CpuTimes(1000, 60)) is None


def test_this_machine_reads_or_says_it_cannot():
    times = read_cpu_times()
    assert times is None or 0 <= times.steal <= times.total
