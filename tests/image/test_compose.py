"""docker/compose.yaml brought up by podman-compose (Debian's package) on podman.

The file's bridge network needs netavark, aardvark-dns and iptables rules, and netavark
turns on IP forwarding: all of that happens in a network namespace the test creates (held
by a `sleep` it started), so the host's firewall and sysctls are never touched, and nothing
in there routes out. The compose file is used as it is; only what podman-compose passes on
to every `podman run` is added: the cgroup parent below this test's own memory cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from podman_engine import REPO, Built, Engine, audit_events, memory_mount, own_memory_cgroup

pytestmark = pytest.mark.image

GiB = 2**30
HANG_GUARD_S = 180.0
COMPOSE_FILE = REPO / "docker" / "compose.yaml"

# Asks the scheduler, from inside its own container, for each worker's name, Dask memory
# limit and the nanny's pid, once both workers are there.
WORKERS_PROBE = """
import json
from distributed import Client
with Client("tcp://127.0.0.1:8786", timeout=30) as c:
    c.wait_for_workers(2, timeout=120)
    info = c.scheduler_info()["workers"]
    print(json.dumps({w["id"]: w["memory_limit"] for w in info.values()}))
"""


@pytest.fixture
def netns() -> Iterator[int]:
    """A network namespace of our own, held open by a process we started; its pid."""
    if shutil.which("iptables") is None:
        reason = "netavark needs iptables for compose's bridge network (scripts/test.sh)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "3600"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare --net did not take effect"
            time.sleep(0.05)
        subprocess.run(
            ["nsenter", f"--target={holder.pid}", "--net", "--", "ip", "link", "set", "lo", "up"],
            check=True,
        )
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def compose_argv(podman: Engine, project: str, *command: str) -> list[str]:
    return [
        "podman-compose",
        "--project-name",
        project,
        "--file",
        str(COMPOSE_FILE),
        *(f"--podman-args={a}" for a in podman.argv()[1:]),
        f"--podman-run-args=--cgroup-parent={podman.run_parent.path}",
        *command,
    ]


def in_netns(pid: int, argv: list[str]) -> list[str]:
    return ["nsenter", f"--target={pid}", "--net", "--", *argv]


def test_compose_file_brings_up_both_workers_with_the_limits_it_promises(
    podman: Engine, built: Built, netns: int
) -> None:
    project = f"dsw-{uuid.uuid4().hex[:8]}"
    env = {
        **podman.env(),
        "DASK_SAFE_WORKER_IMAGE": built.image,
        # What entrypoints/host-prestart.sh would have written to docker/.env.
        "DASK_WORKER_MEM_LIMIT": str(GiB),
    }

    def compose(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            in_netns(netns, compose_argv(podman, project, *command)),
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            check=False,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    try:
        compose("up", "--detach", "--no-build")
        names = {
            service: f"{project}_{service}_1"
            for service in ("scheduler", "worker-host-sized", "worker-self-sized")
        }
        probe = probe_workers(podman, names["scheduler"])
        assert len(probe) == 2, probe

        host_sized = container_facts(podman, names["worker-host-sized"])
        self_sized = container_facts(podman, names["worker-self-sized"])

        # (a) The runtime set the kernel limit from outside; inside, the plan left the nanny
        # its room below it and wrote nothing.
        assert host_sized["kernel_limit"] == GiB
        plan = host_sized["events"]["plan.made"]
        assert plan["available"] <= GiB
        limit = probe[host_sized["worker_address"]]
        assert limit == plan["per_worker"]
        assert limit + int(host_sized["nanny_allowance"]) <= GiB
        assert host_sized["events"]["cgroup.write.outcome"]["written"] is False

        # (b) No limit from outside: the worker planned from what the container sees.
        plan = self_sized["events"]["plan.made"]
        assert probe[self_sized["worker_address"]] == plan["per_worker"]
        assert self_sized["kernel_limit"] > GiB

        # memswap_limit: podman-compose drops it (docs/containers.md says so), and podman
        # then allows as much swap again as the memory limit. `podman update` puts it
        # back to "no swap on top", as the file meant.
        memsw = host_sized["memsw_limit"]
        assert memsw in (GiB, 2 * GiB), memsw
        if memsw != GiB:
            podman.podman(
                "update", "--memory", str(GiB), "--memory-swap", str(GiB), host_sized["name"]
            )
            assert read_cgroup(host_sized["cgroup"], "memory.memsw.limit_in_bytes") == GiB
    finally:
        compose("down", "--timeout", "10", check=False)


def probe_workers(podman: Engine, scheduler: str) -> dict[str, int]:
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        result = podman.podman("exec", scheduler, "python", "-c", WORKERS_PROBE, check=False)
        if result.returncode == 0:
            probed: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
            return probed
        # The scheduler may still be starting.
        assert time.monotonic() < deadline, result.stderr
        time.sleep(1)


def read_cgroup(directory: Path, name: str) -> int | None:
    path = directory / name
    return int(path.read_text()) if path.exists() else None


def container_facts(podman: Engine, name: str) -> dict[str, Any]:
    pid = int(podman.podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
    cgroup = own_memory_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    assert cgroup.startswith(podman.run_parent.path + "/"), cgroup
    mount = memory_mount()
    assert mount is not None
    directory = mount / cgroup.lstrip("/")
    logs = podman.podman("logs", name)
    events = {e["event"]: e for e in audit_events(logs.stdout + logs.stderr) if "event" in e}
    # The worker's own address, as dask logs it and the scheduler lists it.
    address = next(
        line.split("Start worker at:")[1].strip()
        for line in (logs.stdout + logs.stderr).splitlines()
        if "Start worker at:" in line
    )
    return {
        "name": name,
        "cgroup": directory,
        "kernel_limit": read_cgroup(directory, "memory.limit_in_bytes"),
        "memsw_limit": read_cgroup(directory, "memory.memsw.limit_in_bytes"),
        "events": events,
        "nanny_allowance": events["cli.started"]["options"]["nanny_allowance"],
        "worker_address": address,
    }
