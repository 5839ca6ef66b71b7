"""fit's default Adam (fused on the CPU and on CUDA) against PyTorch's single-tensor Adam.

    python bench/optimizer_time.py            # update times, then a detector's whole fit
    python bench/optimizer_time.py --rounds 3 --calls 50

Per parameter set, the median microseconds of one ``optimizer.step()`` (gradients fixed),
the two optimizers taking turns; then the seconds of ``AutoencoderOutlierDetector(32,
scale=None).fit`` on scikit-learn's 8x8 digits (50 epochs, batch 64) with either optimizer
(the best of ``--rounds``). Each optimizer steps untimed first and each fit is preceded by an
untimed one-epoch fit of both, and the turns alternate which goes first, so neither is charged
the process's or its own first-call costs. CPU timings: run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fastae.sklearn
import fastae.training
from fastae import benchmark as fb

# parameter shapes by name: one layer of the detector, an MNIST-sized layer, a deep VAE's
PARAMETER_SETS = {
    "64 -> 32 tied layer (W, b, c)": [(32, 64), (32,), (64,)],
    "784 -> 1024 tied layer (W, b, c)": [(1024, 784), (1024,), (784,)],
    "VAE 64-128-64-32, latent 2 (16 tensors)": [
        (128, 64), (128,), (64, 128), (64,), (32, 64), (32,), (4, 32), (4,),
        (32, 2), (32,), (64, 32), (64,), (128, 64), (128,), (64, 128), (64,),
    ],
}  # fmt: skip


def single_tensor_adam(model, lr, capturable=False, lr_tensor=False, weight_decay=0.0):
    """PyTorch's Adam as it is built without ``fused``: the single-tensor loop on the CPU."""
    return torch.optim.Adam(
        model.parameters(), lr=lr, weight_decay=weight_decay, capturable=capturable, foreach=False
    )


OPTIMIZERS = {
    "fit's default": fastae.training.default_optimizer,
    "single-tensor": single_tensor_adam,
}


WARM_UP_STEPS = 3


def _in_turn(names: list[str], round_: int) -> list[str]:
    """``names`` in their order on even rounds, reversed on odd ones: which goes first (and
    meets a cold cache or a clock ramping up) alternates."""
    return names if round_ % 2 == 0 else names[::-1]


def update_times(shapes, rounds: int, calls: int) -> dict[str, float]:
    """{optimizer: median microseconds of one step} for parameters of ``shapes``."""
    steppers = {}
    for name, make in OPTIMIZERS.items():
        model = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in shapes)
        for p in model:
            p.grad = torch.randn_like(p)
        steppers[name] = make(model, 1e-3)
        for _ in range(WARM_UP_STEPS):  # untimed: the first steps build the state and kernels
            steppers[name].step()
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for round_ in range(rounds):
        for name in _in_turn(list(steppers), round_):
            optimizer = steppers[name]
            for _ in range(calls):
                start = time.perf_counter()
                optimizer.step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def detector_fit_seconds(rounds: int, epochs: int = 50) -> dict[str, float]:
    """{optimizer: best seconds of a detector's fit on the digits}."""
    from sklearn.datasets import load_digits

    x = load_digits().data / 16.0

    def fit(name: str, epochs: int) -> float:
        fastae.sklearn.default_optimizer = OPTIMIZERS[name]
        fastae.training.default_optimizer = OPTIMIZERS[name]
        detector = fastae.AutoencoderOutlierDetector(32, scale=None, epochs=epochs, random_state=0)
        start = time.perf_counter()
        detector.fit(x)
        return time.perf_counter() - start

    seconds: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    try:
        for name in OPTIMIZERS:  # untimed: the process's first fit pays one-off costs
            fit(name, 1)
        for round_ in range(rounds):
            for name in _in_turn(list(OPTIMIZERS), round_):
                seconds[name].append(fit(name, epochs))
    finally:
        fastae.sklearn.default_optimizer = OPTIMIZERS["fit's default"]
        fastae.training.default_optimizer = OPTIMIZERS["fit's default"]
    return {name: min(s) for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=fb.positive_int, default=5)
    parser.add_argument("--calls", type=fb.positive_int, default=100, help="steps per round")
    args = parser.parse_args(argv)
    for name, shapes in PARAMETER_SETS.items():
        times = update_times(shapes, args.rounds, args.calls)
        cells = ", ".join(f"{opt} {us:.0f} us" for opt, us in times.items())
        ratio = times["single-tensor"] / times["fit's default"]
        print(f"{name}: {cells}: {ratio:.2f}x")
    seconds = detector_fit_seconds(args.rounds)
    cells = ", ".join(f"{opt} {s:.3f} s" for opt, s in seconds.items())
    print(f"detector fit, digits, 50 epochs: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
