"""Host time of training steps through Triton's launch path and through fastae's direct one.

Measured without a GPU: Triton compiles the kernels for an H100/H200 and launches reach a
stand-in driver that runs nothing (``bench/fake_driver.py``), so outputs stay unwritten and
only the time means anything. Per case, three providers on the same tiny tensors, rounds
alternating: fastae with every kernel launched through Triton's ``kernel[grid](...)``
(``FASTAE_DIRECT_LAUNCH=0``), fastae as it launches by default, and eager PyTorch (on the
CPU: its own host time plus tiny CPU kernels). The driver's launch itself (argument packing
and cuLaunchKernel, a few microseconds on the GPU machine) is not in the fastae times.

    python bench/launch_time.py --cases encode_stats,all --size 8x16x16

Prints, per case and provider, the best and the median of the rounds' mean microseconds per
call, and the launches per call. Compare the providers within one run: the machine's noise
shows in the gap between best and median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: before Triton is imported

import fake_driver  # noqa: E402
import torch  # noqa: E402

import fastae  # noqa: E402
from fastae import backend  # noqa: E402
from fastae import benchmark as fb  # noqa: E402


def host_time(bench: fb.Bench, direct: str | None, rounds: int, calls: int) -> list[float]:
    """Mean microseconds per call of each round."""
    if direct is not None:
        os.environ["FASTAE_DIRECT_LAUNCH"] = direct
    return [fb.host_us_per_step(bench, calls) for _ in range(rounds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="encode_stats,all", help="comma-separated cases")
    parser.add_argument(
        "--size", default="8x16x16", help="BATCHxINPUTSxHIDDEN (d, H multiples of 16: fused GEMMs)"
    )
    parser.add_argument("--dtype", default="bf16", choices=tuple(fb.DTYPES))
    parser.add_argument("--rounds", type=fb.positive_int, default=7)
    parser.add_argument("--calls", type=fb.positive_int, default=200, help="calls per round")
    parser.add_argument(
        "--threads", type=fb.positive_int, default=1,
        help="torch's CPU threads (default 1, a GPU run's host work: the tiny CPU ops' thread "
        "pool, waking on a loaded machine, swings them by milliseconds)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cases = fb.parse_list(args.cases, fb.CASES, "--cases")
        size = fb.Size.parse(args.size, "--size")
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    # the triton backend on CPU tensors: their data pointers reach the stand-in driver only
    backend._triton_can_run = lambda device: (True, "")
    providers = {"fastae, Triton's launch": "0", "fastae, direct launch": "1", "eager": None}
    with fake_driver.installed() as launches, fastae.use_backend("triton"):
        launches.recording = False
        for case in cases:
            benches = {
                name: fb.build(case, "eager" if direct is None else "fastae", size, args.dtype)
                for name, direct in providers.items()
            }
            for name, direct in providers.items():  # compile, autotune, fill the caches
                host_time(benches[name], direct, 1, 3)
            launches.recording = True
            launches.calls.clear()
            host_time(benches["fastae, direct launch"], "1", 1, 1)
            per_call = len(launches.calls)
            launches.recording = False
            times = {name: [] for name in providers}
            for _ in range(args.rounds):
                for name, direct in providers.items():
                    times[name] += host_time(benches[name], direct, 1, args.calls)
            print(f"{case} {size} {args.dtype} ({per_call} launches a call):")
            for name, means in times.items():
                best, median = min(means), statistics.median(means)
                print(f"  {name:24s} best {best:6.0f} us, median {median:6.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
