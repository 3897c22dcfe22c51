"""How many CPU cores this process may really use: its affinity mask, and a container's CPU limit.

``docker run --cpus 4``, Kubernetes CPU limits and systemd ``CPUQuota`` do not shrink the affinity
mask: they cap CPU time with the cgroup's CFS quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``). A
process that sizes its thread pools from the host's cores then runs many more threads than the
quota allows and is throttled every period: onnxruntime's own default does exactly that. The thread
plan (:func:`wsi_pipeline.inference.scoring.thread_plan`) sizes the session from :func:`cpu_limit`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuLimit:
    """``cores``: what the process may use, at least 1; ``affinity``: CPUs in its affinity mask;
    ``quota``: the tightest cgroup CPU quota in CPUs (1.5 = one and a half), None when unlimited."""

    cores: int
    affinity: int
    quota: float | None = None

    def describe(self) -> str:
        """For the run manifest: where ``cores`` comes from."""
        if self.quota is None or self.cores == self.affinity:
            return f"{self.affinity} CPUs in the affinity mask"
        return f"cgroup CPU quota of {self.quota:g} CPUs ({self.affinity} CPUs in the affinity mask)"


@functools.lru_cache(maxsize=1)
def cpu_limit() -> CpuLimit:
    """This process's :class:`CpuLimit` (read once per process)."""
    try:
        cgroups = Path("/proc/self/cgroup").read_text()
    except OSError:  # not Linux
        cgroups = ""
    return limit_from(_affinity(), cgroups, CGROUP_ROOT)


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, cut to its container's CPU quota."""
    return cpu_limit().cores


def limit_from(affinity: int, proc_cgroup: str, root: Path) -> CpuLimit:
    """:class:`CpuLimit` from the text of ``/proc/self/cgroup`` and the cgroup file systems under
    ``root``: the smallest quota of the process's cgroup and its ancestors (a parent's limit binds its
    children), rounded down to whole cores (a thread per core of quota keeps clear of throttling)."""
    quotas = [q for q in (_v2_quota(proc_cgroup, root), _v1_quota(proc_cgroup, root)) if q is not None]
    quota = min(quotas) if quotas else None
    cores = affinity if quota is None else max(1, min(affinity, math.floor(quota + 1e-9)))
    return CpuLimit(cores, affinity, quota)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _candidates(mount: Path, path: str) -> list[Path]:
    """The cgroup folder of ``path`` under ``mount`` and its ancestors, then ``mount`` itself (in a
    container the process's own cgroup is usually mounted at the root, whatever its path says)."""
    folder = mount / path.lstrip("/")
    out = [folder, *folder.parents]
    return [p for p in out if p == mount or mount in p.parents] or [mount]


def _v2_quota(proc_cgroup: str, root: Path) -> float | None:
    path = next((ln[3:] for ln in proc_cgroup.splitlines() if ln.startswith("0::")), None)
    if path is None:
        return None
    mount = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
    found = []
    for folder in _candidates(mount, path):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and float(period) > 0:
            found.append(float(quota) / float(period))
    return min(found) if found else None


def _v1_quota(proc_cgroup: str, root: Path) -> float | None:
    path = None
    for ln in proc_cgroup.splitlines():
        parts = ln.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            path = parts[2]
    if path is None:
        return None
    found = []
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        mount = root / name
        if not mount.is_dir():
            continue
        for folder in _candidates(mount, path):
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                found.append(quota / period)
        break
    return min(found) if found else None
