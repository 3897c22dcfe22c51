"""The thread plan counts the cores a container's CPU limit leaves, not the host's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from wsi_pipeline.cores import limit_from

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "cores", "quota"),
    [
        ("150000 100000\n", 8, 1, 1.5),  # docker --cpus 1.5: one thread per whole core of quota
        ("400000 100000\n", 64, 4, 4.0),  # --cpus 4 on a 64-core host
        ("400000 100000\n", 2, 2, 4.0),  # the affinity mask is tighter
        ("50000 100000\n", 8, 1, 0.5),  # under one CPU: still one
        ("max 100000\n", 16, 16, None),  # no limit
    ],
)
def test_cgroup_v2_quota_caps_the_cores(
    tmp_path: Path, cpu_max: str, affinity: int, cores: int, quota: float | None
) -> None:
    _write(tmp_path, "cpu.max", cpu_max)  # a container: its own cgroup is mounted at the root
    limit = limit_from(affinity, "0::/\n", tmp_path)
    assert (limit.cores, limit.affinity, limit.quota) == (cores, affinity, quota)


def test_a_parent_cgroup_limit_binds_its_children(tmp_path: Path) -> None:
    _write(tmp_path, "kubepods/pod1/cpu.max", "200000 100000\n")
    _write(tmp_path, "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    limit = limit_from(32, "0::/kubepods/pod1/ctr\n", tmp_path)
    assert (limit.cores, limit.quota) == (2, 2.0)
    assert limit.describe() == "cgroup CPU quota of 2 CPUs (32 CPUs in the affinity mask)"


def test_cgroup_v1_quota_at_the_mount_root_of_a_container(tmp_path: Path) -> None:
    # Docker on cgroup v1 without a cgroup namespace: /proc says /docker/<id>, the container sees
    # its own cgroup at the mount root
    _write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "300000\n")
    _write(tmp_path, "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert limit_from(48, proc, tmp_path).cores == 3
    _write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # unlimited
    limit = limit_from(48, proc, tmp_path)
    assert (limit.cores, limit.quota) == (48, None)
    assert limit.describe() == "48 CPUs in the affinity mask"


def test_no_cgroup_files_means_the_affinity_mask(tmp_path: Path) -> None:
    assert limit_from(6, "", tmp_path).cores == 6
    assert limit_from(6, "0::/user.slice\n", tmp_path).cores == 6  # a host's root has no cpu.max


def _cpu_cgroup_v1() -> Path | None:
    """A fresh child of this process's cgroup v1 cpu controller, where the machine lets us make one."""
    base = Path("/sys/fs/cgroup/cpu")
    if not (base / "cpu.cfs_quota_us").exists():
        return None
    child = base / f"wsi-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
        (child / "cpu.cfs_quota_us").write_text("100000")  # one CPU
    except OSError:
        if child.exists():
            child.rmdir()
        return None
    return child


def test_a_run_in_a_one_cpu_cgroup_gives_the_session_one_thread(tmp_path: Path) -> None:
    """Real cgroup, real slide: what `docker run --cpus 1` does to the process, on any host."""
    if len(os.sched_getaffinity(0)) == 1:
        pytest.skip("one core in the affinity mask: one session thread with or without the quota")
    cg = _cpu_cgroup_v1()
    if cg is None:
        pytest.skip("cannot create a cgroup v1 cpu child here (needs root and a writable /sys/fs/cgroup/cpu)")
    try:
        code = f"import os; open({str(cg / 'cgroup.procs')!r}, 'w').write(str(os.getpid())); "
        code += "from wsi_pipeline.cli import main; main()"
        out = tmp_path / "s.tif"
        res = subprocess.run(
            [sys.executable, "-c", code, str(SAMPLE), "--out", str(out), "-q"], capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        cg.rmdir()  # empty again: the run has ended
    assert res.returncode == 0, res.stderr
    plan = json.loads(out.with_suffix(".run.json").read_text())["thread_plan"]
    assert plan["session_threads"] == 1 and plan["cores"] == 1
    assert plan["cores_from"].startswith("cgroup CPU quota of 1 CPUs")
