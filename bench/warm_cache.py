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
import difflib
import multiprocessing
import os
import sys
import time

import torch

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
    sizes = tuple(fb.parse_sizes(args.sizes, "--sizes"))
    providers = fb.parse_list(args.providers, fb.ALL_PROVIDERS, "--providers")
    fastae = [p for p in fb.VARIANTS if p in providers]
    scope = getattr(args, "compile_cases", None) or "all"  # the suite's default on CUDA
    compiled = {"all": fb.CASES, "steps": fb.STEPS, "none": ()}[scope]
    out = []
    for dtype in fb.parse_list(args.dtypes, fb.DTYPES, "--dtypes"):
        for case in fb.CASE_ORDER:
            mine = tuple(p for p in fastae if not fb.unavailable(p, args.device, case))
            if mine:
                out.append((case, dtype, mine, sizes, args.device))
            if "compile" in providers and case in compiled:
                out.append((case, dtype, ("compile",), sizes, args.device))
    return out


def _misspelled(extras: list[str], known: list[str]) -> list[str]:
    """The options among ``extras`` (what this parser did not know) that are meant for it: an
    unknown ``--fastae-*`` one, or one close to a ``known`` spelling (``--sizez``). The
    suite's pytest options (``--benchmark-*``, ``-k EXPR``, ``--maxfail 2``) pass."""
    names = [extra.split("=", 1)[0] for extra in extras if extra.startswith("--")]
    return [
        name
        for name in names
        if name.startswith("--fastae-") or difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The benchmark suite's --fastae-* spellings are accepted, and its pytest options "
        "(--benchmark-*, -k EXPR, -x, ...) ignored, so one set of options serves both; an "
        "unknown --fastae-* option, or a misspelling of one of these, is an error.",
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
    parser.add_argument(
        "--fastae-compile-cases",
        dest="compile_cases",
        choices=("all", "steps", "none"),
        default=None,
        help="as the suite's: which cases to warm compile for (default: all)",
    )
    parser.add_argument("--fastae-budget-s", help="the suite's: ignored (see --budget-s)")
    parser.add_argument(
        "--workers", type=fb.positive_int, default=max(1, min(8, (os.cpu_count() or 2) - 2))
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop waiting for jobs after this long"
    )
    args, extras = parser.parse_known_args(argv)
    unknown = _misspelled(extras, [o for a in parser._actions for o in a.option_strings])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s:g}")
    try:
        args.device = fb.parse_device(args.device, "--device")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}, but CUDA is not available")
        todo = jobs(args)
    except ValueError as error:
        parser.error(str(error))
    if not todo:
        print(f"nothing to warm: none of the providers compiles on {args.device}", flush=True)
        return 0
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
