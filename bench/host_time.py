"""Host time of benchmark cases with every Triton kernel launch stubbed out.

What Python, autograd and fastae's launchers cost per call, measured without a GPU: the
triton backend runs on CPU tensors (Triton's interpreter mode lets it), but no kernel runs,
so outputs stay unwritten and only the time means anything. Triton's own launch path is not
in it. Beside it, eager PyTorch on the same tiny tensors, whose time is its host time too.

    python bench/host_time.py --cases encode_stats,all,vae --size 8x16x16
    python bench/host_time.py --routes --cases all,vae   # dispatcher / eager route / one node
    python bench/host_time.py --routes --backend reference --cases all,vae --size 8x30x16
    python bench/host_time.py --deep [--backend reference]   # deep models, a stack: one node / ops

Prints, per case, the best and the median of the rounds' mean microseconds per call. The
machine's noise shows in the gap between them; compare runs side by side. With ``--routes``
a training step's three paths take turns round by round: through the dispatcher (the
registered ops, as under a dispatch mode), the eager route with the ops composed, and the
one-node step (the default). With ``--deep`` the deep models' steps (zero grads, forward,
backward; the sizes of PyOD's and Keras's networks) take turns as one node and as the ops
composed. Both run with the kernels stubbed or, with ``--backend reference``, on the CPU's
reference backend (their time then includes the math).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402
from fastae.kernels import common, decoder, encoder, noise, sparsity, vae  # noqa: E402

import fastae  # noqa: E402
from fastae import benchmark as fb  # noqa: E402
from fastae import ops, steps  # noqa: E402
from fastae.modules import StackModule  # noqa: E402

STUB_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT": 1}


class _StubKernel:
    """Stands in for a ``kernel[grid](...)`` launch: calls the grid (launchers read the
    launched block sizes from a ``common.Grid``) and nothing else."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if isinstance(grid, common.Grid):
                grid(STUB_META)

        return launch


def stub_kernels(assign=setattr) -> list[str]:
    """Replace every ``_*_kernel`` of the kernel modules (with ``assign(module, name, stub)``;
    a test passes pytest's ``monkeypatch.setattr``); returns their names."""
    names = []
    for module in (encoder, decoder, noise, sparsity, vae):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                assign(module, name, _StubKernel())
                names.append(name)
    return names


def time_case(bench: fb.Bench, rounds: int, calls: int) -> tuple[float, float]:
    for _ in range(max(calls // 10, 3)):
        bench.step()
    means = [fb.host_us_per_step(bench, calls) for _ in range(rounds)]
    return min(means), statistics.median(means)


def time_routes(
    case: str, size: fb.Size, rounds: int, calls: int, backend: str = "triton"
) -> dict[str, list[float]]:
    """Mean microseconds per call of each round, for each of the step's paths (kernels
    stubbed, or the reference backend's math), the paths taking turns round by round."""
    plain_eager = ops._plain_eager
    routes = {
        "dispatcher, ops composed": (lambda args: False, False),
        "eager route, ops composed": (plain_eager, False),
        "eager route, one node": (plain_eager, True),
    }
    with fastae.use_backend(backend):
        benches = {name: fb.build(case, "fastae", size) for name in routes}
    means: dict[str, list[float]] = {name: [] for name in routes}
    try:
        for _ in range(rounds):
            for name, (route, one_node) in routes.items():
                ops._plain_eager, steps.ONE_NODE_STEP = route, one_node
                with fastae.use_backend(backend):
                    for _ in range(max(calls // 10, 3)):
                        benches[name].step()
                    means[name].append(fb.host_us_per_step(benches[name], calls))
    finally:
        ops._plain_eager, steps.ONE_NODE_STEP = plain_eager, True
    return means


# deep models by name: (the model, batch, input width)
DEEP_MODELS = {
    "VAE 64-128-64-32, latent 16, B=32": (
        lambda: fastae.VAE(64, (128, 64, 32), 16, check_targets=False), 32, 64
    ),
    "DeepAutoencoder 64-64-32, ReLU, MSE, B=64": (
        lambda: fastae.DeepAutoencoder(
            64, (64, 32), activation="relu", output="identity", loss="mse", check_targets=False
        ), 64, 64,
    ),
    "DeepAutoencoder 784-128-64-32, ReLU, BCE, B=256": (
        lambda: fastae.DeepAutoencoder(784, (128, 64, 32), check_targets=False), 256, 784
    ),
    "StackModule 64-64-32 (StackedAutoencoder's defaults: sigmoid, tied, MSE), B=64": (
        lambda: StackModule([
            fastae.Autoencoder(64, 64, output="identity", loss="mse"),
            fastae.Autoencoder(64, 32, check_targets=False),
        ]), 64, 64,
    ),
}  # fmt: skip


def time_deep(rounds: int, calls: int, backend: str = "triton") -> dict[str, dict]:
    """{model: {"one node": [...], "ops composed": [...]}}: mean microseconds per step of each
    round, the two paths taking turns round by round, on ``backend``."""
    results = {}
    try:
        for name, (make, batch, width) in DEEP_MODELS.items():
            torch.manual_seed(0)
            model, x = make(), torch.rand(batch, width)

            def step(model=model, x=x):
                for p in model.parameters():
                    p.grad = None
                model(x).loss.backward()

            means: dict[str, list[float]] = {"one node": [], "ops composed": []}
            with fastae.use_backend(backend):
                for _ in range(rounds):
                    for route, one_node in (("one node", True), ("ops composed", False)):
                        steps.ONE_NODE_STEP = one_node
                        for _ in range(max(calls // 10, 3)):
                            step()
                        start = time.perf_counter()
                        for _ in range(calls):
                            step()
                        means[route].append((time.perf_counter() - start) / calls * 1e6)
            results[name] = means
    finally:
        steps.ONE_NODE_STEP = True
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="encode_stats,all,vae", help="comma-separated cases")
    parser.add_argument(
        "--size", default="8x16x16", help="BATCHxINPUTSxHIDDEN (d, H multiples of 16: fused GEMMs)"
    )
    parser.add_argument("--rounds", type=fb.positive_int, default=7)
    parser.add_argument("--calls", type=fb.positive_int, default=300, help="calls per round")
    parser.add_argument(
        "--routes", action="store_true", help="a training step's three paths, taking turns"
    )
    parser.add_argument(
        "--deep", action="store_true", help="deep models' steps: one node and the ops composed"
    )
    parser.add_argument(
        "--backend", default="triton", choices=("triton", "reference"),
        help="with --deep or --routes: stubbed kernels (triton) or the reference backend's math",
    )  # fmt: skip
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
    if args.backend != "triton" and not (args.routes or args.deep):
        # the reference backend launches nothing (its time beside eager's is what
        # python -m fastae bench --device cpu measures)
        parser.error(
            f"--backend {args.backend} needs --routes or --deep: without them the cases time "
            "fastae's launches with the kernels stubbed"
        )
    if args.routes:
        for case in cases:
            if case not in fb.STEPS:
                parser.error(f"--routes times training steps, got --cases {case}")
    torch.set_num_threads(args.threads)
    stub_kernels()
    if args.deep:
        for name, means in time_deep(args.rounds, args.calls, args.backend).items():
            cells = [
                f"{route} best {min(m):.0f} us (median {statistics.median(m):.0f})"
                for route, m in means.items()
            ]
            ratio = min(means["ops composed"]) / min(means["one node"])
            print(f"{name}, {args.backend}: " + ", ".join(cells) + f": {ratio:.2f}x")
        return 0
    if args.routes:
        for case in cases:
            routes = time_routes(case, size, args.rounds, args.calls, args.backend)
            for name, means in routes.items():
                print(
                    f"{case} {size}, {args.backend}: {name}: best {min(means):.0f} us, "
                    f"median {statistics.median(means):.0f} us"
                )
    for case in cases:
        eager = time_case(fb.build(case, "eager", size), args.rounds, args.calls)
        with fastae.use_backend("triton"):
            stubbed = time_case(fb.build(case, "fastae", size), args.rounds, args.calls)
        print(
            f"{case} {size}: fastae (kernels stubbed) best {stubbed[0]:.0f} us, median "
            f"{stubbed[1]:.0f} us; eager best {eager[0]:.0f} us, median {eager[1]:.0f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
