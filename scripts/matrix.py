#!/usr/bin/env python3
"""The compatibility matrix: Python versions x distributed releases, driven by uv.

Each cell gets a fresh venv (uv venv + uv pip install) with the project (editable), that
distributed/dask release and the dev dependency group, then runs
  1. unit tests (not marked kernel/e2e/container/vm): all of them in the cells of the
     oldest and the newest Python, only the release-sensitive files (RELEASE_SENSITIVE) in
     the others,
  2. the parity tests against that release (tests/test_parity.py) that start nothing,
  3. the real starts: the parity tests' real `dask worker` runs and one end-to-end start of
     ours in a test cgroup (tests/test_e2e.py, --nworkers 1).
Steps 1 and 2 of `--jobs` cells run at once (each pytest is one process, so two fill two
cores); step 3 then runs one cell at a time, since it compares what real workers got
with predictions on a host the other cells would load. It prints the time per cell and a closing
"matrix: N passed, N failed" line, and exits non-zero if any cell failed.

    uv run python scripts/matrix.py                 # the default cells, one at a time
    uv run python scripts/matrix.py --jobs 2        # CI: two cells' unit tests at once
    uv run python scripts/matrix.py --list
    uv run python scripts/matrix.py --cell 3.13:2022.9.2 --cell 3.10:2026.8.0
    uv run python scripts/matrix.py --quick         # no real starts (step 3)
    uv run python scripts/matrix.py --cell 3.13:2026.8.0 --unsupported 3.13:2022.9.1

Interpreters: $DSW_PYTHON_3_12 (etc.) if set, else pyenv's versions directory, else
python3.12 on PATH, else `uv python find` (downloads stay off: only PyPI is reachable).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEWEST = "2026.8.0"
OLDEST = "2022.9.2"  # dask_compat.release.OLDEST_SUPPORTED: the first release with v2 detection
# Each supported Python with the newest release but 3.11, the locked environment's, whose
# whole suite the main pytest run already is; the newest Python with the oldest release
# (2022.9.2 installs and runs on 3.13), 2024.12 and a 2025 release.
DEFAULT_CELLS: tuple[tuple[str, str], ...] = (
    ("3.10", NEWEST),
    ("3.12", NEWEST),
    ("3.13", NEWEST),
    ("3.13", OLDEST),
    ("3.13", "2024.12.1"),
    ("3.13", "2025.12.0"),
)
# Every unit test runs on the oldest and the newest Python (what differs between Pythons
# can break any module); the other cells run the files whose outcome depends on the
# installed dask/distributed: the per-release rules, the CLI and worker arguments judged
# by the release's click command, dask's configuration, LocalCluster's counts, the
# preloads and `dask cuda worker`'s division. A new test that imports dask or distributed,
# or compares with them, belongs in one of these files or on this list.
FULL_UNIT_PYTHONS = ("3.10", "3.13")
RELEASE_SENSITIVE = (
    "tests/test_dask_compat.py",
    "tests/test_cli.py",
    "tests/test_worker_args.py",
    "tests/test_worker_cli.py",
    "tests/test_start_exit_codes.py",
    "tests/test_leading_command.py",
    "tests/test_gpu_workers.py",
    "tests/test_follow_dask.py",
    "tests/test_notebook.py",
    "tests/test_audit_odd_workers.py",
)
# Releases below the range, expected to fail at start-up with one clear line. Empty until
# the CLI calls dask_compat.release.check_supported(); then add ("3.13", "2022.9.1").
DEFAULT_UNSUPPORTED: tuple[tuple[str, str], ...] = (("3.13", "2022.9.1"),)
UNIT_MARKERS = "not kernel and not e2e and not container and not vm and not image"
E2E_TEST = "tests/test_e2e.py::test_worker_limit_equals_plan[1]"
# Unit tests that assume the locked environment or the newest release, not the cell's.
# Each is deselected in every cell with its reason printed; remove an entry once its test
# is gated on dask_compat.features.release_features() / the installed release.
NOT_PORTABLE: dict[str, str] = {}
REPORTED = ("distributed", "dask", "click", "structlog", "cgroupspy", "psutil", "tornado")


@dataclass
class Result:
    python: str
    distributed: str
    ok: bool = False
    setup_s: float = 0.0
    steps: list[tuple[str, bool, float, str]] = field(default_factory=list)
    versions: str = ""
    error: str = ""

    @property
    def total_s(self) -> float:
        return self.setup_s + sum(s[2] for s in self.steps)


def find_python(version: str) -> str | None:
    """An interpreter for `version` (e.g. "3.12") that really runs.

    pyenv shims on PATH fail for any version but the active one, so pyenv's own versions
    directory comes before PATH.
    """
    candidates: list[str] = []
    env = os.environ.get(f"DSW_PYTHON_{version.replace('.', '_')}")
    if env:
        candidates.append(env)
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates += sorted(
        glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True
    )
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    uv = subprocess.run(
        ["uv", "python", "find", "--no-python-downloads", version],
        capture_output=True,
        text=True,
    )
    if uv.returncode == 0 and uv.stdout.strip():
        candidates.append(uv.stdout.strip())
    for candidate in candidates:
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


def run(cmd: Sequence[str], log: Path, env: dict[str, str], timeout: float) -> tuple[bool, str]:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s"
    return proc.returncode == 0, f"exit {proc.returncode}"


def pytest_summary(log: Path) -> str:
    """The last pytest result line in the log (e.g. "41 passed, 2 skipped in 12.3s")."""
    lines = [
        ln.strip("= \n")
        for ln in log.read_text(errors="replace").splitlines()
        if re.search(r"\b(passed|failed|error|no tests ran)\b", ln) and " in " in ln
    ]
    return lines[-1] if lines else ""


def cell_paths_and_env(
    name: str, workdir: Path, env0: dict[str, str]
) -> tuple[Path, Path, dict[str, str]]:
    """A cell's venv path, its fresh log, and an environment that uses that venv only
    and never lets uv download an interpreter (only PyPI is reachable)."""
    log = workdir / f"{name}.log"
    log.write_text("")
    env = {k: v for k, v in env0.items() if k != "VIRTUAL_ENV"}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return workdir / name, log, env


@dataclass(frozen=True)
class Cell:
    """A cell whose venv is installed: what its later steps run with."""

    name: str
    py: str
    log: Path
    env: dict[str, str]


def unit_tests(python_version: str, dist: str) -> list[str]:
    """The unit step's test paths: everything on the oldest and the newest Python with the
    newest release, the release-sensitive files elsewhere."""
    if dist == NEWEST and python_version in FULL_UNIT_PYTHONS:
        return ["tests", "--ignore=tests/containers", "--ignore=tests/vm"]
    return list(RELEASE_SENSITIVE)


def pytest_command(py: str) -> list[str]:
    return [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra"]


def run_step(res: Result, cell: Cell, step: str, cmd: list[str], workdir: Path) -> None:
    t0 = time.monotonic()
    mark = cell.log.stat().st_size
    ok, why = run(cmd, cell.log, cell.env, 1200)
    with cell.log.open() as f:
        f.seek(mark)
        tail = f.read()
    tmp = workdir / f"{cell.name}.{step}.part"
    tmp.write_text(tail)
    summary = pytest_summary(tmp) or why
    tmp.unlink()
    res.steps.append((step, ok, time.monotonic() - t0, summary))
    if not ok:
        res.ok = False
        res.error = f"{step} failed ({why}); see {cell.log}"


def set_up_and_unit(
    python_version: str, dist: str, workdir: Path, env0: dict[str, str]
) -> tuple[Result, Cell | None]:
    """The venv, the unit step and the parity tests that start nothing: the part of a cell
    that may run beside another cell's."""
    res = Result(python_version, dist)
    name = f"py{python_version}-distributed{dist}"
    venv, log, env = cell_paths_and_env(name, workdir, env0)
    start = time.monotonic()
    interpreter = find_python(python_version)
    if interpreter is None:
        res.error = f"no Python {python_version} interpreter found"
        return res, None
    py = str(venv / "bin/python")
    ok, why = run(["uv", "venv", "-q", "--python", interpreter, str(venv)], log, env, 300)
    if ok:
        ok, why = run(
            [
                "uv",
                "pip",
                "install",
                "-q",
                "--python",
                py,
                "--group",
                "dev",
                "-e",
                ".",
                f"distributed=={dist}",
                f"dask=={dist}",
            ],
            log,
            env,
            900,
        )
    res.setup_s = time.monotonic() - start
    if not ok:
        res.error = f"setup failed ({why}); see {log}"
        return res, None
    probe = subprocess.run(
        [
            py,
            "-c",
            "import importlib.metadata as m, sys; print(' '.join("
            "f'{p}={m.version(p)}' for p in sys.argv[1:]))",
            *REPORTED,
        ],
        capture_output=True,
        text=True,
    )
    res.versions = probe.stdout.strip()
    cell = Cell(name, py, log, env)
    res.ok = True
    unit = [
        *pytest_command(py),
        "-m",
        UNIT_MARKERS,
        *unit_tests(python_version, dist),
        "--ignore=tests/test_parity.py",
        *(f"--deselect={t}" for t in NOT_PORTABLE),
    ]
    run_step(res, cell, "unit", unit, workdir)
    parity = [*pytest_command(py), "-m", "not e2e", "tests/test_parity.py"]
    run_step(res, cell, "parity", parity, workdir)
    return res, cell


def real_starts(res: Result, cell: Cell, workdir: Path) -> None:
    """The steps that start real workers: one cell at a time, since their predictions and
    limits are compared with what a loaded host gives them."""
    run_step(
        res,
        cell,
        "e2e",
        [*pytest_command(cell.py), "-m", "e2e", "tests/test_parity.py", E2E_TEST],
        workdir,
    )


def run_unsupported_cell(
    python_version: str, dist: str, workdir: Path, env0: dict[str, str]
) -> Result:
    """A release below the supported range must fail at start-up with one clear line
    naming the range (dask_compat.release.check_supported), not a traceback."""
    res = Result(python_version, f"{dist} (unsupported)")
    name = f"py{python_version}-distributed{dist}-unsupported"
    venv, log, env = cell_paths_and_env(name, workdir, env0)
    start = time.monotonic()
    interpreter = find_python(python_version)
    if interpreter is None:
        res.error = f"no Python {python_version} interpreter found"
        return res
    py = str(venv / "bin/python")
    overrides = workdir / f"{name}.overrides.txt"
    # Our own pyproject forbids this release, so force it in, as a user's image would.
    overrides.write_text(f"distributed=={dist}\ndask=={dist}\n")
    ok, why = run(["uv", "venv", "-q", "--python", interpreter, str(venv)], log, env, 300)
    if ok:
        install = ["uv", "pip", "install", "-q", "--python", py, "--override", str(overrides)]
        ok, why = run([*install, "-e", "."], log, env, 900)
    res.setup_s = time.monotonic() - start
    if not ok:
        res.error = f"setup failed ({why}); see {log}"
        return res
    t0 = time.monotonic()
    proc = subprocess.run(
        [py, "-m", "dask_safe_worker", "--dry-run", "tcp://127.0.0.1:1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with log.open("a") as out:
        out.write(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n")
    clear = (
        proc.returncode != 0
        and "Traceback" not in proc.stderr
        and OLDEST in proc.stderr
        and dist in proc.stderr
    )
    summary = proc.stderr.strip().splitlines()[-1][:160] if proc.stderr.strip() else ""
    res.steps.append(("start-up error", clear, time.monotonic() - t0, summary))
    res.ok = clear
    if not clear:
        res.error = f"expected a clear error naming {OLDEST} and {dist}; see {log}"
    return res


def parse_cell(text: str) -> tuple[str, str]:
    python_version, sep, dist = text.partition(":")
    if not sep or not re.fullmatch(r"3\.\d+", python_version) or not dist:
        raise argparse.ArgumentTypeError(
            f"a cell is PYTHON:DISTRIBUTED, e.g. 3.13:2022.9.2, not {text!r}"
        )
    return python_version, dist


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cell", action="append", type=parse_cell, help="PYTHON:DISTRIBUTED (repeatable)"
    )
    ap.add_argument(
        "--unsupported",
        action="append",
        type=parse_cell,
        default=[],
        help="PYTHON:DISTRIBUTED below the range; expect a clear start-up error (repeatable)",
    )
    ap.add_argument("--list", action="store_true", help="print the cells and exit")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="skip the real starts (the parity tests' `dask worker` runs and the e2e start)",
    )
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("DSW_MATRIX_JOBS", "1")))
    ap.add_argument("--workdir", type=Path, help="keep venvs and logs here (default: a temp dir)")
    args = ap.parse_args(argv)
    explicit = bool(args.cell or args.unsupported)
    cells: list[tuple[str, str]] = args.cell or ([] if explicit else list(DEFAULT_CELLS))
    if not explicit:
        args.unsupported = list(DEFAULT_UNSUPPORTED)
    if args.list:
        for python_version, dist in cells:
            print(f"{python_version}:{dist}")
        for python_version, dist in args.unsupported:
            print(f"{python_version}:{dist} (unsupported: expects a clear start-up error)")
        return 0
    if shutil.which("uv") is None:
        print("matrix: uv is not on PATH", file=sys.stderr)
        return 2

    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dsw-matrix-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"matrix: {len(cells)} cells, {args.jobs} at a time, logs in {workdir}", flush=True)
    for test, reason in NOT_PORTABLE.items():
        print(f"matrix: deselected {test}: {reason}", flush=True)
    started = time.monotonic()
    env0 = dict(os.environ)

    def report(res: Result) -> None:
        status = "PASS" if res.ok else "FAIL"
        print(
            f"matrix: {status} python {res.python} distributed {res.distributed}: "
            f"{res.total_s:.0f} s (setup {res.setup_s:.0f} s"
            + "".join(f", {s[0]} {s[2]:.0f} s" for s in res.steps)
            + ")",
            flush=True,
        )

    def first(cell: tuple[str, str]) -> tuple[Result, Cell | None]:
        res, ready = set_up_and_unit(cell[0], cell[1], workdir, env0)
        print(
            f"matrix: unit {'ok' if res.ok else 'FAILED'} python {res.python} "
            f"distributed {res.distributed}",
            flush=True,
        )
        return res, ready

    def one_unsupported(cell: tuple[str, str]) -> Result:
        res = run_unsupported_cell(cell[0], cell[1], workdir, env0)
        print(
            f"matrix: {'PASS' if res.ok else 'FAIL'} python {res.python} distributed "
            f"{res.distributed}: {res.total_s:.0f} s",
            flush=True,
        )
        return res

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        firsts = list(pool.map(first, cells))
        unsupported = list(pool.map(one_unsupported, args.unsupported))
    results: list[Result] = []
    for res, ready in firsts:
        # A cell whose unit step failed still runs the rest: the report names every
        # step that fails, not only the first.
        if ready is not None and not args.quick:
            real_starts(res, ready, workdir)
        report(res)
        results.append(res)
    results += unsupported

    print("\nmatrix results")
    print(f"{'python':<7} {'distributed':<12} {'result':<6} {'total':>6} {'setup':>6}  steps")
    for r in results:
        steps = "; ".join(
            f"{s[0]} {'ok' if s[1] else 'FAILED'} {s[2]:.0f}s ({s[3]})" for s in r.steps
        )
        print(
            f"{r.python:<7} {r.distributed:<12} {'PASS' if r.ok else 'FAIL':<6} "
            f"{r.total_s:>5.0f}s {r.setup_s:>5.0f}s  {steps}"
        )
        if r.versions:
            print(f"{'':<7} {r.versions}")
        if r.error:
            print(f"{'':<7} {r.error}")
    passed = sum(r.ok for r in results)
    failed = len(results) - passed
    print(f"matrix wall time: {time.monotonic() - started:.0f} s")
    if own_tmp and failed == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        for r in results:
            if not r.ok:
                suffix = r.distributed.replace(" (unsupported)", "-unsupported")
                log = workdir / f"py{r.python}-distributed{suffix}.log"
                if log.exists():
                    print(f"\n--- tail of {log}")
                    print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))
    print(f"matrix: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
