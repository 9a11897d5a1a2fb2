"""Issue 24 row 13: the start refuses what `dask worker` would die on, and a dry run
exits as the start would.

- No scheduler address (no SCHEDULER argument, no `--scheduler-file`, nothing in dask's
  configuration): `dask worker` raised ValueError with a traceback, exit 1 (our
  "measurement failed"), after the limit and the plan file were written. Now one line,
  exit 2, before any write. Which configuration gives an address is checked against the
  installed dask itself.
- `--dry-run --cgroup-write required` exited 0 where the start exits 4: a read-only
  cgroup filesystem (a mount namespace of the test's own) in a test cgroup.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgroup_util import V1_ROOT, KernelCgroup
from dask_safe_worker.dask_compat.dask_config import config_paths, scheduler_address_configured
from dask_safe_worker.dask_compat.dask_worker import WORKER_VALUE_OPTIONS
from dask_safe_worker.dask_compat.release import Version, installed_release
from dask_safe_worker.worker_args import NO_SCHEDULER, launch_problem, scheduler_given
from scheduler_util import closed_port

DSW = [sys.executable, "-m", "dask_safe_worker"]
ADDRESS = f"tcp://127.0.0.1:{closed_port()}"


# --- the arguments: is a scheduler given? ------------------------------------------------


@pytest.mark.parametrize(
    "args, given",
    [
        ([], False),
        ([ADDRESS], True),
        (["--nthreads", "1", ADDRESS], True),
        (["--name", "tcp://x:1"], False),  # a value, not the SCHEDULER argument
        (["--name=tcp://x:1", "--no-nanny"], False),
        (["--scheduler-file", "/s.json"], True),
        (["--scheduler-file=/s.json"], True),
        (["--scheduler-file", ""], False),  # dask: `not scheduler_file`
        (["--scheduler-file="], False),
        ([""], False),
        (["--", ADDRESS], True),  # click fills SCHEDULER after `--` too
        (["--nthreads", "1", "--"], False),
    ],
)
def test_scheduler_given(args: list[str], given: bool) -> None:
    assert scheduler_given(args) is given
    problem = launch_problem(args, 1, True, False)
    assert (problem is None) is given
    if not given:
        assert problem == NO_SCHEDULER
    # Configured, or a query: never refused for it.
    assert launch_problem(args, 1, True, True) is None


value_options = sorted(WORKER_VALUE_OPTIONS - {"--scheduler-file"})
flags = ["--no-nanny", "--nanny", "--no-dashboard", "--reconnect"]
option_pieces = st.one_of(
    st.tuples(st.sampled_from(value_options), st.text(min_size=0, max_size=6)).map(list),
    st.tuples(st.sampled_from(value_options), st.text(max_size=6)).map(
        lambda t: [f"{t[0]}={t[1]}"]
    ),
    st.sampled_from(flags).map(lambda f: [f]),
)


@given(
    st.lists(option_pieces, max_size=6),
    st.integers(min_value=0, max_value=6),
    st.booleans(),
)
def test_a_scheduler_is_found_wherever_it_stands_among_options(
    pieces: list[list[str]], at: int, with_address: bool
) -> None:
    at = min(at, len(pieces))
    if with_address:
        pieces = [*pieces[:at], [ADDRESS], *pieces[at:]]
    args = [token for piece in pieces for token in piece]
    assert scheduler_given(args) is with_address


# --- dask's configuration, against the installed dask ------------------------------------


def _dask_has_address(env: dict[str, str]) -> bool:
    code = (
        "import distributed, dask.config; "
        "print(dask.config.get('scheduler-address', None) is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def _inherit(config: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(config).encode()).decode()


@pytest.mark.parametrize(
    "variables, files, expected",
    [
        ({}, {}, False),
        ({"DASK_SCHEDULER_ADDRESS": ADDRESS}, {}, True),
        ({"DASK_SCHEDULER__ADDRESS": ADDRESS}, {}, False),  # nested: another key
        ({"DASK_SCHEDULER_ADDRESS": "None"}, {}, False),
        ({"DASK_SCHEDULER_ADDRESS": "null"}, {}, False),
        ({"DASK_scheduler_address": ADDRESS}, {}, True),
        ({"DASK_INTERNAL_INHERIT_CONFIG": _inherit({"scheduler-address": ADDRESS})}, {}, True),
        ({"DASK_INTERNAL_INHERIT_CONFIG": _inherit({"scheduler": {"x": 1}})}, {}, False),
        ({}, {"root/a.yaml": f"scheduler-address: {ADDRESS}\n"}, True),
        ({}, {"home/.config/dask/b.yml": f"scheduler_address: {ADDRESS}\n"}, True),
        ({}, {"config/c.json": json.dumps({"scheduler-address": ADDRESS})}, True),
        (
            {},
            {"root/d.yaml": "distributed:\n  worker:\n    memory:\n      terminate: 0.9\n"},
            False,
        ),
        ({}, {"root/e.txt": f"scheduler-address: {ADDRESS}\n"}, False),  # not a config file
    ],
)
def test_configured_address_agrees_with_dask(
    variables: dict[str, str], files: dict[str, str], expected: bool, tmp_path: Path
) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "root").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "config").mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env = {
        **base,
        "HOME": str(tmp_path / "home"),
        "DASK_ROOT_CONFIG": str(tmp_path / "root"),
        "DASK_CONFIG": str(tmp_path / "config"),
        **variables,
    }
    prefixes = [sys.prefix, sys.exec_prefix]
    ours = scheduler_address_configured(env, prefixes, env["HOME"])
    assert ours is expected
    release = installed_release().distributed
    if variables.get("DASK_SCHEDULER_ADDRESS") == "null" and (
        release is None or release < Version(2024, 1, 0)
    ):
        # dask 2022 read variables with literal_eval: "null" stayed the string "null", an
        # address dask would then fail to reach. Refusing it is right for every release.
        return
    assert _dask_has_address(env) is expected
    assert str(tmp_path / "root") in config_paths(env, prefixes, env["HOME"])


# --- the command line ------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "XDG_RUNTIME_DIR"))}
    return {**base, **extra}


def test_a_start_without_a_scheduler_is_refused_before_any_write(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=str(home), DASK_ROOT_CONFIG=str(tmp_path / "none"))
    argv = [*DSW, "--log-format", "none", "--cgroup-write", "never", "--no-follow"]
    argv += ["--plan-file", str(plan), "--nthreads", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"dask-safe-worker: invalid dask worker arguments: Failed to launch worker. "
        f"{NO_SCHEDULER} (see `dask-safe-worker --worker-help`)"
    ]
    assert not plan.exists()
    # A query plans without a scheduler.
    dry = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["plan"]["budget"] > 0


@pytest.mark.kernel
def test_dry_run_exits_as_a_required_start_on_a_read_only_cgroupfs(
    kernel_cgroup: KernelCgroup, tmp_path: Path
) -> None:
    # Docker and Kubernetes mount the cgroupfs read-only: the start's write fails with
    # EROFS, and `--cgroup-write required` exits 4. The remount is in a mount namespace
    # of this test's own; the tool runs in a test cgroup with another process in it. The
    # namespace has a /run of its own: the start takes the pool's lock before it writes,
    # and the host's /run/dask-safe-worker must not keep it.
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        kernel_cgroup.add_pid(sleeper.pid)
        script = (
            f"echo $$ > {kernel_cgroup.path}/cgroup.procs && "
            "mount --make-rprivate / && mount -t tmpfs tmpfs /run && "
            f'mount -o remount,bind,ro {V1_ROOT} && exec "$@"'
        )
        codes = {}
        outputs = {}
        for mode in ("dry-run", "start"):
            plan = tmp_path / f"{mode}.json"
            argv = [*DSW, "--log-format", "none", "--cgroup-write", "required", "--no-follow"]
            argv += ["--plan-file", str(plan), ADDRESS, "--nthreads", "1"]
            if mode == "dry-run":
                argv.append("--dry-run")
            proc = subprocess.run(
                ["unshare", "--mount", "sh", "-c", script, "sh", *argv],
                capture_output=True,
                text=True,
                timeout=120,
                env=_env(),
            )
            if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
                pytest.skip(f"cannot remount the cgroupfs read-only here: {proc.stderr.strip()}")
            codes[mode], outputs[mode] = proc.returncode, proc
            assert "Traceback" not in proc.stderr
            assert not plan.exists()
        assert codes == {"dry-run": 4, "start": 4}, outputs
        assert "kernel limit could not be set (EROFS)" in outputs["start"].stderr
        assert "kernel limit could not be set (EROFS; found by --dry-run" in (
            outputs["dry-run"].stderr
        )
        predicted = json.loads(outputs["dry-run"].stdout)["cgroup_write"]["predicted"]
        assert (predicted["enforced"], predicted["reason"]) == (False, "EROFS")
        # Nothing was made below the test cgroup.
        assert [p for p in kernel_cgroup.path.iterdir() if p.is_dir()] == []
        # Without required, the dry run says the same and exits 0, as the start would.
        argv = [*DSW, "--log-format", "none", "--dry-run", ADDRESS, "--nthreads", "1"]
        proc = subprocess.run(
            ["unshare", "--mount", "sh", "-c", script, "sh", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["cgroup_write"]["predicted"]["reason"] == "EROFS"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_troubleshooting_quotes_the_refusal() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md").read_text()
    line = (
        "dask-safe-worker: invalid dask worker arguments: Failed to launch worker. "
        f"{NO_SCHEDULER} (see `dask-safe-worker --worker-help`)"
    )
    assert f"\n{line}\n" in doc
    assert "found by --dry-run, which wrote nothing" in doc
