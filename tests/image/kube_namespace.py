"""A namespace where `podman kube play` may put its pods: whatever it creates stays below
a test cgroup of our own.

Podman 4.3's `kube play` has no `--cgroup-parent`: with cgroupfs, every pod's cgroup is
`/libpod_parent/<pod>` from the root of each hierarchy it finds under `/sys/fs/cgroup`,
which on the host would be the host's root. So podman runs here (through `nsenter`) in a
mount namespace of the test's own where `/sys/fs/cgroup` is a fresh tmpfs, and each v1
hierarchy in it is a bind mount of a cgroup the test created:

- memory: a test cgroup below our own memory cgroup (`cgroup_util.make_test_cgroup`);
- every other v1 controller (runc refuses to start without `devices`, sets the pod's CPU
  limit in `cpu`, and podman makes and removes the pod's cgroup in blkio, cpuset and
  pids too): the same path as the memory test cgroup in that hierarchy, as
  `podman_engine.CgroupParent` makes for every container of the image suite. What did not
  exist before is recorded and removed, deepest first.

Named hierarchies (`name=systemd`) and cgroup2 are left out, so runc and podman see a
plain v1 host. The same namespace has its own network namespace (loopback only, where the
pods' bridge lives and nothing routes out), its own `/run` (podman's network namespaces
for the pods live in `/run/netns`) and its own `/etc/hosts`, which stands in for the
Services: `dask-scheduler` is the scheduler pod's fixed address on the test's network.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONTROLLERS = Path("/sys/fs/cgroup")

# Run by `unshare --mount --net --propagation private` as the holder's pid. Arguments: the
# staging directory, the hosts and resolv.conf files, then NAME=SOURCE per hierarchy.
# Sources are bound first (they are reachable only through the host's mounts), the host's
# cgroup mounts are unmounted in this namespace only, and the binds are moved into place,
# so the namespace's mount table lists exactly our cgroups.
NAMESPACE_SCRIPT = """\
set -eu
staging=$1 hosts=$2 resolv=$3
shift 3
for pair in "$@"; do
    mkdir "$staging/${pair%%=*}"
    mount --bind "${pair#*=}" "$staging/${pair%%=*}"
done
for m in $(awk '$5 ~ "^/sys/fs/cgroup/" {print $5}' /proc/self/mountinfo | sort -r); do
    umount "$m"
done
umount /sys/fs/cgroup
mount -t tmpfs -o mode=755,size=1m dsw-kube-cgroup /sys/fs/cgroup
for pair in "$@"; do
    mkdir "/sys/fs/cgroup/${pair%%=*}"
    mount --move "$staging/${pair%%=*}" "/sys/fs/cgroup/${pair%%=*}"
done
mount --bind "$hosts" /etc/hosts
mount --bind "$resolv" /etc/resolv.conf
mount -t tmpfs -o mode=755 dsw-kube-run /run
mkdir /run/netns
ip link set lo up
echo ready
exec sleep 3600
"""


def v1_hierarchies(mountinfo: str) -> dict[str, Path]:
    """Each v1 controller hierarchy mounted at its root, by its mount point's name (pure).
    Named hierarchies (`name=...`, no controller) and cgroup2 are left out."""
    found: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3 or post_fields[0] != "cgroup" or fields[3] != "/":
            continue
        options = post_fields[2].split(",")
        if any(o.startswith("name=") for o in options):
            continue
        point = Path(fields[4].replace("\\040", " "))
        found[point.name] = point
    return found


@dataclass
class Mirrors:
    """Cgroups made at one path in every non-memory hierarchy; `remove` takes them away."""

    binds: dict[str, Path] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)

    def remove(self) -> list[Path]:
        """Remove what we created, deepest first; returns what could not be removed."""
        left = []
        for top in reversed(self.created):
            for sub in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
            if top.exists():
                left.append(top)
        return left


def _copy_cpuset(parent: Path, child: Path) -> None:
    # A new cpuset cgroup has no CPUs and no memory nodes, and no process may join it
    # until it has both: take the parent's.
    for name in ("cpuset.cpus", "cpuset.mems"):
        (child / name).write_text((parent / name).read_text())


def mirror(hierarchies: Mapping[str, Path], memory_cgroup: Path, relative: str) -> Mirrors:
    """The memory test cgroup as the memory bind, the same path made in every other
    hierarchy (only what did not exist is recorded as ours)."""
    mirrors = Mirrors()
    for name, mount in hierarchies.items():
        if name == "memory":
            mirrors.binds[name] = memory_cgroup
            continue
        current = mount
        for part in Path(relative).parts:
            child = current / part
            if not child.exists():
                child.mkdir()
                mirrors.created.append(child)
                if (child / "cpuset.cpus").exists():
                    _copy_cpuset(current, child)
            current = child
        mirrors.binds[name] = current
    return mirrors


@dataclass
class Namespace:
    """The holder of the mount and network namespaces (a `sleep` we started)."""

    holder: subprocess.Popen[bytes]

    def enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv]


def resolved_resolv_conf() -> str:
    # The host's file may be a link into /run, which the namespace replaces.
    with contextlib.suppress(OSError):
        return Path("/etc/resolv.conf").read_text()
    return ""


@contextlib.contextmanager
def namespace(
    scratch: Path, memory_cgroup: Path, relative: str, hosts: Mapping[str, str]
) -> Iterator[Namespace]:
    hierarchies = v1_hierarchies(Path("/proc/self/mountinfo").read_text())
    assert "memory" in hierarchies and "devices" in hierarchies, hierarchies
    mirrors = mirror(hierarchies, memory_cgroup, relative)
    holder: subprocess.Popen[bytes] | None = None
    try:
        (scratch / "staging").mkdir()
        (scratch / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in hosts.items())
        )
        (scratch / "resolv.conf").write_text(resolved_resolv_conf())
        holder = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--net",
                "--propagation",
                "private",
                "sh",
                "-c",
                NAMESPACE_SCRIPT,
                "dsw-kube-namespace",
                str(scratch / "staging"),
                str(scratch / "hosts"),
                str(scratch / "resolv.conf"),
                *(f"{n}={p}" for n, p in sorted(mirrors.binds.items())),
            ],
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if line.strip() != b"ready":
            holder.wait(30)
            raise RuntimeError(f"the namespace did not come up: exit {holder.returncode}")
        yield Namespace(holder)
    finally:
        if holder is not None and holder.poll() is None:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        # The namespace is gone with its last process; its cgroups may need a moment
        # before the last task has left them.
        deadline = time.monotonic() + 10
        while mirrors.remove() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in mirrors.created if p.exists()]
        assert not left, f"cgroups left behind: {left}"
