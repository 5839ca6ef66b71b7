"""Options and the shared fixture of the benchmark suites (``pytest bench --benchmark-only``).

Defaults: on the CPU one MNIST-like size (256x784x1024) in fp32; on CUDA the full size set
(B=256..4096 784->1024 and B=8192 4096->4096) in tf32 and bf16. ``--fastae-sizes``,
``--fastae-dtypes``, ``--fastae-providers`` and ``--fastae-device`` narrow or widen that.
On the CPU the compile provider runs the training steps only (``--fastae-compile-cases``):
each compilation takes seconds of the run's few minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from fastae import benchmark as fb


def pytest_addoption(parser):
    group = parser.getgroup("fastae", "fastae benchmarks")
    group.addoption("--fastae-device", default=None, help="cpu or cuda (default: cuda if present)")
    group.addoption(
        "--fastae-sizes",
        default=None,
        help=f"preset ({', '.join(fb.SIZE_SETS)}) or comma-separated BxDxH sizes "
        "(default: cpu on the CPU, full on CUDA)",
    )
    group.addoption(
        "--fastae-dtypes",
        default=None,
        help="comma-separated among fp32, tf32, bf16 (default: fp32 on the CPU, tf32,bf16 on CUDA)",
    )
    group.addoption(
        "--fastae-providers",
        default=None,
        help=f"comma-separated among {', '.join(fb.ALL_PROVIDERS[:-1])} (default: eager, "
        "compile, fastae; on CUDA also fastae_gemm, fastae_split, fastae_regenerate and floor)",
    )
    group.addoption(
        "--fastae-compile-cases",
        choices=("all", "steps", "none"),
        default=None,
        help="which cases the compile provider runs (default: steps on the CPU, where each "
        "compilation takes seconds, all on CUDA)",
    )
    group.addoption(
        "--fastae-budget-s",
        type=float,
        default=None,
        help="skip the cases that would start after this many seconds of the session",
    )


def pytest_configure(config):
    config.stash[_START] = time.monotonic()
    config.stash[_CHOSEN] = _chosen(config)


def _chosen(config) -> dict:
    """The device and the sizes, dtypes and providers to run, from the options (their
    defaults on that device); a usage error naming the option of a bad one."""
    try:
        device = fb.parse_device(config.getoption("--fastae-device"), "--fastae-device")
        sizes = config.getoption("--fastae-sizes") or fb.default_sizes(device)
        dtypes = config.getoption("--fastae-dtypes") or fb.default_dtypes(device)
        providers = config.getoption("--fastae-providers") or fb.default_providers(device)
        chosen = {
            "device": device,
            "size": fb.parse_sizes(sizes, "--fastae-sizes"),
            "dtype": fb.parse_list(dtypes, fb.DTYPES, "--fastae-dtypes"),
            "provider": fb.parse_list(providers, fb.ALL_PROVIDERS, "--fastae-providers"),
        }
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    budget = config.getoption("--fastae-budget-s")
    if budget is not None and not budget > 0:
        raise pytest.UsageError(f"--fastae-budget-s must be a positive number, got {budget:g}")
    return chosen


def pytest_collection_modifyitems(config, items):
    """Order: the cheap jacrev gap, then by case (fb.CASE_ORDER), dtype and size, with each
    case's providers back to back (so a budget cut leaves whole comparisons of the first
    cases)."""

    def key(item):
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        size = params.get("size")
        case = params.get("case")
        return (
            item.path.name != "test_jacrev_gap.py",
            fb.CASE_ORDER.index(case) if case in fb.CASE_ORDER else len(fb.CASE_ORDER),
            list(fb.DTYPES).index(params["dtype"]) if "dtype" in params else -1,
            (size.inputs, size.hidden, size.batch) if size else (),
        )

    here = Path(__file__).parent
    ours = [item for item in items if here in item.path.parents]
    items[:] = [item for item in items if here not in item.path.parents] + sorted(ours, key=key)


_START = pytest.StashKey[float]()
_CHOSEN = pytest.StashKey[dict]()
_LAUNCH_US = pytest.StashKey["float | None"]()


def pytest_benchmark_update_machine_info(config, machine_info):
    """The run's threads, load and launch cost before the first profile and at the end."""
    if _LAUNCH_US in config.stash:  # a case ran (not a comparison's load)
        machine_info.update(fb.run_conditions(_device(config), config.stash[_LAUNCH_US]))


def _device(config) -> str:
    return config.stash[_CHOSEN]["device"]


def pytest_generate_tests(metafunc):
    chosen = metafunc.config.stash[_CHOSEN]
    for name in ("size", "dtype", "provider"):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, chosen[name], ids=str)


@pytest.fixture
def device(request) -> str:
    return _device(request.config)


@pytest.fixture
def first_dtype(request) -> str:
    return request.config.stash[_CHOSEN]["dtype"][0]


@pytest.fixture
def run_case(request, benchmark, device):
    """Build a case, warm it up (compile time excluded), record its figures, time it."""
    compiled = []
    config = request.config
    budget = config.getoption("--fastae-budget-s")

    def run(case: str, provider: str, size: fb.Size, dtype: str) -> None:
        why = fb.unavailable(provider, device, case)
        if why:
            pytest.skip(why)
        if provider == "compile":
            scope = config.getoption("--fastae-compile-cases")
            scope = scope or ("steps" if device == "cpu" else "all")
            if scope == "none" or (scope == "steps" and case not in fb.STEPS):
                pytest.skip(f"--fastae-compile-cases is {scope!r} (compiling takes seconds a case)")
        if budget is not None and time.monotonic() - config.stash[_START] > budget:
            pytest.skip(f"the session's time budget ({budget:g} s) is spent")
        if _LAUNCH_US not in config.stash:  # before any profile (fb.launch_probe)
            config.stash[_LAUNCH_US] = fb.launch_probe(device)
        bench = fb.build(case, provider, size, dtype, device)
        compiled.append(provider in ("compile", fb.COMPILE_GRAPH))
        seconds = fb.warm_up(bench)
        benchmark.group = f"{case} {size} {dtype}"
        benchmark.extra_info.update(bench.info())
        rounds = fb.rounds_for(seconds, bench.device.type)
        # the settings once, outside the timed calls; on CUDA each round starts with the L2
        # cache evicted (untimed), so no provider is timed from what the last round cached
        with bench.settings():
            benchmark.pedantic(
                bench.timed, setup=fb.cache_flush(bench.device), rounds=rounds, iterations=1,
                warmup_rounds=1,
            )  # fmt: skip
        # the figures after the timed calls: the profiler's tracing may slow the calls after it
        benchmark.extra_info.update(fb.figures(bench))

    yield run
    if any(compiled):
        torch._dynamo.reset()
