"""``make test``'s processes share the suite out: each test runs once, in one of them."""

import os
import subprocess
import sys
from pathlib import Path

from parallel import combined_status

HERE = Path(__file__).parent


def _collected(jobs: int) -> tuple[int, list[str]]:
    """make test's exit status and the test ids its processes list (--collect-only)."""
    environment = {k: v for k, v in os.environ.items() if k != "FASTAE_TEST_SHARD"}
    result = subprocess.run(
        [sys.executable, str(HERE / "parallel.py"), str(jobs), "--collect-only",
         "-p", "no:cacheprovider", str(HERE / "test_philox.py")],
        capture_output=True, text=True, env=environment, cwd=HERE.parent, timeout=300,
    )  # fmt: skip
    return result.returncode, [line for line in result.stdout.splitlines() if "::" in line]


def test_the_processes_run_every_test_once():
    status, everything = _collected(1)
    assert status == 0 and len(everything) > 10
    status, shared = _collected(2)
    assert status == 0 and sorted(shared) == sorted(everything)


def test_the_exit_status_is_the_worst_of_the_processes_that_had_tests():
    assert combined_status([0, 0]) == 0
    assert combined_status([0, 1]) == combined_status([1, 0]) == 1
    assert combined_status([0, 5]) == 0  # one test selected, two processes
    assert combined_status([5, 5]) == 5
    assert combined_status([1, 4]) == 4
    assert combined_status([0, -9]) == 137  # killed (SIGKILL: out of memory) is a failure
    assert combined_status([-11, 5]) == 139
