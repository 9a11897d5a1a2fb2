"""The runc harness itself: what a container sees, and where its cgroup lives."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from oci import Container, MiB, worker_entrypoint_argv

pytestmark = pytest.mark.container

# Blocks until the test creates /tmp/stop, so that the test can look from outside.
HOLD = "while [ ! -e /tmp/stop ]; do sleep 0.05; done"


def test_bundle_has_the_namespaces_and_cgroup_path_we_promise(
    make_container: Callable[..., Container],
) -> None:
    c = make_container(["true"])
    config = c.config
    assert sorted(ns["type"] for ns in config["linux"]["namespaces"]) == [
        "cgroup",
        "ipc",
        "mount",
        "pid",
        "uts",
    ]
    assert not Path(config["linux"]["cgroupsPath"]).is_absolute()
    assert config["root"]["readonly"] is True
    cgroupfs = next(m for m in config["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert "ro" in cgroupfs["options"]


def test_container_sees_its_limit_at_the_cgroupfs_root_read_only(
    make_container: Callable[..., Container],
) -> None:
    c = make_container(
        [
            "sh",
            "-c",
            "echo pid=$$; grep memory /proc/self/cgroup;"
            " cat /sys/fs/cgroup/memory/memory.limit_in_bytes;"
            " echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes; echo write=$?;"
            f" {HOLD}; exit 3",
        ],
        memory_limit=512 * MiB,
    )
    c.start()
    c.wait_running()  # also checks that the cgroup lies below ours
    assert int((c.host_cgroup_dir / "memory.limit_in_bytes").read_text()) == 512 * MiB
    (c.shared / "stop").touch()
    assert c.wait() == 3
    lines = c.stdout().splitlines()
    assert lines[0] == "pid=1"
    assert lines[1].endswith(":memory:/")
    assert int(lines[2]) == 512 * MiB
    assert lines[3] == "write=2"
    assert "Read-only file system" in c.stderr()


def test_rw_cgroupfs_lets_the_container_lower_its_own_limit(
    make_container: Callable[..., Container],
) -> None:
    c = make_container(
        [
            "sh",
            "-c",
            f"echo {256 * MiB} > /sys/fs/cgroup/memory/memory.limit_in_bytes"
            f" && touch /tmp/written && {HOLD}",
        ],
        memory_limit=512 * MiB,
        cgroupfs_rw=True,
    )
    c.start()
    c.wait_running()
    from time import monotonic, sleep

    deadline = monotonic() + 60
    assert c.proc is not None
    while not (c.shared / "written").exists() and monotonic() < deadline and c.proc.poll() is None:
        sleep(0.05)
    assert (c.shared / "written").exists(), c.stderr()
    assert int((c.host_cgroup_dir / "memory.limit_in_bytes").read_text()) == 256 * MiB
    (c.shared / "stop").touch()
    assert c.wait() == 0


def test_venv_is_visible_inside_and_writable_tmp(
    make_container: Callable[..., Container],
) -> None:
    c = make_container(
        [
            "python",
            "-c",
            "import sys, dask_safe_worker, json;"
            "open('/tmp/out', 'w').write(json.dumps([sys.prefix, dask_safe_worker.__file__]))",
        ],
    )
    assert c.run() == 0, c.stderr()
    prefix, module = json.loads((c.shared / "out").read_text())
    assert prefix == sys.prefix
    assert module.endswith("dask_safe_worker/__init__.py")


def test_non_root_user_runs_the_venv(make_container: Callable[..., Container]) -> None:
    c = make_container(
        [
            "sh",
            "-c",
            "id -u > /tmp/uid && grep CapEff /proc/self/status >> /tmp/uid"
            " && exec python -c 'import dask_safe_worker'",
        ],
        uid=1000,
        gid=1000,
    )
    assert c.run() == 0, c.stderr()
    uid, cap = (c.shared / "uid").read_text().splitlines()
    assert uid == "1000"
    assert cap.split()[1] == "0000000000000000"


def test_harness_runs_the_images_entrypoint(make_container: Callable[..., Container]) -> None:
    """Image and harness cannot drift: the container runs the Dockerfile's ENTRYPOINT."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from artifacts_util import DOCKERFILE, dockerfile_entrypoint_argv

    args = ["--dry-run", "--memory-limit", "300MiB", "tcp://127.0.0.1:1"]
    c = make_container(worker_entrypoint_argv(args), memory_limit=512 * MiB)
    assert c.config["process"]["args"] == dockerfile_entrypoint_argv(DOCKERFILE, args)
    assert c.run() == 0, c.stderr()
    plan = json.loads(c.stdout())
    # The venv's entry point ran (found on PATH, as in the image) and planned from inside.
    assert plan["argv"] == [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        "--memory-limit",
        "300MiB",
        "tcp://127.0.0.1:1",
    ]
    assert plan["measurement"]["cgroup_path"] == "/"
