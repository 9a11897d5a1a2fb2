"""A real one-node Slurm (munged, slurmctld, slurmd from Debian's packages) for the tests.

Everything lives in a temporary directory of its own: the munge key and socket, slurm.conf
and cgroup.conf, the state, spool and log files. The daemons listen on 127.0.0.1 only
(`CommunicationParameters=NoCtldInAddrAny,NoInAddrAny`; munged has only its Unix socket)
and are stopped by their pids.

Slurm's task/cgroup builds its own tree (`slurm_<node>/uid_<uid>/job_<id>/step_<s>/task_<t>`)
at the root of the memory hierarchy it finds at `CgroupMountpoint`. The host's root is not
ours to write, so slurmd runs in a mount namespace of its own (`unshare -m`, private
propagation) where `/sys/fs/cgroup` is a fresh tmpfs whose only cgroup mount is a test
cgroup below our own memory cgroup, bound at `/sys/fs/cgroup/memory`: whatever slurmd and
its slurmstepds make lands below that test cgroup, and no other controller is visible to
them. cgroup.conf asks for no controller but memory (`ConstrainCores=no`,
`ConstrainDevices=no`, `proctrack/pgid` instead of the freezer, no cgroup job
accounting). The jobs inherit that namespace, so a worker in a job sees its job's cgroups
as a container without a cgroup namespace sees its own: through a mount whose root is a
subdirectory of the hierarchy.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cgroup_util import KernelCgroup, kernel_cgroups_usable, make_test_cgroup, own_memory_cgroup

NODE = "dswnode"
PARTITION = "dsw"
# Declared to slurmctld (SlurmdParameters=config_overrides): several jobs of a few cores
# each fit on the node although the machine has fewer; memory is what the tests constrain.
NODE_CPUS = 8
NODE_MEMORY_MIB = 20000
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
CONTROLLERS = Path("/sys/fs/cgroup")


def slurm_usable() -> str | None:
    """None if a real Slurm can run here below our own cgroup, else why not."""
    missing = [p for p in (*PROGRAMS, "unshare", "mount") if shutil.which(p) is None]
    if missing:
        return f"not installed: {' '.join(missing)} (scripts/test.sh installs them)"
    return kernel_cgroups_usable()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Slurm:
    """A running one-node Slurm."""

    directory: Path
    conf: Path
    # The test cgroup mounted as slurmd's memory hierarchy: all of Slurm's cgroups are below.
    cgroup: KernelCgroup
    logs: Path
    # munged, slurmctld, slurmd (unshare and its shell exec it: the same pid).
    daemons: list[int]

    @property
    def env(self) -> dict[str, str]:
        """What the Slurm commands (sbatch, squeue, scancel) need to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str) -> str:
        result = subprocess.run(
            argv,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: exit {result.returncode}: {result.stderr}")
        return result.stdout

    def jobs(self) -> list[str]:
        """The ids of the jobs slurmctld still knows as pending, running or completing."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def job_cgroups(self) -> list[Path]:
        """Every `job_<id>` directory Slurm has below the test cgroup."""
        return sorted(self.cgroup.path.glob(f"slurm_{NODE}/uid_*/job_*"))

    def cgroups(self) -> list[Path]:
        """Every directory below the test cgroup."""
        return sorted(p for p in self.cgroup.path.rglob("*") if p.is_dir())


def _config(directory: Path, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=dswtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={directory}/plugstack.conf
ProctrackType=proctrack/pgid
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={NODE_CPUS} \
RealMemory={NODE_MEMORY_MIB} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainCores=no
ConstrainDevices=no
"""

# Run by `unshare -m --propagation private` as slurmd's pid: enters the test cgroup, then
# replaces every cgroup mount of this namespace by the test cgroup alone, then execs slurmd.
# The test cgroup is bound first (its path is reachable only through the host's mount),
# the host's cgroup mounts are unmounted in this namespace only, and the bind is moved
# into place, so that the namespace's mount table lists exactly one cgroup mount.
SLURMD_IN_NAMESPACE = """\
set -eu
cgroup=$1 staging=$2
shift 2
echo $$ > "$cgroup/cgroup.procs"
mount --bind "$cgroup" "$staging"
for m in $(awk '$5 ~ "^/sys/fs/cgroup/" {print $5}' /proc/self/mountinfo | sort -r); do
    umount "$m"
done
umount /sys/fs/cgroup
mount -t tmpfs -o mode=755,size=1m dsw-slurm-cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/memory
mount --move "$staging" /sys/fs/cgroup/memory
exec "$@"
"""


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(what: str, ready: Callable[[], bool], timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tails = {p.name: p.read_text()[-2000:] for p in sorted(logs.iterdir())}
    raise RuntimeError(f"{what} within {timeout} s; logs: {tails}")


def cgroup_mounts() -> list[str]:
    """This mount namespace's cgroup mounts (mount point and file system type): slurmd's
    namespace must change none of them."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)[0].split()
        fstype = line.split(" - ", 1)[1].split()[0]
        if fields[4].startswith(str(CONTROLLERS)):
            mounts.append(f"{fields[4]} {fields[3]} {fstype}")
    return sorted(mounts)


def listening(pid: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* gives them) of the TCP sockets that
    process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return sorted(found)


LOOPBACK_HEX = "0100007F"  # 127.0.0.1 in /proc/net/tcp's byte order


def controller_slurm_dirs() -> set[Path]:
    """Directories named like Slurm's (`slurm*`) at the root of every controller's
    hierarchy on the host, and below our own memory cgroup outside any test cgroup."""
    roots = [*CONTROLLERS.iterdir()] if CONTROLLERS.is_dir() else []
    own = own_memory_cgroup()
    found: set[Path] = set()
    for root in [*roots, *([own] if own is not None else [])]:
        with contextlib.suppress(OSError):
            found |= {p for p in root.glob("slurm*") if p.is_dir()}
    return found


@contextlib.contextmanager
def running_slurm() -> Iterator[Slurm]:
    """munged, slurmctld and slurmd, up and the node idle; on exit every job is cancelled,
    the daemons are stopped by pid, and the test cgroup and directory are removed."""
    # munged insists that every directory above its socket be searchable by all.
    directory = Path(tempfile.mkdtemp(prefix="dsw-slurm-"))
    directory.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        logs = directory / "log"
        for sub in ("state", "spool", "log", "socket", "staging"):
            (directory / sub).mkdir(mode=0o755)
        key_dir = directory / "munge"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        munge_socket = directory / "socket" / "munge.socket"
        munged = [
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={munge_socket}",
            f"--pid-file={directory / 'socket' / 'munged.pid'}",
            f"--log-file={logs / 'munged.log'}",
            f"--seed-file={key_dir / 'munged.seed'}",
        ]
        with open(logs / "munged.out", "wb") as out:
            procs.append(subprocess.Popen(munged, stdout=out, stderr=subprocess.STDOUT))
        _wait("munged did not create its socket", munge_socket.exists, START_TIMEOUT_S, logs)

        conf = directory / "slurm.conf"
        conf.write_text(_config(directory, munge_socket, _free_port(), _free_port()))
        (directory / "cgroup.conf").write_text(CGROUP_CONF)
        (directory / "plugstack.conf").write_text("")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        with open(logs / "slurmctld.out", "wb") as out:
            procs.append(
                subprocess.Popen(
                    ["slurmctld", "-D", "-i"], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
        with make_test_cgroup(prefix="dsw-slurm") as cgroup:
            daemons: list[int] = []
            slurm = Slurm(directory=directory, conf=conf, cgroup=cgroup, logs=logs, daemons=daemons)
            slurmd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                SLURMD_IN_NAMESPACE,
                "slurmd-in-namespace",
                str(cgroup.path),
                str(directory / "staging"),
                "slurmd",
                "-D",
                "-N",
                NODE,
            ]
            with open(logs / "slurmd.out", "wb") as out:
                procs.append(
                    subprocess.Popen(slurmd, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
            try:

                def idle() -> bool:
                    for proc in procs:
                        if proc.poll() is not None:
                            raise RuntimeError(
                                f"{proc.args!r} ended with {proc.returncode}: "
                                + (logs / "slurmd.out").read_text()
                                + (logs / "slurmctld.out").read_text()
                            )
                    with contextlib.suppress(RuntimeError):
                        return slurm.run("sinfo", "-h", "-n", NODE, "-o", "%t").strip() == "idle"
                    return False

                _wait("the node did not become idle", idle, START_TIMEOUT_S, logs)
                daemons += [proc.pid for proc in procs]
                yield slurm
            finally:
                with contextlib.suppress(RuntimeError):
                    if slurm.jobs():
                        slurm.run("scancel", "--partition", PARTITION)
                with contextlib.suppress(RuntimeError):
                    _wait(
                        "the jobs did not end",
                        lambda: not slurm.jobs(),
                        STOP_TIMEOUT_S,
                        logs,
                    )
                for proc in reversed(procs):
                    _stop(proc, STOP_TIMEOUT_S)
    finally:
        for proc in reversed(procs):
            _stop(proc, STOP_TIMEOUT_S)
        shutil.rmtree(directory, ignore_errors=True)
