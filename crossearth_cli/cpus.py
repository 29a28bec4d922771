"""How many CPUs this process may use: its affinity (``taskset``, a batch scheduler's CPU
set) capped by a cgroup CPU quota (``docker --cpus``, a Kubernetes CPU limit).

``os.cpu_count()`` counts the machine's CPUs whatever the process may use; threads sized by it
in a container limited to 2 CPUs of 64 are throttled, and wait on one another.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        n = min(n, math.ceil(quota))  # --cpus 1.5: two threads, each throttled a little
    return max(1, n)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, own: str | None = None) -> float | None:
    """The CPUs the process's cgroup may use per period (quota / period), the tightest over
    its cgroup and those above it; None without a quota. ``own``: the text of
    ``/proc/self/cgroup`` (read when None)."""
    if own is None:
        try:
            own = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    found = []
    for line in own.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: cpu.max = "QUOTA PERIOD"
            for folder in _up_from(root, path):
                found.append(_quota_v2(folder / "cpu.max"))
        elif "cpu" in controllers.split(","):  # cgroup v1: cfs_quota_us / cfs_period_us
            for folder in _up_from(root / "cpu", path) + _up_from(root / "cpu,cpuacct", path):
                found.append(_quota_v1(folder))
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _up_from(base: Path, path: str) -> list[Path]:
    """``base/path`` and each folder above it up to ``base`` (a container sees its own
    cgroup as ``/``)."""
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
