"""The pool that instances on one host share: who is in it, and what each holds.

Instances whose budgets come from the same place (the nearest limited cgroup level above
their own, or the host's MemAvailable where nothing limits) share one pool. Each live
instance has a claim in the pool's directory, below the private runtime directory of the
plan files:

- `<pid>.lock`, an exclusive flock held for as long as the instance runs. The
  descriptor is inheritable, so it passes through the exec of the worker or the
  supervisor, and the kernel releases it when the last process holding it ends (SIGKILL
  included): a claim whose lock can be taken is a dead one, and is removed.
- `<pid>.claim`, what it holds: its weight (worker processes), a fixed commitment or none,
  the budget in force (`committed`), its working set, and its child cgroup. Replaced by
  rename, so a reader sees a whole record; the lock file is never replaced, since a lock
  lives on an inode.

`lock`: held exclusively by a newcomer from reading the claims until its own is written,
and by a running instance from re-reading them until a raise is written, so that no two
instances hand out the same free memory.

Parsing and rendering a claim are pure; the rest is a small edge over one directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..records import record
from .files import settled_version

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..measure import Measurement
    from ..plan import PoolView
    from .siblings import Sibling

LOCK_NAME = "lock"
HOST_KEY = "host"


class ClaimError(ValueError):
    """A claim file that is not one this version wrote."""


@record
class Member:
    """One live instance of the pool, as its claim says."""

    pid: int
    # Worker processes: the share of the flexible part of the pool is by weight.
    weight: int
    # Bytes it keeps whatever the others do (an explicit --memory-limit, --no-follow, a
    # worker that cannot follow); None when it follows its fair share.
    fixed: int | None
    # The budget in force now: its kernel limit, or its Dask limits and overhead.
    committed: int
    working_set: int
    # Its child cgroup (a directory path), whose working set the kernel tells directly.
    cgroup: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "weight": self.weight,
            "fixed": self.fixed,
            "committed": self.committed,
            "working_set": self.working_set,
            "cgroup": self.cgroup,
        }


_INT_FIELDS = ("pid", "weight", "fixed", "committed", "working_set")


def parse_claim(text: str) -> Member:
    """A claim's record; ClaimError for anything else.

    One field a line, `name value`, in a fixed order; `-` for none. The cgroup path comes
    last and takes the rest of the file, so any character it may hold survives. Not
    JSON: reading claims is on --print-limit's path, whose start-up is a goal, and json
    costs an import there."""
    if not text.endswith("\n"):
        raise ClaimError("not a whole claim")
    parts = text[:-1].split("\n", len(_INT_FIELDS))
    if len(parts) != len(_INT_FIELDS) + 1:
        raise ClaimError("too few lines")
    values: dict[str, int | None] = {}
    for name, line in zip(_INT_FIELDS, parts, strict=False):
        key, _, value = line.partition(" ")
        if key != name:
            raise ClaimError(f"expected {name}, found {key!r}")
        if value == "-" and name == "fixed":
            values[name] = None
        elif value.isdigit() and value.isascii():
            values[name] = int(value)
        else:
            raise ClaimError(f"{name} is not a non-negative integer: {value!r}")
    key, _, cgroup = parts[-1].partition(" ")
    if key != "cgroup" or not (cgroup == "-" or cgroup.startswith("/")):
        raise ClaimError(f"cgroup is not an absolute path: {parts[-1]!r}")
    pid, weight = values["pid"], values["weight"]
    committed, working_set = values["committed"], values["working_set"]
    assert pid is not None and weight is not None
    assert committed is not None and working_set is not None
    if pid == 0 or weight == 0:
        raise ClaimError("pid and weight must be positive")
    return Member(
        pid=pid,
        weight=weight,
        fixed=values["fixed"],
        committed=committed,
        working_set=working_set,
        cgroup=None if cgroup == "-" else cgroup,
    )


def claim_text(member: Member) -> str:
    fixed = "-" if member.fixed is None else str(member.fixed)
    cgroup = "-" if member.cgroup is None else member.cgroup
    return (
        f"pid {member.pid}\nweight {member.weight}\nfixed {fixed}\n"
        f"committed {member.committed}\nworking_set {member.working_set}\ncgroup {cgroup}\n"
    )


def pool_key(m: Measurement, skip: str | None = None) -> str:
    """Where the budget comes from: the nearest level, from our own cgroup up, with a
    limit of its own or from above (v1's hierarchical limit), or "host". `skip` is a
    child cgroup of ours, whose limit we wrote (it is ours, not the pool's)."""
    if m.location is None:
        return HOST_KEY
    levels = [lvl for lvl in m.levels if skip is None or lvl.path != skip]
    for lvl, parent in zip(levels, [*levels[1:], None], strict=True):
        if lvl.ceiling is None:
            continue
        # v1 shows a limit set above on every level below it (hierarchical_memory_limit):
        # the pool is where it is set, else each of several siblings in a limited parent
        # (systemd's template instances in their slice) would be a pool of its own.
        if parent is not None and parent.ceiling == lvl.ceiling:
            continue
        return f"v{m.location.version}:{lvl.path}"
    return HOST_KEY


def pool_dir_name(key: str) -> str:
    """A file name for a pool key: cgroup paths may be long and hold any character."""
    import hashlib

    return "pool-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _occupied(member: Member | None, proc_root: Path = Path("/proc")) -> bool:
    """Whether the member's child cgroup still holds a live process (a zombie waiting
    for its parent to reap it holds no memory)."""
    if member is None or member.cgroup is None:
        return False
    try:
        pids = (Path(member.cgroup) / "cgroup.procs").read_text().split()
    except OSError:
        return False
    for pid in pids:
        try:
            stat = (proc_root / pid / "stat").read_text()
        except OSError:
            continue  # gone since the listing (or another pid namespace's): not here
        if stat[stat.rfind(")") + 2 :][:1] != "Z":
            return True
    return False


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Pool:
    """The claims in one pool directory (private: made by `plan_file.private_dir`)."""

    def __init__(self, directory: Path, key: str, *, remember: bool = False) -> None:
        self.directory = directory
        self.key = key
        # With `remember` (the watch, which reads the claims every second): the claims as
        # last read, and the directory's (inode, mtime) they were read at. A claim is only
        # ever replaced by rename and removed by unlink, and both change the directory's
        # mtime, so while it stands the names and records stand too; only whether each
        # lock is still held must be asked every time.
        self._remember = remember
        self._seen: tuple[tuple[int, int], list[tuple[str, str, Member | None]]] | None = None
        # With `remember`: the other members' lock files, kept open while the claims as
        # last read stand (an open and a close less per member and tick). Dropped at any
        # change of the directory: a lock file removed and made again (a dead instance's
        # pid given to a new one) is another inode, which a kept descriptor never sees.
        self._lock_fds: dict[str, int] = {}
        # `hold`'s descriptor of the pool's lock file, kept open between the watch's
        # ticks, and the directory's (inode, mtime) at which its name was last seen to be
        # that file (None: ask again).
        self._pool_fd: int | None = None
        self._pool_fd_at: tuple[int, int] | None = None

    def hold(self) -> int:
        """The pool's lock as `acquire(wait=True)` takes it, on a descriptor kept open
        between calls (the watch takes it every tick); `release` lets it go.

        Why the kept file is still the lock: only `remove_if_empty` unlinks it, while
        holding it on the current file, and any unlink, create or rename in the directory
        changes the directory's mtime. So while the directory's (inode, mtime) is as it
        was when the name was last seen to be our file, it still is, and the lock taken
        on it excludes everyone else's `acquire`, as a fresh one would. A directory that
        changed less than a second before that sighting could change again within the
        file system's clock step, with the same mtime: such a sighting is not kept."""
        import fcntl
        import time

        fd = self._pool_fd
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.stat(self.directory)
                if (st.st_ino, st.st_mtime_ns) == self._pool_fd_at:
                    return fd
                held, now = os.fstat(fd), os.stat(f"{self.directory}/{LOCK_NAME}")
                same = (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
            except OSError:
                same = False
            if same:
                self._seen_lock_at(st, time.time_ns())
                return fd
            self._drop_pool_fd()
        fd = self.acquire()
        assert fd is not None  # it waits
        self._pool_fd = fd
        try:
            # After the lock is ours and its name checked (acquire): the name stays ours
            # while we hold it, so this directory state has it too.
            self._seen_lock_at(os.stat(self.directory), time.time_ns())
        except OSError:
            self._pool_fd_at = None
        return fd

    def _seen_lock_at(self, st: os.stat_result, now_ns: int) -> None:
        self._pool_fd_at = settled_version(st, now_ns)

    def release(self, fd: int) -> None:
        """Let a lock from `hold` or `acquire` go (`hold`'s descriptor stays open)."""
        import fcntl

        if fd == self._pool_fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except OSError:
                self._drop_pool_fd()
                return
        os.close(fd)

    def _drop_pool_fd(self) -> None:
        fd, self._pool_fd, self._pool_fd_at = self._pool_fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def acquire(self, wait: bool = True) -> int | None:
        """The pool's lock, held until the descriptor is closed; None when another holds
        it and not `wait`. The last instance to leave removes the directory with its
        lock file, so a lock taken on a file that is no longer there is taken again."""
        import fcntl

        from ..plan_file import private_dir

        # Text, not a Path join: the watch takes the lock on every tick.
        path = f"{self.directory}/{LOCK_NAME}"
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        while True:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                private_dir(self.directory, os.geteuid())
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                held, now = os.fstat(fd), os.stat(path)
            except BlockingIOError:
                os.close(fd)
                return None
            except FileNotFoundError:
                os.close(fd)
                continue
            except OSError:
                os.close(fd)
                raise
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
            os.close(fd)

    def remove_if_empty(self) -> bool:
        """Remove the pool's directory when no live instance claims anything in it (and
        nobody holds its lock now): pools come and go with cgroups (Slurm jobs, pods)."""
        try:
            fd = self.acquire(wait=False)
        except OSError:
            return False
        if fd is None:
            return False
        try:
            if self.members():
                return False
            names = os.listdir(self.directory)
            if set(names) - {LOCK_NAME}:
                return False  # a claim being written, or not ours to judge
            os.unlink(self.directory / LOCK_NAME)
            os.rmdir(self.directory)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def members(self, exclude: int | None = None) -> tuple[Member, ...]:
        """The live claims, ours (`exclude`) left out; dead ones are removed on the way.

        A claim lives while its lock is held (the supervisor and the nanny hold it), or
        while its child cgroup still holds a process: a worker whose supervisor was
        killed still uses what the claim promised. A live claim that cannot be read
        counts as nothing: it is being written."""
        claims = self._claims()
        if claims is None:
            return ()
        found: list[Member] = []
        for stem, name, member in claims:
            if int(stem) == exclude:
                continue
            if self._held(name) or _occupied(member):
                if member is not None:
                    found.append(member)
                continue
            # Gone: data first, so that a reader never sees a claim without its lock.
            with contextlib.suppress(OSError):
                os.unlink(self.directory / f"{stem}.claim")
            with contextlib.suppress(OSError):
                os.unlink(self.directory / name)
        return tuple(found)

    def _claims(self) -> list[tuple[str, str, Member | None]] | None:
        """(pid, lock file name, record) of every claim in the directory; None when it
        cannot be listed."""
        import time

        version: tuple[int, int] | None = None
        st: os.stat_result | None = None
        if self._remember:
            try:
                st = os.stat(self.directory)
            except OSError:
                return None
            version = (st.st_ino, st.st_mtime_ns)
            if self._seen is not None and self._seen[0] == version:
                return self._seen[1]
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return None
        claims: list[tuple[str, str, Member | None]] = []
        for name in names:
            stem, _, ext = name.partition(".")
            if ext == "lock" and stem.isdigit():
                claims.append((stem, name, self._read(stem)))
        # A directory changed less than a second ago is read again (settled_version).
        settled = None if st is None else settled_version(st, time.time_ns())
        self._seen = None if settled is None else (settled, claims)
        # Listed afresh: the directory changed, so every kept lock descriptor may be stale.
        # (The pool's own lock, held now by `hold`, checks its name itself.)
        self._forget_members()
        return claims

    def forget(self) -> None:
        """Close the lock files kept open (the watch's end)."""
        self._forget_members()
        self._drop_pool_fd()

    def _forget_members(self) -> None:
        fds, self._lock_fds = self._lock_fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _held(self, name: str) -> bool:
        """Whether a live process holds the claim's lock `name`; the descriptor is kept
        (`remember`) while the directory stands as last listed."""
        path = f"{self.directory}/{name}"
        fd = self._lock_fds.pop(name, None)
        if fd is None:
            if not self._remember or self._seen is None:
                return self._locked(path)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return False
            except OSError:
                return True
        try:
            if not _try_lock(fd):
                self._lock_fds[name] = fd
                fd = -1
                return True
            # Taken: nobody holds it, unless the name is another file by now (removed and
            # made again since the directory was read): then it is not ours to judge.
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return False
            held = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                self._seen = None
                return True
            return False
        except OSError:
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def _read(self, stem: str) -> Member | None:
        try:
            return parse_claim((self.directory / f"{stem}.claim").read_text(encoding="utf-8"))
        except (OSError, ClaimError):
            return None

    @staticmethod
    def _locked(lock_path: Path | str) -> bool:
        """Whether a live process holds the lock (an unreadable lock counts as held)."""
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        try:
            return not _try_lock(fd)
        finally:
            os.close(fd)

    def claim(self, member: Member) -> int:
        """Write our claim; the held, inheritable lock's descriptor (keep it open)."""
        lock_path = self.directory / f"{member.pid}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if not _try_lock(fd):
            os.close(fd)
            raise OSError(f"the claim {lock_path} is held by another process")
        try:
            self.update(member)
        except OSError:
            os.close(fd)
            raise
        os.set_inheritable(fd, True)
        return fd

    def update(self, member: Member) -> None:
        """Replace our claim's record (whole, by rename)."""
        from ..plan_file import write_atomic

        write_atomic(self.directory / f"{member.pid}.claim", claim_text(member))

    def leave(self, pid: int) -> None:
        for name in (f"{pid}.claim", f"{pid}.lock"):
            with contextlib.suppress(OSError):
                os.unlink(self.directory / name)


def find_pool(
    m: Measurement, environ: Mapping[str, str], skip: str | None = None, create: bool = True
) -> Pool | None:
    """Our pool in the private runtime directory, made when missing with `create`; None
    when there is no usable directory (no instance can share then: each plans alone)."""
    from ..plan_file import PlanFileError, existing_runtime_dir, private_dir, runtime_dir

    key = pool_key(m, skip)
    try:
        if create:
            runtime = runtime_dir(environ)
            directory = private_dir(runtime / pool_dir_name(key), os.geteuid())
        else:
            found = existing_runtime_dir(environ)
            if found is None or not (found / pool_dir_name(key)).is_dir():
                return None
            runtime, directory = found, found / pool_dir_name(key)
    except (PlanFileError, OSError):
        return None
    if create:
        _sweep(runtime, keep=directory.name)
    return Pool(directory, key)


def _sweep(runtime: Path, keep: str) -> None:
    """Remove other pools' directories that no live instance claims any more."""
    with contextlib.suppress(OSError):
        for name in os.listdir(runtime):
            if name.startswith("pool-") and name != keep:
                Pool(runtime / name, "").remove_if_empty()


def with_kernel_working_sets(members: tuple[Member, ...], version: int) -> tuple[Member, ...]:
    """Members whose child cgroup the kernel can tell about, with its working set: it
    is current, where the claim's is as old as its last update."""
    from ..proc_parse import ParseError
    from .files import open_memory_cgroup
    from .parse import working_set

    out: list[Member] = []
    for member in members:
        if member.cgroup is not None:
            try:
                # The text path: a Path per member and tick costs more than its reads.
                cg = open_memory_cgroup(version, member.cgroup)
                ws = working_set(cg.usage(), cg.inactive_file())
            except (OSError, ParseError, ValueError):
                pass
            else:
                # Positionally, not by `replace`: every member on every tick of the watch.
                member = Member(
                    member.pid, member.weight, member.fixed, member.committed, ws, member.cgroup
                )
        out.append(member)
    return tuple(out)


def plan_inputs(
    m: Measurement, child_base: str, pool: Pool | None, pid: int
) -> tuple[Measurement, tuple[Sibling, ...], PoolView | None]:
    """What `make_plan` needs besides the worker's arguments: the measurement with every
    other instance's child counted as an occupant of our cgroup (its limit is not ours
    alone to set), the instance children outside our pool (their kernel limits are
    fixed commitments), and the pool's other members."""
    from ..plan import PoolView
    from .siblings import read_siblings, with_siblings

    siblings = read_siblings(m, child_base)
    members = pool.members(exclude=pid) if pool is not None else ()
    if members and m.location is not None:
        members = with_kernel_working_sets(members, m.location.version)
    in_pool = {member.pid for member in members}
    # A notebook's workers sit in a child its kernel claims from outside it: that child
    # is in the pool by its path, not by its processes.
    own_dir = str(m.location.directory(Path("/"))) if m.location is not None else None
    pool_children = {mb.cgroup for mb in members if mb.cgroup}
    foreign = tuple(
        s
        for s in siblings
        if not in_pool.intersection(s.pids) and f"{own_dir}/{s.name}" not in pool_children
    )
    view = None if pool is None else PoolView(pool.key, members)
    return with_siblings(m, siblings), foreign, view
