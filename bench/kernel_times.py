"""Kernel-level A/B times on CUDA for choices made inside one op (triton.testing.do_bench,
median of its repeats; each variant beside the other in one run):

- encode forward with and without statistics (the GEMM's epilogue sums and the finishing
  launch, against h alone);
- decode_loss backward with a per-sample upstream weight (as ``.mean()``'s backward gives)
  and with one weight expanded (as ``.sum() / B`` gives: applied after the sums);
- encode forward (h only) through the fused GEMM and through the split boundary (cuBLAS's
  product and one activation pass): at a d or H not a multiple of 16 the rules take split;
- encode and decode backward as autotuned (the weight gradient may be split-K where it is few
  tiles over many rows), with split-K off, and through the split boundary (cuBLAS's weight
  gradient: what the rules take in tf32, whose weight-gradient kernels fill shared memory
  with 4-byte copies);
- torch.mm of the same size, the bare product.

    python bench/kernel_times.py --sizes 4096x784x1024,4096x784x1000,8192x4096x4096 --dtype bf16
    python bench/kernel_times.py --sizes 4096x784x1024 --dtype tf32

Prints one line per (size, variant) in microseconds; FASTAE_ENCODER_FUSION and
FASTAE_DECODER_FUSION are forced to gemm (the fused kernels these choices live in) except
where a variant says split.

``--finish`` times the encoder's finishing kernel alone instead, on random float32 partial
sums of ``parts`` row tiles by H columns, with its column block (programs = H / block) as
launched and narrower; each line gives the time and the bytes read over it. At 8192 x 4096 ->
4096 it took 149-285 us of an H200 for 2-8 MB of partials: whether its time follows the bytes,
the parts a program loops over or neither says where to look.

    python bench/kernel_times.py --finish
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from fastae.kernels import common, decoder, encoder
from triton.testing import do_bench

from fastae import benchmark as fb


def variants(size: fb.Size, dtype: torch.dtype, device: str = "cuda") -> dict:
    """name -> a call of the variant (what is timed)."""
    batch, features, hidden = size
    x = torch.rand(batch, features, device=device, dtype=dtype)
    weight = torch.randn(hidden, features, device=device, dtype=dtype) * features**-0.5
    bias = torch.zeros(hidden, device=device, dtype=dtype)
    h, _, _, stats = encoder.encode_forward(x, weight, bias, "sigmoid", "none", 0.0, 0.0, 1.0, 0)
    grad_h = torch.randn_like(h)
    _, grad_z = decoder.decode_forward(h, weight.t(), None, x, "sigmoid", "bce")
    per_sample = torch.full((batch,), 1.0 / batch, device=device)
    uniform = torch.full((), 1.0 / batch, device=device).expand(batch)

    def encode(statistics):
        return lambda: encoder.encode_forward(
            x, weight, bias, "sigmoid", "none", 0.0, 0.0, 1.0, 0, statistics
        )

    def split(fn):
        def call():
            os.environ["FASTAE_ENCODER_FUSION"] = os.environ["FASTAE_DECODER_FUSION"] = "split"
            try:
                return fn()
            finally:
                os.environ["FASTAE_ENCODER_FUSION"] = os.environ["FASTAE_DECODER_FUSION"] = "gemm"

        return call

    def decode_backward(grad_loss, needs_h_grad=True):
        return lambda: decoder.decode_backward(grad_loss, h, weight.t(), grad_z, needs_h_grad)

    def encode_backward():
        return encoder.encode_backward(
            grad_h, None, None, x, weight, h, stats, "sigmoid", "none", 0.0, 0.0, 1.0, 0, False
        )

    def unsplit(fn):
        def call():
            saved, common.SPLIT_MIN_BATCH = common.SPLIT_MIN_BATCH, 2**62
            try:
                return fn()
            finally:
                common.SPLIT_MIN_BATCH = saved

        return call

    return {
        "encode forward, statistics": encode(True),
        "encode forward, h only": encode(False),
        "encode forward, h only, split": split(encode(False)),
        "torch.mm x W^T": lambda: x @ weight.t(),
        "decode backward, per-sample weight": decode_backward(per_sample),
        "decode backward, uniform weight": decode_backward(uniform),
        "torch.mm G^T h + G V (dV, dh)": lambda: (grad_z.t() @ h, grad_z @ weight.t()),
        "encode backward (dz, dW, db)": encode_backward,
        "encode backward, split-K off": unsplit(encode_backward),
        "encode backward, split (cuBLAS dW)": split(encode_backward),
        "decode backward (dV, dc), uniform": decode_backward(uniform, False),
        "decode backward (dV, dc), split-K off": unsplit(decode_backward(uniform, False)),
        "decode backward (dV, dc), split": split(decode_backward(uniform, False)),
        "torch.mm dz^T x (dW)": lambda: grad_h.t() @ x,
    }


FINISH_PARTS, FINISH_HIDDEN, FINISH_BLOCKS = (32, 128, 512), (1024, 4096), (128, 32)


def finish_call(part_h: torch.Tensor, part_s2: torch.Tensor, sq_norm: torch.Tensor, block: int):
    """A launch of the finishing kernel with columns in blocks of ``block``, its ticket zeroed
    first as the forward kernel zeroes it (a memset in the time), and the (rho_hat, c, jac) it
    writes, for a batch of 128 rows per part."""
    parts, hidden = part_h.shape
    programs = common.cdiv(hidden, block)
    rho, c, jac, shares = (
        torch.empty(n, device=part_h.device) for n in (hidden, hidden, 1, programs)
    )
    ticket = torch.zeros(1, device=part_h.device, dtype=torch.int32)

    def call():
        ticket.zero_()
        common.launch(encoder._encoder_finish_kernel, (programs,),
            part_h, part_s2, sq_norm, rho, c, jac, shares, ticket, parts, parts * 128, hidden,
            ACC=common.acc_dtype(torch.float32), BLOCK_T=encoder.FINISH_ROWS, BLOCK=block,
            BLOCK_S=encoder.FINISH_SHARES, num_warps=encoder.FINISH_WARPS,
        )  # fmt: skip

    return call, (rho, c, jac)


def finish_times(device: str = "cuda") -> None:
    for hidden in FINISH_HIDDEN:
        sq_norm = torch.rand(hidden, device=device)
        for parts in FINISH_PARTS:
            part_h, part_s2 = (torch.rand(parts, hidden, device=device) for _ in range(2))
            for block in FINISH_BLOCKS:
                call, _ = finish_call(part_h, part_s2, sq_norm, block)
                us = do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
                read = 2 * part_h.numel() * part_h.element_size()
                print(
                    f"finish parts={parts:4d} H={hidden:5d} block={block:3d} "
                    f"({common.cdiv(hidden, block):3d} programs) {us:8.1f} us "
                    f"{read / us / 1e3:7.1f} GB/s",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="4096x784x1024,4096x784x1000,8192x4096x4096")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "tf32", "fp32"))
    parser.add_argument("--finish", action="store_true", help="the finishing kernel alone")
    args = parser.parse_args(argv)
    try:
        sizes = fb.parse_sizes(args.sizes, "--sizes")
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        print("kernel_times: needs CUDA", file=sys.stderr)
        return 1
    if args.finish:
        finish_times()
        return 0
    os.environ["FASTAE_ENCODER_FUSION"] = os.environ["FASTAE_DECODER_FUSION"] = "gemm"
    dtype, precision = fb.DTYPES[args.dtype]
    with fb.matmul_precision(precision):
        for size in sizes:
            for name, fn in variants(size, dtype).items():
                us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                print(f"{size} {args.dtype} {name:36s} {us:9.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
