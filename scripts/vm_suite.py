"""Run the cgroup v2 guest suite (tests/vm/guest) in one VM boot and print its results.

    uv run python scripts/vm_suite.py [--memory 1500M] [--results DIR] [--extended] [-- PYTEST ARGS]

Exit status: the guest pytest's own (0 when every guest test passed), 3 when the VM
cannot be booted here (with the packages to install), 2 when it booted but never finished.
`uv run pytest tests/vm` runs the same suite and reports each guest test as a host test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

from vmrun import (
    DEFAULT_MEMORY,
    VM_TIMEOUT,
    VMBootError,
    VMUnavailable,
    default_workdir,
    run_guest_suite,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default=DEFAULT_MEMORY, help="guest RAM (qemu -m)")
    parser.add_argument("--timeout", type=float, default=VM_TIMEOUT, help="seconds for the boot")
    parser.add_argument("--results", type=Path, default=None, help="keep junit and logs here")
    parser.add_argument(
        "--extended",
        action="store_true",
        help="also the tests that cost minutes of emulated work each (not in CI's boot)",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for the guest pytest")
    args = parser.parse_args(argv)
    if args.results is None:
        default_workdir().mkdir(parents=True, exist_ok=True)
        results = Path(tempfile.mkdtemp(prefix="results-", dir=default_workdir()))
    else:
        results = args.results.resolve()
    try:
        suite = run_guest_suite(
            results, args.memory, args.timeout, args.pytest_args, extended=args.extended
        )
    except VMUnavailable as exc:
        print(exc, file=sys.stderr)
        return 3
    except VMBootError as exc:
        print(exc, file=sys.stderr)
        return 2
    sys.stdout.write(suite.completed.stdout)
    sys.stderr.write(suite.completed.stderr[-4000:])
    print(f"\nguest pytest exit {suite.completed.returncode}; results in {results}")
    return suite.completed.returncode


if __name__ == "__main__":
    sys.exit(main())
