"""Threads are sized by the CPUs the process may use: affinity and a cgroup CPU quota."""

from __future__ import annotations

import torch

from crossearth_cli import cpus
from crossearth_cli.cpus import available_cpus, cgroup_cpu_quota


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_up_the_tree(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "kube" / "cpu.max", "400000 100000\n")
    _write(tmp_path / "kube" / "pod" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(tmp_path, own="0::/kube/pod\n") == 1.5
    assert cgroup_cpu_quota(tmp_path, own="0::/kube\n") == 4.0
    assert cgroup_cpu_quota(tmp_path, own="0::/\n") is None  # "max": no quota


def test_cgroup_v1_quota(tmp_path):
    _write(tmp_path / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    own = "5:memory:/docker\n4:cpu,cpuacct:/docker\n1:name=systemd:/docker\n"
    assert cgroup_cpu_quota(tmp_path, own=own) == 2.0
    assert cgroup_cpu_quota(tmp_path, own="4:cpu,cpuacct:/\n") is None  # -1: no quota
    assert cgroup_cpu_quota(tmp_path / "missing", own=own) is None


def test_available_cpus_takes_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda root: None)
    assert available_cpus() == 16
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda root: 1.5)  # docker --cpus 1.5
    assert available_cpus() == 2
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3
    assert available_cpus() == 1


def test_torch_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    from crossearth_cli import engine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for cores, want in ((16, 16 - 4 // 2), (1, 1)):  # 16: a core left to 4 I/O threads
            monkeypatch.setattr(engine, "available_cpus", lambda c=cores: c)
            torch.set_num_threads(8)
            engine.configure_cpu_threads(torch.device("cpu"), io_threads=4)
            assert torch.get_num_threads() == want, cores
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's word stands
        torch.set_num_threads(8)
        engine.configure_cpu_threads(torch.device("cpu"), io_threads=4)
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
