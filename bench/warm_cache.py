"""Fill the on-disk compile caches of a benchmark run in parallel, before it runs.

On a fresh GPU machine most of a benchmark run's first minutes go to compiling: every Triton
kernel variant (activation, noise kind, dtype) once per autotuning candidate, and inductor's
code for the compile provider. Each compile is one process's work, so the run is bound by one
CPU core. This script runs each (case, dtype) of the run once in a pool of processes, with the
autotuners' timing replaced by one launch per candidate: every candidate is compiled, nothing is
timed, no choice is kept. The benchmark run then finds its kernels in Triton's cache and its
compiled graphs in inductor's FX graph cache, and times and tunes as usual.

    python bench/warm_cache.py --sizes lean --dtypes tf32,bf16 --workers 8 --budget-s 120
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

from fastae import benchmark as fb


def _launch_each_candidate_once(kernel_call, quantiles):
    kernel_call()
    return [1.0] * len(quantiles)


def _untimed_autotuning() -> None:
    from fastae.kernels import decoder, encoder, noise, vae
    from triton.runtime.autotuner import Autotuner

    for module in (encoder, noise, decoder, vae):
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                value._do_bench = _launch_each_candidate_once


def _warm(job: tuple[str, str, tuple[str, ...], tuple[fb.Size, ...], str]) -> str:
    case, dtype, providers, sizes, device = job
    _untimed_autotuning()
    start = time.perf_counter()
    try:
        for provider in providers:
            for size in sizes:
                fb.warm_up(fb.build(case, provider, size, dtype, device))
    except Exception as error:  # a failed job must not stop the others; the run will show it
        return f"{case} {dtype} {','.join(providers)}: FAILED {type(error).__name__}: {error}"
    return f"{case} {dtype} {','.join(providers)}: {time.perf_counter() - start:.0f} s"


def jobs(args: argparse.Namespace) -> list[tuple]:
    """One job per (case, dtype) for the fastae providers and one for compile, in the order of
    a benchmark run (fb.CASE_ORDER): a job's providers share kernels, so one process compiles
    them once."""
    sizes = tuple(fb.parse_sizes(args.sizes))
    fastae = [p for p in fb.VARIANTS if p in args.providers.split(",")]
    out = []
    for dtype in fb.parse_list(args.dtypes, fb.DTYPES, "--dtypes"):
        for case in fb.CASE_ORDER:
            mine = tuple(p for p in fastae if not fb.unavailable(p, args.device, case))
            if mine:
                out.append((case, dtype, mine, sizes, args.device))
            if "compile" in args.providers.split(","):
                out.append((case, dtype, ("compile",), sizes, args.device))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The benchmark suite's --fastae-* spellings are accepted, and its other options "
        "ignored, so one set of options serves both.",
    )
    parser.add_argument("--device", "--fastae-device", default="cuda")
    parser.add_argument("--sizes", "--fastae-sizes", default="lean", help="as --fastae-sizes")
    parser.add_argument(
        "--dtypes", "--fastae-dtypes", default="tf32,bf16", help="as --fastae-dtypes"
    )
    parser.add_argument(
        "--providers",
        "--fastae-providers",
        default="compile,fastae,fastae_gemm,fastae_split,fastae_regenerate",
        help="which to warm (eager and floor compile nothing)",
    )
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop waiting for jobs after this long"
    )
    args, _ = parser.parse_known_args(argv)
    todo = jobs(args)
    print(f"warming {len(todo)} jobs in {args.workers} processes", flush=True)
    start = time.monotonic()
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(args.workers)
    pending = pool.imap_unordered(_warm, todo, chunksize=1)
    done = 0
    try:
        while done < len(todo):
            left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise multiprocessing.TimeoutError
            print(f"  [{time.monotonic() - start:4.0f} s] {pending.next(left)}", flush=True)
            done += 1
        pool.close()
    except multiprocessing.TimeoutError:
        print(f"budget spent: {done} of {len(todo)} jobs done", flush=True)
        pool.terminate()
    pool.join()
    print(f"warmed in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
