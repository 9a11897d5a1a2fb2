"""Write the plan file for `dask-safe-audit` without trusting any shared directory.

A predictable name in a world-writable temp directory lets another local user plant a
symlink there and make a root-run worker overwrite its target. So the default file lives
in a private directory (a runtime directory owned by us, mode 0700, never a symlink), and
every file, default or `--plan-file`, is created under a random name with
O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600, then renamed into place: rename replaces a
planted link or file instead of following it.

A given `--plan-file` is renamed over only when it is a regular file or missing. A
character device or FIFO (`/dev/null`, a pipe to a collector) is written into as it is:
renaming over /dev/null would replace the host's null device with a 0600 file, and every
other user's writes to it would fail. A symlink, directory or socket is refused before
anything is written.

Default names carry the host name and the pid that becomes the worker (exec keeps it),
so a restarted container (always pid 1) reuses its path, and files whose pid is gone are
removed at the next start: nothing accumulates.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

    from .cgroup.write import WriteMode, WriteOutcome
    from .events import Audit
    from .measure import Measurement
    from .plan import Plan

DIR_NAME = "dask-safe-worker"


class PlanFileError(OSError):
    """The plan file cannot be written safely; the reason is in the message."""


def _hostname() -> str:
    name = os.uname().nodename or "localhost"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def default_name(pid: int) -> str:
    return f"plan-{_hostname()}-{pid}.json"


def temp_dir() -> str:
    """`tempfile.gettempdir()`, without importing tempfile where its answer is plain:
    its first candidate ($TMPDIR, $TEMP, $TMP or /tmp) when that is a directory we may
    write. tempfile brings shutil, random, bz2 and lzma (~8 ms on every start, before
    the worker's); anywhere else it decides, and raises OSError as it does. Where it is
    loaded already (a notebook's kernel), it is asked: `tempfile.tempdir` may be set."""
    loaded = sys.modules.get("tempfile")
    if loaded is not None:
        return str(loaded.gettempdir())
    for name in ("TMPDIR", "TEMP", "TMP"):
        first = os.environ.get(name)
        if first:
            break
    else:
        first = "/tmp"
    first = os.path.abspath(first)
    if os.path.isdir(first) and os.access(first, os.W_OK | os.X_OK):
        return first
    import tempfile

    return tempfile.gettempdir()


def candidate_dirs(environ: Mapping[str, str], euid: int, tmpdir: str) -> list[Path]:
    """Where the default plan file may go, best first."""
    dirs: list[Path] = []
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    # Only a runtime directory of our own: `sudo` may keep another user's, whose owner
    # could swap our subdirectory for a link.
    with contextlib.suppress(OSError):
        if runtime.startswith("/") and os.stat(runtime).st_uid == euid:
            dirs.append(Path(runtime) / DIR_NAME)
    if euid == 0:
        dirs.append(Path("/run") / DIR_NAME)
    dirs.append(Path(tmpdir) / f"{DIR_NAME}-{euid}")
    return dirs


def private_dir(path: Path, euid: int) -> Path:
    """`path` as a directory only we can use: made with mode 0700 when missing; refused
    when it is a symlink, not ours, or open to others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    _check_private(os.lstat(path), path, euid)
    return path


def _check_private(info: os.stat_result, path: Path, euid: int) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise PlanFileError(f"{path} is a symlink")
    if not stat.S_ISDIR(info.st_mode):
        raise PlanFileError(f"{path} is not a directory")
    if info.st_uid != euid:
        raise PlanFileError(f"{path} is owned by uid {info.st_uid}, not {euid}")
    if info.st_mode & 0o077:
        raise PlanFileError(f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):o})")


def given_kind(path: Path) -> str:
    """How a given `--plan-file` is written: "replace" (a regular file, or nothing there
    yet) or "stream" (a character device or FIFO, written into); PlanFileError for what
    must not be written at all. A path that cannot be looked at counts as "replace": the
    write then fails and is logged, as for a missing directory."""
    try:
        info = os.lstat(path)
    except OSError:
        return "replace"
    return _kind_of(info.st_mode, path)


def _kind_of(mode: int, path: Path) -> str:
    if stat.S_ISREG(mode):
        return "replace"
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return "stream"
    if stat.S_ISLNK(mode):
        what = "a symlink (give the path it points to)"
    elif stat.S_ISDIR(mode):
        what = "a directory"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    else:
        what = "a block device"
    raise PlanFileError(f"--plan-file {path} is {what}; name a regular file, a FIFO or /dev/null")


def write_given(target: Path, text: str) -> None:
    """`text` at a path the user gave: into a character device or FIFO as it is, else
    replacing a regular file (or creating one) atomically; never over anything else."""
    if given_kind(target) == "replace":
        write_atomic(target, text)
        return
    # O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of holding the
    # start; without O_CREAT, nothing is made if the node vanished since it was looked at.
    fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _kind_of(os.fstat(fd).st_mode, target)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
            f.write(text)
    finally:
        os.close(fd)


def write_atomic(target: Path, text: str, private_euid: int | None = None) -> None:
    """`text` at `target`, mode 0600, appearing whole or not at all.

    Create and rename go through a descriptor of the directory, so the directory that
    was checked is the one written to. With `private_euid`, that directory must be a
    private one of that user (opened without following a link, checked on the open
    descriptor)."""
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if private_euid is not None:
        dir_flags |= os.O_NOFOLLOW
    dfd = os.open(target.parent, dir_flags)
    try:
        if private_euid is not None:
            _check_private(os.fstat(dfd), target.parent, private_euid)
        # os.urandom, not secrets: secrets imports hmac, random and base64 (~4 ms a start).
        tmp = f".{target.name}.{os.urandom(6).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if private_euid is None:
                # Checked again through the directory just before the rename: a device
                # or directory put there since `given_kind` looked is never replaced.
                with contextlib.suppress(FileNotFoundError):
                    mode = os.lstat(target.name, dir_fd=dfd).st_mode
                    if _kind_of(mode, target) != "replace":
                        raise PlanFileError(f"--plan-file {target} changed while it was written")
            os.rename(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def remove_stale(directory: Path, proc_root: Path = Path("/proc")) -> int:
    """Remove this host's default plan files whose pid no longer runs; how many."""
    prefix, removed = f"plan-{_hostname()}-", 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        pid = name[len(prefix) : -len(".json")]
        if not (name.startswith(prefix) and name.endswith(".json") and pid.isdigit()):
            continue
        if (proc_root / pid).exists():
            continue
        try:
            os.unlink(directory / name)
            removed += 1
        except OSError:
            pass
    return removed


def _writable(directory: Path) -> str | None:
    """Why files cannot be made in `directory`, or None. A read-only mount passes every
    other check of a directory that exists there (`mkdir` says EEXIST before EROFS), so
    it is asked for: an existing /run/dask-safe-worker on a read-only /run took the plan
    file, and no other directory was tried (issue 24 row 10)."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{directory} is on a read-only filesystem"
    except OSError as exc:
        return f"{directory}: {exc.strerror or exc}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    return None


def _runtime_candidates(environ: Mapping[str, str]) -> Iterator[tuple[Path | None, str]]:
    """(a usable directory, "") or (None, why a candidate is not usable), best first."""
    euid = os.geteuid()
    try:
        tmpdir = temp_dir()
    except OSError:  # no writable temp directory at all: the /tmp candidate fails below
        tmpdir = "/tmp"
    for candidate in candidate_dirs(environ, euid, tmpdir):
        try:
            directory = private_dir(candidate, euid)
        except PlanFileError as exc:
            yield None, str(exc)
            continue
        except OSError as exc:
            yield None, f"{candidate}: {exc.strerror or exc}"
            continue
        problem = _writable(directory)
        if problem is not None:
            yield None, problem
            continue
        yield directory, ""


def existing_runtime_dir(environ: Mapping[str, str]) -> Path | None:
    """The runtime directory `runtime_dir` would choose, when it exists already; None
    when it does not. Made for readers (`--print-limit`, `--dry-run`, the notebook's
    query): a question must not leave a directory in /run behind."""
    euid = os.geteuid()
    try:
        tmpdir = temp_dir()
    except OSError:
        tmpdir = "/tmp"
    for candidate in candidate_dirs(environ, euid, tmpdir):
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            # A writer would have made it here when its parent takes it: nothing to find.
            if _writable(candidate.parent) is None:
                return None
            continue
        except OSError:
            continue
        try:
            _check_private(info, candidate, euid)
        except PlanFileError:
            continue
        if _writable(candidate) is None:
            return candidate
    return None


def runtime_dir(environ: Mapping[str, str]) -> Path:
    """The first usable private runtime directory (plan files, pools): private and
    writable; PlanFileError naming every directory tried when none is usable."""
    reasons: list[str] = []
    for directory, reason in _runtime_candidates(environ):
        if directory is not None:
            return directory
        reasons.append(reason)
    raise PlanFileError("no private directory for the plan file: " + "; ".join(reasons))


def _write_default(text: str, pid: int) -> tuple[Path, int]:
    """`text` as the default plan file in the first runtime directory that takes it, and
    how many stale files were removed there: a write that fails in one (a full
    filesystem, found only now) tries the next. PlanFileError naming every directory
    tried when none took it."""
    reasons: list[str] = []
    for directory, reason in _runtime_candidates(os.environ):
        if directory is None:
            reasons.append(reason)
            continue
        target = directory / default_name(pid)
        stale = remove_stale(directory)
        try:
            write_atomic(target, text, os.geteuid())
        except OSError as exc:
            reasons.append(f"{target}: {exc.strerror or exc}")
            continue
        return target, stale
    raise PlanFileError("no private directory for the plan file: " + "; ".join(reasons))


def plan_document(
    m: Measurement,
    plan: Plan,
    argv: Sequence[str],
    write: WriteOutcome | None,
    mode: WriteMode,
) -> dict[str, Any]:
    """The plan as `--dry-run` prints it and the plan file holds it."""
    from . import __version__
    from .cgroup.write import intended_strategy
    from .event_line import SCHEMA_VERSION

    return {
        "schema": SCHEMA_VERSION,
        "version": __version__,
        "measurement": m.as_dict(),
        "plan": plan.as_dict(),
        "cgroup_write": {
            "mode": mode,
            "intended_strategy": intended_strategy(m, mode),
            "outcome": None if write is None else write.as_dict(),
        },
        "argv": list(argv),
    }


def record_plan(path: str | None, document: dict[str, Any], audit: Audit) -> str | None:
    """The plan as JSON at `path` (default: a private runtime directory), or None after a
    logged failure: the worker starts either way, without a plan file to point to."""
    import json

    target: Path | None = None
    text = json.dumps(document, indent=2) + "\n"
    try:
        if path:
            target, stale = Path(path), 0
            write_given(target, text)
        else:
            target, stale = _write_default(text, os.getpid())
    except OSError as exc:
        reason = str(exc) if exc.strerror is None else exc.strerror
        audit("plan.file.failed", path=None if target is None else str(target), reason=reason)
        return None
    audit("plan.file.written", path=str(target), stale_removed=stale)
    return str(target)
