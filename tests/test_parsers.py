"""Property tests for the pure parsers."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dask_safe_worker.cgroup.parse import (
    V1_UNLIMITED_FLOOR,
    memory_stat_value,
    parse_controllers,
    parse_int,
    parse_kernel_release,
    parse_memory_stat,
    parse_oom_group,
    parse_pids,
    parse_v2_limit,
    v1_limit,
    working_set,
)
from dask_safe_worker.proc_parse import (
    ParseError,
    parse_meminfo,
    parse_mountinfo,
    parse_mountinfo_line,
    parse_proc_cgroup,
    unescape_octal,
)
from dask_safe_worker.sizes import parse_amount, parse_bytes

kib = st.integers(min_value=1, max_value=2**40)


@given(total=kib, avail=st.integers(min_value=0, max_value=2**40), noise=st.lists(kib, max_size=5))
def test_meminfo_reports_bytes_not_kb(total: int, avail: int, noise: list[int]) -> None:
    lines = [f"MemTotal:       {total} kB", f"MemAvailable:   {avail} kB"]
    lines += [f"Other{i}:   {n} kB" for i, n in enumerate(noise)] + ["HugePages_Total:       0"]
    host = parse_meminfo("\n".join(lines) + "\n")
    assert host.total == total * 1024
    assert host.available == min(avail, total) * 1024
    assert not host.available_estimated


@given(free=kib, active=kib, inactive=kib, slab=kib)
def test_meminfo_estimate_without_memavailable(
    free: int, active: int, inactive: int, slab: int
) -> None:
    total = free + active + inactive + slab
    text = (
        f"MemTotal: {total} kB\nMemFree: {free} kB\nActive(file): {active} kB\n"
        f"Inactive(file): {inactive} kB\nSReclaimable: {slab} kB\n"
    )
    host = parse_meminfo(text)
    assert host.available_estimated
    assert host.available == total * 1024


_MEMINFO_NAMES = (
    "MemTotal",
    "MemAvailable",
    "MemFree",
    "Active(file)",
    "Inactive(file)",
    "SReclaimable",
)


def _meminfo_by_lines(text: str) -> tuple[int, int, bool] | None:
    """The parser as it was before it looked only at the lines its names occur in."""
    fields: dict[str, int] = {}
    for line in text.split("\n"):
        name, sep, rest = line.partition(":")
        if not sep or name.strip() not in _MEMINFO_NAMES:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        unit = parts[1] if len(parts) > 1 else ""
        fields[name.strip()] = value * 1024 if unit.lower() == "kb" else value
    if "MemTotal" not in fields:
        return None
    total = fields["MemTotal"]
    if "MemAvailable" in fields:
        return total, min(fields["MemAvailable"], total), False
    estimate = sum(fields.get(n, 0) for n in _MEMINFO_NAMES[2:])
    return total, min(estimate, total), True


_MEMINFO_NOISE = [
    "Mem",
    "Inactive(anon)",
    "XMemTotal",
    ":",
    " ",
    "\t",
    "\n",
    " kB",
    " KB",
    "x",
    "-",
]
_meminfo_piece = st.sampled_from([*_MEMINFO_NAMES, *_MEMINFO_NOISE]) | st.integers(
    min_value=0, max_value=2**45
).map(str)


@given(st.lists(_meminfo_piece, max_size=40).map("".join))
@example("MemTotal: 5 kB\nMemTotal: 7 kB\nMemAvailable: x kB\nMemAvailable: 3\n")
@example(" MemTotal : 9 kB MemTotal\nMemFree: 1 kB\nInactive(file): 2 kB\nActive(file): 3")
def test_meminfo_looks_only_at_its_lines_and_reads_them_as_every_line_would(text: str) -> None:
    expected = _meminfo_by_lines(text)
    if expected is None:
        with pytest.raises(ParseError):
            parse_meminfo(text)
        return
    host = parse_meminfo(text)
    assert (host.total, host.available, host.available_estimated) == expected


def test_meminfo_without_total_is_an_error() -> None:
    with pytest.raises(ParseError):
        parse_meminfo("MemFree: 1 kB\n")


path_chars = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters="\\"
) | st.sampled_from([" ", "\t", "\n", "\\"])
paths = st.lists(st.text(path_chars, min_size=1, max_size=8), min_size=0, max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)


def escape(path: str) -> str:
    return (
        path.replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )


@given(
    root=paths,
    point=paths,
    optional=st.lists(st.sampled_from(["shared:1", "master:7", "propagate_from:2", "unbindable"])),
    fstype=st.sampled_from(["cgroup", "cgroup2", "tmpfs", "fuse.sshfs"]),
    source=paths,
    super_opts=st.lists(st.text("abcdef=, ", min_size=1, max_size=10), min_size=1, max_size=3),
)
def test_mountinfo_line_roundtrip(
    root: str, point: str, optional: list[str], fstype: str, source: str, super_opts: list[str]
) -> None:
    sup = " ".join(super_opts)
    fields = ["36", "35", "98:0", escape(root), escape(point), "rw,noatime", *optional, "-"]
    line = " ".join([*fields, fstype, escape(source), sup])
    mount = parse_mountinfo_line(line)
    assert mount.root == root and mount.mount_point == point
    assert mount.fstype == fstype and mount.source == source
    assert mount.super_options == sup


def test_mountinfo_line_without_separator() -> None:
    with pytest.raises(ParseError):
        parse_mountinfo_line("36 35 98:0 / /mnt rw shared:1 ext4 /dev/sda rw")


@given(st.text())
def test_unescape_is_identity_without_backslashes(text: str) -> None:
    if "\\" not in text:
        assert unescape_octal(text) == text


@given(
    entries=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=20),
            st.lists(st.sampled_from(["memory", "cpu", "cpuacct", "name=systemd"]), unique=True),
            paths.filter(lambda p: "\n" not in p),
        ),
        max_size=6,
    )
)
def test_proc_cgroup_keeps_colons_in_paths(entries: list[tuple[int, list[str], str]]) -> None:
    text = "".join(f"{hid}:{','.join(ctl)}:{path}:x\n" for hid, ctl, path in entries)
    parsed = parse_proc_cgroup(text)
    assert [(e.hierarchy_id, list(e.controllers), e.path) for e in parsed] == [
        (hid, ctl, f"{path}:x") for hid, ctl, path in entries
    ]


def test_proc_cgroup_rejects_garbage() -> None:
    with pytest.raises(ParseError):
        parse_proc_cgroup("memory-only\n")


@given(st.integers(min_value=0, max_value=2**64))
def test_v1_limit_sentinels(value: int) -> None:
    total = 16 * 2**30
    result = v1_limit(value, total)
    if value >= V1_UNLIMITED_FLOOR or value >= total:
        assert result is None
    else:
        assert result == value


@given(st.integers(min_value=0, max_value=2**63))
def test_v2_limit(value: int) -> None:
    assert parse_v2_limit(f"{value}\n") == value
    assert parse_v2_limit("max\n") is None


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.integers(0, 2**50)))
def test_memory_stat_roundtrip(stat: dict[str, int]) -> None:
    text = "\n".join(f"{k} {v}" for k, v in stat.items()) + "\nbroken line here\n"
    assert parse_memory_stat(text) == stat


@given(st.integers(0, 2**50), st.integers(0, 2**50))
def test_working_set_never_negative(usage: int, inactive: int) -> None:
    assert working_set(usage, inactive) == max(0, usage - inactive)


sizes = st.one_of(
    st.integers(0, 2**45).map(str),
    st.tuples(
        st.floats(0, 1e6, allow_nan=False).map(lambda f: f"{f:.3f}"),
        st.sampled_from(["", " ", "B", "kB", "KB", "k", "MB", "M", "MiB", "Mi", "GiB", "g", "TB"]),
    ).map("".join),
    st.text("0123456789.eEkKmMgGiIbB -", max_size=8),
)


@given(sizes)
def test_parse_bytes_matches_dask(text: str) -> None:
    from dask.utils import parse_bytes as dask_parse_bytes

    try:
        expected: int | None = dask_parse_bytes(text)
    except (ValueError, OverflowError):
        expected = None
    try:
        got: int | None = parse_bytes(text)
    except ValueError:
        got = None
    assert got == expected


@given(st.floats(0, 0.999, allow_nan=False))
def test_amount_fraction(f: float) -> None:
    amount = parse_amount(repr(f))
    assert amount.fraction == pytest.approx(f)
    assert amount.fraction is not None
    assert amount.of(1000) == int(1000 * amount.fraction)


def test_amount_bytes_and_percent() -> None:
    assert parse_amount("512MiB").bytes == 512 * 2**20
    assert parse_amount("10%").fraction == pytest.approx(0.1)
    assert parse_amount("4096").bytes == 4096
    for bad in ("", "-5", "150%", "lots", "inf"):
        with pytest.raises(ValueError):
            parse_amount(bad)


# Kernel files hold bytes, not UTF-8: read_kernel_text decodes them with surrogateescape.
def kernel(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def unkernel(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# Any byte a path component may hold (not NUL, not "/"), weighted towards the awkward ones:
# invalid UTF-8, what str.splitlines() takes for a line break, and what the kernel escapes.
path_byte = st.one_of(
    st.integers(1, 255).filter(lambda b: b != ord("/")),
    st.sampled_from([0x80, 0xC3, 0xFF, 0xFE, 0x85, 0x0B, 0x0C, 0x1C, 0x1E, 0x20, 0x09, 0x0A, 0x5C]),
).map(lambda b: bytes([b]))
byte_paths = st.lists(st.lists(path_byte, min_size=1, max_size=6).map(b"".join), max_size=4).map(
    lambda parts: b"/" + b"/".join(parts)
)


def escape_bytes(path: bytes) -> bytes:
    """As the kernel's mangle_path/seq_path: only space, tab, newline and backslash."""
    out = path.replace(b"\\", b"\\134")
    return out.replace(b" ", b"\\040").replace(b"\t", b"\\011").replace(b"\n", b"\\012")


@given(root=byte_paths, point=byte_paths, source=byte_paths)
def test_mountinfo_line_keeps_every_byte_of_a_path(
    root: bytes, point: bytes, source: bytes
) -> None:
    head = [b"36", b"35", b"98:0", escape_bytes(root), escape_bytes(point), b"rw", b"shared:1"]
    line = b" ".join([*head, b"-", b"cgroup2", escape_bytes(source), b"rw"])
    mount = parse_mountinfo_line(kernel(line))
    assert unkernel(mount.root) == root and unkernel(mount.mount_point) == point
    assert unkernel(mount.source) == source and mount.fstype == "cgroup2"


@given(
    points=st.lists(byte_paths, min_size=1, max_size=5),
    garbage=st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=3),
)
def test_mountinfo_skips_what_it_cannot_read_and_keeps_the_rest(
    points: list[bytes], garbage: list[bytes]
) -> None:
    good = [
        b"%d 1 0:1 / %s rw - tmpfs none rw" % (i + 2, escape_bytes(p)) for i, p in enumerate(points)
    ]
    text = kernel(b"\n".join([*good, *garbage]) + b"\n")
    mounts, skipped = parse_mountinfo(text)
    got = [unkernel(m.mount_point) for m in mounts]
    # A garbage line may by chance be a valid mount line; the good ones are all there.
    assert got[: len(points)] == points
    assert len(mounts) + len(skipped) == len(good) + len([g for g in garbage if g])


@given(st.binary(max_size=40))
def test_integer_files_give_a_number_or_a_parse_error(raw: bytes) -> None:
    text = kernel(raw)
    stripped = raw.strip(b" \t\n")
    digits = stripped[1:] if stripped.startswith(b"-") else stripped
    try:
        value = parse_int(text, "memory.current")
    except ParseError:
        assert not (digits and digits.isdigit())
    else:
        assert digits.isdigit() and value == int(stripped)
    try:
        limit = parse_v2_limit(text)
    except ParseError:
        pass
    else:
        assert limit is None or limit >= 0


@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=8))
def test_memory_stat_with_any_bytes_keeps_only_clean_pairs(raw_lines: list[bytes]) -> None:
    stat = parse_memory_stat(kernel(b"\n".join([b"inactive_file 42", *raw_lines])))
    assert all(isinstance(v, int) for v in stat.values())
    if not any([p for p in line.split(b" ") if p][:1] == [b"inactive_file"] for line in raw_lines):
        assert stat["inactive_file"] == 42


_STAT_NAMES = ("hierarchical_memory_limit", "total_inactive_file", "inactive_file", "a")


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=30).filter(lambda b: b"\n" not in b),
            st.tuples(
                st.sampled_from([n.encode() for n in _STAT_NAMES] + [b"total_a", b"inactive"]),
                st.sampled_from([b" ", b"  ", b"\t", b" -", b" x"]),
                st.binary(max_size=6).filter(lambda b: b"\n" not in b)
                | st.integers(0, 99).map(lambda i: str(i).encode()),
            ).map(b"".join),
        ),
        max_size=10,
    ),
    st.sampled_from(_STAT_NAMES),
)
@example([b"a 1", b"total_a 3", b"a  2"], "a")
def test_memory_stat_value_is_the_full_parse_of_one_name(raw_lines: list[bytes], name: str) -> None:
    """The watch's one-counter lookup answers what the full parse answers, for any bytes
    (the last clean line of that name wins, a name inside another one does not count)."""
    text = kernel(b"\n".join(raw_lines) + b"\n")
    assert memory_stat_value(text, name) == parse_memory_stat(text).get(name)


@given(st.binary(max_size=40))
def test_pids_and_controllers_with_any_bytes(raw: bytes) -> None:
    text = kernel(raw)
    try:
        pids = parse_pids(text)
    except ParseError:
        pass
    else:
        assert pids == [int(line) for line in raw.split(b"\n") if line.strip(b" \t")]
    names = parse_controllers(text)
    assert all(unkernel(n) in raw for n in names)


@given(
    entries=st.lists(
        st.tuples(st.integers(0, 20), byte_paths.filter(lambda p: b"\n" not in p)), max_size=6
    )
)
def test_proc_cgroup_keeps_every_byte_of_a_path(entries: list[tuple[int, bytes]]) -> None:
    raw = b"".join(b"%d:memory:%s\n" % (hid, path) for hid, path in entries)
    parsed = parse_proc_cgroup(kernel(raw))
    assert [(e.hierarchy_id, unkernel(e.path)) for e in parsed] == entries


@given(st.integers(min_value=0, max_value=1), st.sampled_from(["", "\n", " \n"]))
def test_oom_group_reads_the_kernels_two_values(value: int, tail: str) -> None:
    assert parse_oom_group(f"{value}{tail}") is (value == 1)


@given(st.text(max_size=8))
def test_oom_group_rejects_anything_else(text: str) -> None:
    if text.strip(" \t\n") in ("0", "1"):
        return
    with pytest.raises(ParseError):
        parse_oom_group(text)


@given(st.integers(0, 99), st.integers(0, 999), st.sampled_from(["", ".3", ".0-18-amd64", "-rc1+"]))
def test_kernel_release_reads_major_minor(major: int, minor: int, tail: str) -> None:
    assert parse_kernel_release(f"{major}.{minor}{tail}\n") == (major, minor)


@pytest.mark.parametrize("text", ["", "linux", "6", "-5.9", "v6.1"])
def test_kernel_release_refuses_what_is_not_one(text: str) -> None:
    with pytest.raises(ParseError):
        parse_kernel_release(text)


@given(st.text(alphabet="0123456789-+_ \t\n\u0663\u00b2\u00b9\u07c0\uff11x", max_size=12))
def test_an_integer_is_ascii_digits_with_an_optional_minus(text: str) -> None:
    # The fast path (str.isdigit) must not take what int() would: Unicode digits,
    # superscripts, "+5", "1_000". The kernel writes `-?[0-9]+`.
    import re

    stripped = text.strip(" \t\n")
    want = re.fullmatch(r"-?[0-9]+", stripped)
    try:
        value = parse_int(text, "memory.current")
    except ParseError:
        assert want is None
    else:
        assert want is not None and value == int(stripped)
    if not any(c in stripped for c in " \t\n"):  # one value on one line
        line = f"total_inactive_file {stripped}\n"
        expected = None if want is None else int(stripped)
        assert memory_stat_value(line, "total_inactive_file") == expected
