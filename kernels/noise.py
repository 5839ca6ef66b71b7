"""Standalone corruption x~ = corrupt(x) and its input gradient, one elementwise pass each.

Random numbers are Philox at (seed, base + row * d + col) through ``common.corrupt_tile``,
the same streams the encoder uses when it fuses corruption into its loads; backward
regenerates the mask from the seed instead of storing it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    NOISE_CODES,
    acc_dtype,
    autotune,
    check_sizes,
    column_index,
    corrupt_tile,
    element_offsets,
    empty,
    flat_tile,
    grid_tiles,
    input_grad_mask,
    launch,
    seed_pointer,
    wide_columns,
)


def _configs():
    from .common import interpreting

    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
        for bm, bn, w in [(8, 256, 4), (16, 256, 8), (4, 512, 4), (32, 128, 4)]
    ]


@autotune(_configs(), key=["B", "D"])
@triton.jit(do_not_specialize=["base"])
def _corrupt_kernel(
    x_ptr, out_ptr, B, D, stride_xm, stride_xn, stride_om, stride_on, seed_ptr, base, level, low,
    high, NOISE: tl.constexpr, GRAD: tl.constexpr, WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = flat_tile(D, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < B)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = column_index(cols, WIDE_COLUMNS)[None, :]
    x = tl.load(x_ptr + r64 * stride_xm + c * stride_xn, mask=ok, other=0.0)
    offsets = element_offsets(rows, cols, D, base)
    seed = tl.load(seed_ptr)
    if GRAD:
        y = input_grad_mask(x.to(ACC), offsets, seed, level, NOISE)
    else:
        y = corrupt_tile(x.to(ACC), offsets, seed, level, low, high, NOISE)
    tl.store(out_ptr + r64 * stride_om + c * stride_on, y.to(x.dtype), mask=ok)


def _launch(x, kind, level, low, high, seed, base, grad):
    check_sizes(**{"grad" if grad else "x": x})
    batch, features = x.shape
    out = empty(x.shape, x.device, x.dtype)
    launch(_corrupt_kernel, grid_tiles(batch, features),
        x, out, batch, features, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        seed_pointer(seed, x), base, level, low, high,
        NOISE=NOISE_CODES[kind], GRAD=grad, WIDE_COLUMNS=wide_columns(x, out),
        ACC=acc_dtype(x.dtype),
    )  # fmt: skip
    return out


def corrupt(x, kind, level, low, high, seed, base=0):
    """x~ as ``fastae.reference.corrupt`` (masks equal bit for bit)."""
    if kind == "none":
        return x
    return _launch(x, kind, level, low, high, seed, base, grad=False)


def corrupt_input_grad(grad, kind, level, seed, base=0):
    """d loss / d x from d loss / d x~, as ``fastae.reference.corrupt_input_grad``."""
    if kind in ("none", "gaussian"):
        return grad
    return _launch(grad, kind, level, 0.0, 0.0, seed, base, grad=True)
