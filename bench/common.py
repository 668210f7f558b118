"""Helpers the benchmark scripts share: the CPU's name and how busy the machine is while they time."""

from __future__ import annotations

import os
import platform
import sys


def log(msg: str) -> None:
    """Progress goes to stderr, so the table on stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds used by every process on the machine, by this one) so far; the first is NaN off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        everyone = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except OSError:
        everyone = float("nan")
    own = os.times()
    return everyone, own.user + own.system


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
