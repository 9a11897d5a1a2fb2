"""The limit we wrote on our own cgroup, remembered, so that a restart plans from the
operator's limit and not from ours.

As its sole occupant a start writes its own cgroup's limit. The next start in the same
cgroup (a restart loop, a persistent scope) read that value as the operator's and
planned below it: four starts with `--reserve 10%` went 1 GiB -> 922 MiB -> 829 MiB ->
... until the plan was refused (issue 24 row 5). So every write to our own cgroup leaves
a record of what the cgroup held before our first write and of what we wrote, in our
private runtime directory, keyed by the cgroup directory's device and inode (a cgroup
removed and made again under the same path is another one, with other limits). A later
start plans from the recorded limit while the one in force is exactly what we wrote;
once anyone else changed it, the value there is the operator's and the next write
records it as the original.

The record is a few `key value` lines, not JSON: `--print-limit` reads it too, and json
is off its import path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from ..records import record, replace

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from ..measure import LevelReading, Measurement

SUBDIR = "limits"


@record
class OurLimit:
    # The cgroup directory as this process saw it: checked on load, and what a person reads.
    directory: str
    # The limit before our first write; None when there was none.
    original: int | None
    # v1's hierarchical_memory_limit without our write: the lowest limit of the levels
    # above, as last seen (ours hides an ancestor's that is higher than ours).
    ancestors: int | None
    # v2 memory.high before our first write (--memory-high-fraction writes one too).
    original_high: int | None
    # What the kernel held right after our last write (v1 rounds to pages).
    written: int
    # v2 memory.high as we wrote it (--memory-high-fraction); None when we did not.
    written_high: int | None = None


def _value(text: str) -> int | None:
    return None if text == "none" else int(text)


def parse(text: str) -> OurLimit:
    """A record file's contents; ValueError for anything else."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" ")
        if sep:
            fields[key] = value
    try:
        written = _value(fields["written"])
        if written is None:
            raise ValueError("no written value")
        return OurLimit(
            directory=fields["directory"],
            original=_value(fields["original"]),
            ancestors=_value(fields["ancestors"]),
            original_high=_value(fields["original_high"]),
            written=written,
            written_high=_value(fields.get("written_high", "none")),
        )
    except KeyError as exc:
        raise ValueError(f"missing {exc}") from None


def render(rec: OurLimit) -> str:
    def show(value: int | None) -> str:
        return "none" if value is None else str(value)

    return (
        f"directory {rec.directory}\noriginal {show(rec.original)}\n"
        f"ancestors {show(rec.ancestors)}\noriginal_high {show(rec.original_high)}\n"
        f"written {rec.written}\nwritten_high {show(rec.written_high)}\n"
    )


def visible_ancestors(hierarchical: int | None, limit: int | None, known: int | None) -> int | None:
    """The levels above, from v1's hierarchical limit (the lowest of ours and theirs):
    exact when it is below our own limit, else hidden by ours and `known` as last seen."""
    if hierarchical is not None and (limit is None or hierarchical < limit):
        return hierarchical
    return known


def operators_level(level: LevelReading, rec: OurLimit | None) -> LevelReading | None:
    """The level as it was before our writes, or None when nothing in force is what we
    wrote (nobody's record, or someone changed it since: theirs now). The limit and
    memory.high each count as ours while they hold what we wrote."""
    if rec is None:
        return None
    limit_ours = level.limit == rec.written
    high_ours = rec.written_high is not None and level.high == rec.written_high
    if not (limit_ours or high_ours):
        return None
    if limit_ours:
        hierarchical = visible_ancestors(level.hierarchical_limit, level.limit, rec.ancestors)
        level = replace(level, limit=rec.original, hierarchical_limit=hierarchical)
    return replace(level, high=rec.original_high) if high_ours else level


def _key(directory: Path) -> str:
    st = os.stat(directory)
    return f"{st.st_dev}-{st.st_ino}"


def _dirs(environ: Mapping[str, str]) -> list[Path]:
    from ..plan_file import candidate_dirs, temp_dir

    try:
        tmpdir = temp_dir()
    except OSError:
        tmpdir = "/tmp"
    return [d / SUBDIR for d in candidate_dirs(environ, os.geteuid(), tmpdir)]


def load(directory: Path, environ: Mapping[str, str] = os.environ) -> OurLimit | None:
    """The record of `directory`, from any of our private runtime directories; None
    when there is none or it cannot be read (then our limit counts as the operator's)."""
    try:
        key = _key(directory)
    except OSError:
        return None
    for base in _dirs(environ):
        try:
            fd = os.open(base / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                continue  # not written by us: planted, never believed
            with os.fdopen(fd, encoding="utf-8", closefd=False) as f:
                rec = parse(f.read(4096))
        except (OSError, ValueError):
            continue
        finally:
            os.close(fd)
        if rec.directory == str(directory):
            return rec
    return None


def save(directory: Path, rec: OurLimit, environ: Mapping[str, str] = os.environ) -> Path:
    """Write `rec` for `directory` into the first usable private runtime directory, and
    remove records of cgroups that are gone. OSError when none can hold it."""
    from ..plan_file import private_dir, runtime_dir, write_atomic

    euid = os.geteuid()
    base = private_dir(runtime_dir(environ) / SUBDIR, euid)
    target = base / _key(directory)
    write_atomic(target, render(rec), euid)
    _remove_gone(base, keep=target.name)
    return target


def update_written(
    directory: Path,
    old: int,
    new: int,
    ancestors: int | None,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """After a later write of ours (the --follow watch), the record's value and the
    ancestors' limit as the watch last saw it; False when there is no record of ours
    for the value `old` (a child cgroup: nothing to keep)."""
    rec = load(directory, environ)
    if rec is None or rec.written != old:
        return False
    save(directory, replace(rec, written=new, ancestors=ancestors), environ)
    return True


def _remove_gone(base: Path, keep: str) -> None:
    """Records whose cgroup no longer exists: a systemd scope per start would otherwise
    leave one each."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            if name == keep or name.startswith("."):
                continue
            try:
                rec = parse((base / name).read_text(encoding="utf-8"))
                gone = _key(Path(rec.directory)) != name
            except FileNotFoundError:
                gone = True
            except (OSError, ValueError):
                continue
            if gone:
                with contextlib.suppress(OSError):
                    os.unlink(base / name)


def with_operators_limit(
    m: Measurement, environ: Mapping[str, str] = os.environ
) -> tuple[Measurement, OurLimit | None]:
    """The measurement with our own cgroup's level as the operator set it, where an
    earlier start of ours wrote the limit in force and we are that cgroup's sole
    occupant (only then would we write it again; shared, our old limit still caps the
    others and stays in the plan). The record used, or None."""
    if m.location is None or not m.levels or not m.sole_occupant:
        return m, None
    rec = load(m.location.directory(Path("/")), environ)
    level = operators_level(m.levels[0], rec)
    if level is None:
        return m, None
    return replace(m, levels=(level, *m.levels[1:])), rec
