"""entrypoints/kubernetes played by a real engine: `podman kube play` (Debian's podman 4.3).

The scheduler manifest (scheduler.yaml) runs as written; the workers' Deployment
(deployment.yaml) runs as written except for two things podman 4.3 does not do as the
kubelet does: it does not expand `$(POD_NAME)` in `args` (the test expands it, as the
kubelet would, to the pod's name), and it starts every replica on this one host (the test
plays one). The Helm values run as the dask chart lays out its worker container (args,
resources, env; `artifacts_util.helm_worker_args`).

Where the pods run: kube_namespace.py (a mount and network namespace of the test's own,
where every cgroup podman makes is below a test cgroup, and `dask-scheduler` is the
scheduler pod's fixed address on an internal bridge network that routes nowhere).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_namespace import Namespace, namespace
from podman_engine import (
    HANG_GUARD_S,
    REPO,
    Built,
    Engine,
    audit_events,
    memory_mount,
    own_memory_cgroup,
)

from artifacts_util import helm_worker_args
from cgroup_util import KernelCgroup, make_test_cgroup

pytestmark = pytest.mark.image

GiB = 2**30
K8S = REPO / "entrypoints" / "kubernetes"
NETWORK = "dsw-kube"
SUBNET = "10.89.231.0/24"
# The scheduler pod's address: what the Service `dask-scheduler` would resolve to.
SCHEDULER_IP = "10.89.231.10"
SCHEDULER_CONTAINER = "dask-scheduler-pod-0-scheduler"

# Asks the scheduler, from inside its own container, for each worker's name and Dask
# memory limit once `n` workers are there (n = 0: as they are now).
WORKERS_PROBE = """
import json, sys
from distributed import Client
with Client("tcp://127.0.0.1:8786", timeout=30) as c:
    if int(sys.argv[1]):
        c.wait_for_workers(int(sys.argv[1]), timeout=120)
    info = c.scheduler_info()["workers"]
    print(json.dumps({str(w["name"]): w["memory_limit"] for w in info.values()}))
"""


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


@dataclass
class Kube:
    engine: Engine
    ns: Namespace
    cgroup: KernelCgroup
    scratch: Path

    def podman(
        self, *args: str, check: bool = True, timeout: float = HANG_GUARD_S
    ) -> subprocess.CompletedProcess[str]:
        return self.engine.podman(*args, check=check, timeout=timeout, enter=self.ns.enter)

    def play(self, manifest: Path, *options: str) -> None:
        self.podman("kube", "play", "--network", NETWORK, *options, str(manifest))

    def play_logged(self, manifest: Path) -> Path:
        """Play a manifest of one container whose log outlives it (kube down removes the
        container and podman's own log with it)."""
        log = self.scratch / f"{manifest.stem}.log"
        self.play(manifest, "--log-opt", f"path={log}")
        return log

    def logs(self, container: str) -> str:
        result = self.podman("logs", container, check=False)
        return result.stdout + result.stderr

    def workers(self, n: int) -> dict[str, int]:
        """Each worker's name and Dask memory limit, as the scheduler has them."""
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            result = self.podman(
                "exec", SCHEDULER_CONTAINER, "python", "-c", WORKERS_PROBE, str(n), check=False
            )
            if result.returncode == 0:
                probed: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
                return probed
            assert time.monotonic() < deadline, result.stderr
            time.sleep(1)

    def wait_no_workers(self) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while self.workers(0):
            assert time.monotonic() < deadline, "the scheduler still lists a worker"
            time.sleep(1)

    def memory_dir(self, container: str) -> Path:
        """The container's memory cgroup as the host sees it: below the test cgroup."""
        pid = int(self.podman("inspect", "--format", "{{.State.Pid}}", container).stdout)
        mount = memory_mount()
        assert mount is not None
        path = mount / own_memory_cgroup(Path(f"/proc/{pid}/cgroup").read_text()).lstrip("/")
        assert path.is_relative_to(self.cgroup.path), path
        return path

    def down(self, manifest: Path, pod: str, container: str, log: Path, grace: int) -> str:
        """The pod stopped as Kubernetes stops it (SIGTERM, `grace` seconds, SIGKILL), then
        `podman kube down`, which must exit 0; the container must have exited 0 (the
        engine's events say). Returns the container's whole log.

        `podman pod stop` first: podman 4.3's `kube down` stops with a timeout of 0, a
        SIGKILL at once (exit 137; podman issue 22397, fixed upstream in 2024)."""
        self.podman("pod", "stop", "--time", str(grace), pod)
        logger = self.podman("info", "--format", "{{.Host.EventLogger}}").stdout.strip()
        assert logger == "file", logger
        self.podman("kube", "down", str(manifest))
        died = self.podman(
            "events",
            "--stream=false",
            "--filter",
            f"container={container}",
            "--filter",
            "event=died",
            "--format",
            "{{.ContainerExitCode}}",
        ).stdout.split()
        codes = [int(code) for code in died]
        # k8s-file lines: "<time> <stream> <F|P> <text>".
        output = "\n".join(line.split(" ", 3)[-1] for line in log.read_text().splitlines())
        assert codes == [0], f"exit codes {codes}:\n{output[-3000:]}"
        return output


def pod_cgroups(cgroup: KernelCgroup) -> list[Path]:
    """Every directory below the test cgroup but podman's (empty) `libpod_parent`."""
    return sorted(p for p in cgroup.path.rglob("*") if p.is_dir() and p.name != "libpod_parent")


def libpod_parents_on_the_host() -> list[Path]:
    """`libpod_parent` directories at the root of every hierarchy, where podman 4.3's
    `kube play` puts pods when nothing stops it."""
    return sorted(p for p in Path("/sys/fs/cgroup").glob("*/libpod_parent"))


@pytest.fixture(scope="module")
def kube(podman: Engine, built: Built) -> Iterator[Kube]:
    """The namespace, the network, the manifests' image name on our image, and the
    scheduler from scheduler.yaml, played as written."""
    images = {
        c["image"]
        for doc in [
            *yaml_documents(K8S / "deployment.yaml"),
            *yaml_documents(K8S / "scheduler.yaml"),
        ]
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    }
    (image,) = images
    # imagePullPolicy IfNotPresent: the engine takes the local image by the manifests' name.
    podman.podman("tag", built.image, image)
    host_parents = libpod_parents_on_the_host()
    mount = memory_mount()
    assert mount is not None
    try:
        with make_test_cgroup(prefix="dsw-kube") as cgroup:
            scratch = Path(tempfile.mkdtemp(prefix="dsw-kube-"))
            relative = str(cgroup.path.relative_to(mount))
            try:
                with namespace(
                    scratch, cgroup.path, relative, {"dask-scheduler": SCHEDULER_IP}
                ) as ns:
                    k = Kube(podman, ns, cgroup, scratch)
                    k.podman("network", "create", "--internal", "--subnet", SUBNET, NETWORK)
                    try:
                        k.play(K8S / "scheduler.yaml", "--ip", SCHEDULER_IP)
                        yield k
                        k.podman("kube", "down", str(K8S / "scheduler.yaml"))
                    finally:
                        k.podman("pod", "rm", "--all", "--force", check=False)
                        k.podman("network", "rm", "--force", NETWORK, check=False)
                        # The emptyDir's volume, where a test ended before its down.
                        k.podman("volume", "prune", "--force", check=False)
                    assert pod_cgroups(cgroup) == []
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        podman.podman("untag", built.image, image, check=False)
    # Nothing of podman's at the host's roots (what kube play does without the namespace).
    assert libpod_parents_on_the_host() == host_parents == []


def events_by_name(output: str) -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in audit_events(output):
        by_name.setdefault(str(event.get("event")), []).append(event)
    return by_name


def worker_deployment_as_played(scratch: Path) -> tuple[Path, str]:
    """deployment.yaml with one replica and `$(POD_NAME)` expanded as the kubelet would
    (podman 4.3 passes it on literally); the file and the pod's name."""
    (document,) = yaml_documents(K8S / "deployment.yaml")
    pod = f"{document['metadata']['name']}-pod-0"
    document["spec"]["replicas"] = 1
    (container,) = document["spec"]["template"]["spec"]["containers"]
    assert "$(POD_NAME)" in container["args"]
    container["args"] = [pod if a == "$(POD_NAME)" else a for a in container["args"]]
    path = scratch / "deployment.yaml"
    path.write_text(yaml.safe_dump(document))
    return path, pod


def test_deployment_worker_registers_within_the_pod_limit_follows_and_goes_down_clean(
    kube: Kube,
) -> None:
    (document,) = yaml_documents(K8S / "deployment.yaml")
    (spec,) = document["spec"]["template"]["spec"]["containers"]
    pod_limit = k8s_quantity(spec["resources"]["limits"]["memory"])
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    manifest, pod = worker_deployment_as_played(kube.scratch)
    container = f"{pod}-{spec['name']}"
    kube.wait_no_workers()
    log = kube.play_logged(manifest)
    directory = kube.memory_dir(container)
    try:
        (limit,) = kube.workers(1).items()
        assert limit[0] == pod
        # The kernel limit is the engine's, from resources.limits.memory.
        assert int((directory / "memory.limit_in_bytes").read_text()) == pod_limit
        events = events_by_name(kube.logs(container))
        (measured,) = events["measure.done"]
        assert measured["cgroup_version"] == 1 and measured["limiting"] != "host", measured
        (plan,) = events["plan.made"]
        nanny = events["cli.started"][0]["options"]["nanny_allowance"]
        assert limit[1] == plan["per_worker"]
        assert plan["per_worker"] + nanny <= pod_limit
        # The engine's limit is below the plan, so it stands: nothing is written (and the
        # engine mounts the cgroupfs read-only anyway).
        (outcome,) = events["cgroup.write.outcome"]
        assert outcome["written"] is False, outcome
        print(f"\ncgroup.write.outcome: {outcome['reason']}, enforced {outcome['enforced']}")
        # readOnlyRootFilesystem and the emptyDir at /tmp, as the worker sees them.
        probe = "touch /probe; echo root=$?; touch /tmp/probe && echo tmp=0"
        seen = kube.podman("exec", container, "sh", "-c", probe).stdout.split()
        assert seen == ["root=1", "tmp=0"], seen
        (started,) = events["follow.started"]
        # /run is part of the read-only root: the plan file and the pool are in /tmp.
        (written,) = events["plan.file.written"]
        assert written["path"].startswith("/tmp/"), written

        # In-place resize: the engine lowers the container's limit; --follow moves the
        # worker's Dask limit below it.
        lowered = pod_limit // 2
        (directory / "memory.limit_in_bytes").write_text(str(lowered))
        deadline = time.monotonic() + HANG_GUARD_S
        while kube.workers(1)[pod] == limit[1]:
            assert time.monotonic() < deadline, kube.logs(container)[-3000:]
            time.sleep(1)
        now = kube.workers(1)[pod]
        assert now + nanny <= lowered
        events = events_by_name(kube.logs(container))
        (replanned,) = events["follow.replanned"]
        assert replanned["new_budget"] <= lowered < replanned["old_budget"], replanned
        assert events["follow.applied"][-1]["per_worker"] == now
        # The level that moved is the pod's own, from the engine's limit to the new one.
        changed = events["follow.changed"][-1]
        (level,) = changed["levels"]
        assert (level["old_limit"], level["new_limit"]) == (pod_limit, lowered), level
        assert changed["reason"] == "limit changed", changed
        print(f"\nfollow: {started['per_worker']} -> {now} (pod limit {pod_limit} -> {lowered})")
    finally:
        grace = document["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        output = kube.down(manifest, pod, container, log, grace)
    (ended,) = events_by_name(output)["init.exit"]
    assert ended["code"] == 0, output[-3000:]
    # distributed may log a traceback of its own while the connection closes (a heartbeat
    # in flight); none may come from our code.
    assert not re.findall(r'File "[^"]*/dask_safe_worker/', output), output[-3000:]
    # The scheduler saw it leave; the pod's cgroups are gone.
    kube.wait_no_workers()
    assert not directory.parent.exists()


def helm_worker_deployment(scratch: Path) -> tuple[Path, str]:
    """The dask chart's worker Deployment for helm-values.yaml, one replica: the chart's
    container (no `command`, its args, resources and env); the file and the container."""
    (values,) = yaml_documents(K8S / "helm-values.yaml")
    worker = values["worker"]
    labels = {"app": "dask", "component": "worker"}
    container = {
        "name": "dask-worker",
        "image": f"{worker['image']['repository']}:{worker['image']['tag']}",
        "imagePullPolicy": worker["image"]["pullPolicy"],
        "args": helm_worker_args(values),
        "resources": worker["resources"],
        "env": worker["env"],
    }
    document = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "dask-worker"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }
    path = scratch / "helm-worker.yaml"
    path.write_text(yaml.safe_dump(document))
    return path, "dask-worker-pod-0-dask-worker"


def test_helm_values_worker_registers_with_the_clamped_limit_and_goes_down_clean(
    kube: Kube,
) -> None:
    (values,) = yaml_documents(K8S / "helm-values.yaml")
    pod_limit = k8s_quantity(values["worker"]["resources"]["limits"]["memory"])
    manifest, container = helm_worker_deployment(kube.scratch)
    kube.wait_no_workers()
    log = kube.play_logged(manifest)
    directory = kube.memory_dir(container)
    try:
        (limit,) = kube.workers(1).values()
        assert int((directory / "memory.limit_in_bytes").read_text()) == pod_limit
        events = events_by_name(kube.logs(container))
        (plan,) = events["plan.made"]
        # The chart passes the whole pod limit as --memory-limit; --clamp-memory-limit
        # lowers it to the plan, which leaves the nanny its room.
        assert plan["user_memory_limit_bytes"] == pod_limit and plan["user_fits"] is False
        nanny = events["cli.started"][0]["options"]["nanny_allowance"]
        assert limit == plan["per_worker"] and limit + nanny <= pod_limit
    finally:
        # The chart sets no terminationGracePeriodSeconds: Kubernetes' default.
        output = kube.down(manifest, "dask-worker-pod-0", container, log, 30)
    (ended,) = events_by_name(output)["init.exit"]
    assert ended["code"] == 0, output[-3000:]
    kube.wait_no_workers()
    assert not directory.parent.exists()
