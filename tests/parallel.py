"""``make test``: the suite in JOBS pytest processes at once (each runs the tests whose id
hashes to its share, see conftest.py), for the interpreted kernels keep one core busy each.
The first process prints as it goes, the others' output follows when they end; the exit
status is pytest's, the worst of the processes'.

    python tests/parallel.py JOBS [pytest arguments]
"""

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile

NO_TESTS = 5  # pytest's exit status when a process was given no test


def main(argv: list[str]) -> int:
    jobs, arguments = int(argv[0]), argv[1:]
    # -P (Python 3.11+; on 3.10 the checkout's fastae/ still comes first): the installed
    # fastae, not the checkout's fastae/ (whose kernels/ installs beside it as fastae.kernels),
    # where the install is not an editable one
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    command = [sys.executable, *safe_path, "-m", "pytest", "-q", *arguments]
    if jobs <= 1:
        return subprocess.call(command)
    environment = dict(os.environ)
    # torch's threads shared out between the processes
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    # one hash seed for all (drawn afresh each run, as for one process): tests parametrized
    # in a set's order are then the same tests in every process
    environment.setdefault("PYTHONHASHSEED", str(random.randrange(2**32)))
    print(
        f"---- pytest process 1 of {jobs} (PYTHONHASHSEED={environment['PYTHONHASHSEED']}) ----",
        flush=True,
    )
    for name in ("SIGTERM", "SIGHUP"):  # as Ctrl-C: the processes are stopped on the way out
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _exit_on_signal)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(1, jobs)]
        processes = []
        stack.callback(_stop, processes)  # an interrupted run leaves no pytest behind
        for index in range(jobs):
            buffered = index > 0
            # each its own cache: --lf and --sw find their process's failures
            cache = ["-o", f"cache_dir=.pytest_cache/process-{index + 1}-of-{jobs}"]
            processes.append(
                subprocess.Popen(
                    [*command, *([] if "no:cacheprovider" in arguments else cache)],
                    env=environment | {"FASTAE_TEST_SHARD": f"{index}/{jobs}"},
                    stdin=subprocess.DEVNULL if buffered else None,  # --pdb: the first only
                    stdout=logs[index - 1] if buffered else None,
                    stderr=subprocess.STDOUT if buffered else None,
                )
            )
        statuses = [process.wait() for process in processes]
        for index, log in enumerate(logs, start=1):
            log.seek(0)
            print(f"\n---- pytest process {index + 1} of {jobs} ----")
            print(log.read(), end="", flush=True)
    print(f"\ntests/parallel.py: {jobs} processes, exit statuses {statuses}")
    return combined_status(statuses)


def _exit_on_signal(number, frame) -> None:
    sys.exit(128 + number)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait()


def combined_status(statuses: list[int]) -> int:
    """The worst status, a process killed by signal N counting as 128 + N (as a shell
    reports it); a process given no test (a selection smaller than JOBS) counts only when no
    process was given one."""
    statuses = [128 - status if status < 0 else status for status in statuses]
    ran = [status for status in statuses if status != NO_TESTS] or [NO_TESTS]
    return max(ran)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
