"""How many threads to use: the cores that are free now, not all of them.

On a small machine another busy process turns an OpenMP region with one thread per core into a
crawl (a thread that waits at a barrier for a descheduled partner spins through its time slice:
17x slower was measured on 2 cores with one of them taken). :func:`free_cores` reads how busy the
CPUs are over a short window (``/proc/stat`` on Linux, the load average elsewhere) and
:func:`use_free_cores` sets torch's thread count to it, so a shared machine degrades in proportion.
"""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def free_cores(window: float = 0.25) -> int:
    """Cores not busy with other work, measured over ``window`` seconds (at least 1)."""
    total = usable_cores()
    first = _cpu_times()
    if first is not None:
        time.sleep(window)
        second = _cpu_times()
        if second is not None and second[0] > first[0]:
            busy = 1.0 - (second[1] - first[1]) / (second[0] - first[0])
            busy_cores = busy * (os.cpu_count() or total)
            return max(1, min(total, int(round(total - busy_cores))))
    try:
        return max(1, min(total, int(round(total - os.getloadavg()[0]))))
    except OSError:
        return total


def use_free_cores(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` or, when None, to :func:`free_cores`; returns the count."""
    import torch

    n = requested if requested is not None else free_cores()
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()
