"""Kernel files read whole, on the real kernel: a file the kernel generates record by
record (mountinfo) hands out one page of records per read, so a short first read is not
its end. A container's mountinfo over a page lost its memory mount, and the tool planned
from the host's memory instead of the pod's limit (found by tests/image/test_kube_play.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgroup_util import KernelCgroup
from dask_safe_worker.cgroup.files import KeptFiles, read_kernel_text

pytestmark = pytest.mark.kernel

PAGE = os.sysconf("SC_PAGE_SIZE")
# Each tmpfs mount adds a line of some 100 bytes to mountinfo.
MOUNTS = 3 * PAGE // 60

HOLD_MOUNTS = """\
set -eu
for i in $(seq "$2"); do
    mkdir "$1/m$i"
    mount -t tmpfs -o size=4k dsw-read-test "$1/m$i"
done
echo ready
exec sleep 600
"""


def _read_to_end(path: str) -> bytes:
    chunks = []
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(PAGE):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def long_mountinfo(tmp_path: Path) -> Iterator[str]:
    """/proc/<pid>/mountinfo of a process in a mount namespace of our own whose mountinfo
    spans several pages (the mounts vanish with the namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI"):
            pytest.fail("needs root and unshare", pytrace=False)
        pytest.skip("needs root and unshare")
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            HOLD_MOUNTS,
            "hold-mounts",
            str(tmp_path),
            str(MOUNTS),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"ready"
        yield f"/proc/{holder.pid}/mountinfo"
    finally:
        holder.kill()
        holder.wait()


def test_a_mountinfo_over_several_pages_is_read_whole(long_mountinfo: str) -> None:
    whole = _read_to_end(long_mountinfo)
    assert len(whole) > 2 * PAGE
    assert whole.count(b"dsw-read-test") == MOUNTS
    assert read_kernel_text(long_mountinfo).encode("utf-8", "surrogateescape") == whole


def test_a_kept_mountinfo_is_read_whole_every_time(long_mountinfo: str) -> None:
    whole = _read_to_end(long_mountinfo)
    kept = KeptFiles()
    try:
        assert kept.read(long_mountinfo) == whole
        assert kept.read(long_mountinfo) == whole
    finally:
        kept.close()


MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


@pytest.mark.kernel
def test_a_kept_pid_list_shows_a_process_that_joined_since(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # cgroup v1 hands an open cgroup.procs's first pid list out again to every read
    # within a second of the last: a watch ticking every second never saw a new worker,
    # nor lost its OOM victim (gone_pids stayed empty in CI).
    def sleeper() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(kernel_cgroup.enter_command(["sleep", "60"]))
        started_pids.add(proc.pid)
        return proc

    procs = kernel_cgroup.path / "cgroup.procs"
    first = sleeper()
    try:
        wait_for_pids(kernel_cgroup, {first.pid})
        with KeptFiles():
            assert read_kernel_text(procs).split() == [str(first.pid)]
            second = sleeper()
            try:
                wait_for_pids(kernel_cgroup, {first.pid, second.pid})
                assert set(read_kernel_text(procs).split()) == {str(first.pid), str(second.pid)}
            finally:
                second.kill()
                second.wait()
    finally:
        first.kill()
        first.wait()


def wait_for_pids(cg: KernelCgroup, pids: set[int]) -> None:
    """Until every pid is in the cgroup, as its own /proc/<pid>/cgroup says: a fresh
    read of cgroup.procs would renew the kernel's shared pid list for the kept one."""
    import time

    rel = "/" + str(cg.path.relative_to(MEMORY_ROOT))
    deadline = time.monotonic() + 10
    while not all(f"memory:{rel}\n" in Path(f"/proc/{p}/cgroup").read_text() for p in pids):
        assert time.monotonic() < deadline, pids
        time.sleep(0.02)
