"""Run by tests/test_launch.py in a subprocess, with Triton compiling (not interpreting) for
a stand-in driver (bench/fake_driver.py): every launcher of fastae, called through
``kernels.common.launch``, hands Triton's launcher the same compiled kernel, grid and
arguments as Triton's own launch path, call for call; from a key's second call on it does
not enter Triton's launch path; and with its table of keys bounded, it still launches right.
The calls mix what Triton specializes on (dtypes, aligned and unaligned data pointers, sizes
divisible by 16 or not, 32- and 64-bit seeds), so a key coarser than Triton's would reuse a
wrong kernel and show here. Where split-K is offered, a weight gradient whose kept kernel
runs SPLIT = 1 is launched with placeholders for its buffers (``launch_split_k``), one that
runs SPLIT = 2 (the autotuner made to pick it) with its buffers every time. Every kernel
compiles with fused multiply-add asked for (``common.FP_FUSION``), so Triton's warning about
its default (3.9) is an error here. Exit status 0: all agreed; it prints what it compared."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import fake_driver  # noqa: E402
import torch  # noqa: E402
from fastae.kernels import common, decoder, encoder, noise, sparsity, vae  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def unaligned(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous (rows, cols) tensor whose data pointer is not 16-byte aligned."""
    return torch.randn(rows * cols + 1, dtype=dtype)[1:].view(rows, cols)


def encode_step(x, weight, seed, fusion="gemm", noise_kind="masking", statistics=True):
    def run():
        os.environ["FASTAE_ENCODER_FUSION"] = fusion
        h, rho_hat, jac, stats = encoder.encode_forward(
            x, weight, weight[:, 0], "sigmoid", noise_kind, 0.25, 0.0, 1.0, seed, statistics
        )
        grad_h = torch.randn_like(h)
        grad_rho, grad_jac = (
            (torch.randn_like(rho_hat), torch.randn(())) if statistics else (None, None)
        )
        encoder.encode_backward(
            grad_h, grad_rho, grad_jac, x, weight, h, stats,
            "sigmoid", noise_kind, 0.25, 0.0, 1.0, seed, True,
        )  # fmt: skip

    return run


def decode_step(h, weight, fusion="gemm", uniform=False):
    def run():
        os.environ["FASTAE_DECODER_FUSION"] = fusion
        target = torch.rand(h.shape[0], weight.shape[0], dtype=h.dtype)
        _, grad_z = decoder.decode_forward(h, weight, None, target, "sigmoid", "bce")
        batch = h.shape[0]
        grad_loss = torch.rand(()).expand(batch) if uniform else torch.rand(batch)
        decoder.decode_backward(grad_loss, h, weight, grad_z, True)

    return run


def other_ops(x, seed, base):
    def run():
        noise.corrupt(x, "salt_pepper", 0.3, 0.0, 1.0, seed, base)
        noise.corrupt_input_grad(x, "masking_rescale", 0.3, seed, base)
        sparsity.bernoulli_kl(torch.rand(x.shape[1]), 0.05)
        z, kl = vae.reparameterize_forward(x, x, seed)
        vae.reparameterize_backward(torch.randn_like(z), None, x, x, seed)

    return run


def main() -> int:
    warnings.filterwarnings("error", message="TRITON_DEFAULT_FP_FUSION")
    # bfloat16 for the products: their kernels compile several times faster than float32's
    bf16 = torch.bfloat16
    x, weight = torch.randn(32, 48, dtype=bf16), torch.randn(40, 48, dtype=bf16)
    scenarios = [
        encode_step(x, weight, seed=3),
        encode_step(unaligned(32, 48, bf16), weight, seed=3),
        encode_step(x, weight, seed=2**40),
        encode_step(x, weight, seed=3, fusion="split"),
        encode_step(x, weight, seed=3, statistics=False),
        encode_step(x, weight, seed=3, fusion="split", statistics=False),
        decode_step(torch.randn(33, 17, dtype=bf16), torch.randn(17, 70, dtype=bf16).t()),
        decode_step(unaligned(33, 17, bf16), torch.randn(17, 70, dtype=bf16).t()),
        decode_step(torch.randn(33, 17, dtype=bf16), torch.randn(70, 17, dtype=bf16), uniform=True),
        decode_step(torch.randn(32, 40), torch.randn(48, 40), fusion="split"),
        other_ops(x.float(), seed=3, base=0),
        other_ops(unaligned(32, 48, torch.float32), seed=3, base=2**33),
        other_ops(x.float(), seed=2**40, base=0),
        # split-K offered (batch >= SPLIT_MIN_BATCH): buffers, or placeholders once kept
        encode_step(torch.randn(SPLIT_BATCH, 48, dtype=bf16), weight, seed=3, noise_kind="none"),
        decode_step(torch.randn(SPLIT_BATCH, 32, dtype=bf16), torch.randn(48, 32, dtype=bf16)),
    ]
    with fake_driver.installed() as launches:

        def record(direct: bool, split_k: list | None = None) -> list[list]:
            """Each scenario's launches, described; with ``split_k``, appends to it each
            scenario's weight-gradient launches as (SPLIT, ticket buffer's size)."""
            os.environ["FASTAE_DIRECT_LAUNCH"] = "1" if direct else "0"
            out = []
            for scenario in scenarios:
                launches.calls.clear()
                torch.manual_seed(0)
                scenario()
                out.append([describe(call) for call in launches.calls])
                if split_k is not None:
                    split_k.append([split_and_tickets(c) for c in launches.calls if is_dw(c)])
            return out

        tritons = record(direct=False)
        first_split_k, second_split_k, kept_split_k = [], [], []
        first = record(direct=True, split_k=first_split_k)
        fusions = {entry[0].metadata.enable_fp_fusion for entry in common._launches.values()}
        if fusions != {common.FP_FUSION}:
            print(f"kernels compiled with enable_fp_fusion {fusions}, want {common.FP_FUSION}")
            return 1
        entered = []
        tritons_run = JITFunction.run

        def counted(self, *args, **kwargs):
            entered.append(self)
            return tritons_run(self, *args, **kwargs)

        JITFunction.run = counted
        try:
            second = record(direct=True, split_k=second_split_k)
        finally:
            JITFunction.run = tritons_run
        # a full table of keys is emptied, and launches stay right
        launch_keys, common.LAUNCH_KEYS = common.LAUNCH_KEYS, 3
        common._launches.clear()
        bounded = record(direct=True)
        if len(common._launches) > 3:
            print(f"{len(common._launches)} keys kept, over the bound of 3")
            return 1
        common.LAUNCH_KEYS = launch_keys
        # the autotuner picks SPLIT = 2: the kept kernel gets its buffers on every call
        os.environ["FASTAE_AUTOTUNE"] = "1"
        Autotuner._bench = prefer_split
        batch = SPLIT_BATCH + 16
        scenarios[:] = [
            encode_step(torch.randn(batch, 48, dtype=bf16), weight, seed=3, noise_kind="none"),
            decode_step(torch.randn(batch, 32, dtype=bf16), torch.randn(48, 32, dtype=bf16)),
        ]
        split_twos = [record(direct=False), record(direct=True, split_k=kept_split_k)]
        entered_split = len(entered)
        JITFunction.run = counted
        try:
            split_twos.append(record(direct=True, split_k=kept_split_k))
        finally:
            JITFunction.run = tritons_run
    if split_twos[1] != split_twos[0] or split_twos[2] != split_twos[0]:
        print("SPLIT = 2 kept: launches differ from Triton's path")
        return 1
    if len(entered) != entered_split:
        print(f"SPLIT = 2 kept: {len(entered) - entered_split} launches took Triton's path")
        return 1
    # the split-K scenarios' weight gradients: SPLIT = 1 (FASTAE_AUTOTUNE=0 runs the first
    # config), with buffers on the first direct pass and placeholders on the second;
    # SPLIT = 2 with buffers on both
    unsplit_first = sum(first_split_k[-2:], [])
    unsplit_second = sum(second_split_k[-2:], [])
    split = sum(kept_split_k, [])
    if len(unsplit_first) != 2 or any(s != 1 or tickets == 1 for s, tickets in unsplit_first):
        print(f"SPLIT = 1, first call: {unsplit_first} (SPLIT, tickets), want buffers")
        return 1
    if unsplit_second != [(1, 1), (1, 1)]:
        print(f"SPLIT = 1 kept: {unsplit_second} (SPLIT, tickets), want placeholders")
        return 1
    if len(split) != 4 or any(s != 2 or tickets == 1 for s, tickets in split):
        print(f"SPLIT = 2 kept: {split} (SPLIT, tickets), want buffers every time")
        return 1
    compared = 0
    passes = zip(tritons, first, second, bounded, strict=True)
    for i, (want, got_first, got_second, got_bounded) in enumerate(passes):
        for label, got in (("first", got_first), ("second", got_second), ("bounded", got_bounded)):
            if got != want:
                print(f"scenario {i}, {label} direct pass: launches differ from Triton's path")
                for a, b in zip(want, got, strict=False):
                    if a != b:
                        print("  triton:", a, "\n  direct:", b)
                return 1
        compared += len(want)
    if entered:
        print(f"the second direct pass entered Triton's launch path {len(entered)} times")
        return 1
    names = sorted({call[0] for calls in tritons for call in calls})
    print(f"launches compared: {compared}; kernels: {', '.join(names)}")
    print("Triton launch path calls on the second direct pass: 0")
    print("split-K: kept unsplit kernels launched with placeholders, split ones with buffers")
    print(f"fused multiply-add: {common.FP_FUSION} in every kernel kept")
    return 0


SPLIT_BATCH = common.SPLIT_MIN_BATCH
SPLIT_BUFFERS = ("work_ptr", "work_dc_ptr", "ticket_ptr")
PARAMETERS = {
    name: [p.name for p in (kernel.fn if isinstance(kernel, Autotuner) else kernel).params]
    for module in (decoder, encoder, noise, sparsity, vae)
    for name, kernel in vars(module).items()
    if isinstance(kernel, Autotuner | JITFunction)
}


def prefer_split(self, *args, config, **meta):
    """Autotuner timings (nothing runs) that make a SPLIT = 2 config the fastest."""
    return [1.0] * 3 if config.kwargs.get("SPLIT") == 2 else [2.0] * 3


def describe(call) -> tuple:
    """What must agree between the two paths for one launch (tensors by dtype, shape,
    strides and data-pointer alignment: the two passes allocate their outputs anew; the
    split-K buffers by dtype and alignment only, which key the launch)."""
    name, grid, stream, function, packed, args = call
    names = PARAMETERS[name]
    split_k = "SPLIT" in names
    arguments = tuple(
        describe_argument(value, split_k and names[i] in SPLIT_BUFFERS)
        for i, value in enumerate(args)
    )
    return (name, grid, stream, function, packed, arguments)


def describe_argument(value, loose=False):
    if isinstance(value, torch.Tensor):
        if loose:
            return ("buffer", value.dtype, value.data_ptr() % 16)
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16)
    return (type(value), value)


def is_dw(call) -> bool:
    """Whether a launch is of a weight-gradient kernel (with split-K buffers)."""
    return "SPLIT" in PARAMETERS[call[0]]


def split_and_tickets(call) -> tuple[int, int]:
    """A weight-gradient launch's SPLIT and the size of its ticket buffer (1: a placeholder)."""
    name, *_, args = call
    names = PARAMETERS[name]
    return args[names.index("SPLIT")], args[names.index("ticket_ptr")].numel()


if __name__ == "__main__":
    sys.exit(main())
