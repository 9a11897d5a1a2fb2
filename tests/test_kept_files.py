"""The watch's kept-open kernel files, on this host's real cgroup v1 tree.

A descriptor kept between ticks must give what a fresh open gives: the value now (the
kernel generates the file anew at offset 0), and for a cgroup that was removed the same
error. Nothing may stay open that a tick no longer reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cgroup_util import KernelCgroup
from dask_safe_worker.cgroup.files import KeptFiles, read_kernel_text

pytestmark = [pytest.mark.kernel]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_kept_file_is_read_anew_each_time(kernel_cgroup: KernelCgroup) -> None:
    limit = str(kernel_cgroup.path / "memory.limit_in_bytes")
    kept = KeptFiles()
    try:
        kernel_cgroup.set_limit(512 * 2**20)
        with kept:
            first = int(read_kernel_text(limit))
        opened = open_fds()
        kernel_cgroup.set_limit(256 * 2**20)
        with kept:
            second = int(read_kernel_text(limit))
        assert (first, second) == (512 * 2**20, 256 * 2**20)
        assert open_fds() == opened  # the same descriptor, read again
    finally:
        kept.close()


def test_a_removed_cgroup_fails_as_a_fresh_open_would(kernel_cgroup: KernelCgroup) -> None:
    child = kernel_cgroup.child("gone")
    usage = str(child.path / "memory.usage_in_bytes")
    before = open_fds()
    kept = KeptFiles()
    with kept:
        assert int(read_kernel_text(usage)) >= 0
    assert open_fds() == before + 1
    child.path.rmdir()
    with kept, pytest.raises(FileNotFoundError):
        read_kernel_text(usage)
    assert open_fds() == before  # the stale descriptor was closed, none opened


def test_a_file_no_tick_reads_is_closed(kernel_cgroup: KernelCgroup) -> None:
    files = [str(kernel_cgroup.path / n) for n in ("memory.usage_in_bytes", "memory.stat")]
    before = open_fds()
    kept = KeptFiles()
    with kept:
        for f in files:
            read_kernel_text(f)
    assert open_fds() == before + 2
    with kept:
        read_kernel_text(files[0])
    assert open_fds() == before + 1
    kept.close()
    assert open_fds() == before
    # Outside a tick nothing is kept.
    read_kernel_text(files[0])
    assert open_fds() == before


def test_one_short_read_is_the_whole_kernel_file(
    kernel_cgroup: KernelCgroup, tmp_path: Path
) -> None:
    """A read shorter than the buffer ends the file (no end-of-file read after it); a
    full buffer is read on: each gives what a buffered read to the end gives."""
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 1000)  # 256000 bytes: several full buffers
    paths = [
        "/proc/meminfo",
        "/proc/self/mountinfo",
        f"/proc/{os.getpid()}/status",
        str(kernel_cgroup.path / "memory.stat"),
        str(big),
    ]
    for path in paths:
        for kept in (None, KeptFiles()):
            if kept is None:
                got = read_kernel_text(path)
            else:
                with kept:
                    read_kernel_text(path)
                    got = read_kernel_text(path)
                kept.close()
            with open(path, "rb") as f:
                expected = f.read().decode("utf-8", "surrogateescape")
            if path.endswith(("meminfo", "status", "memory.stat")):
                # Counters move between two reads: the same lines and keys, whole.
                assert [ln.split()[0] for ln in got.splitlines()] == [
                    ln.split()[0] for ln in expected.splitlines()
                ], path
                assert got.endswith("\n"), path
            else:
                assert got == expected, path
