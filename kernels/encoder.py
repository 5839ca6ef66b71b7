"""Fused encoder: z = x~ W^T + b, h = a(z), and the sparsity and contractive statistics.

Forward, two launches:
  1. ``_encoder_forward_kernel``: a GEMM tile of z with x corrupted as it is loaded (Philox,
     never stored), epilogue h = a(z), stores h and the tile's column sums of h and s^2 into
     fp32 partial buffers [row tiles, H] (padded rows masked); row-tile 0 then sums ||W_j||^2
     over its column block of W.
  2. ``_encoder_finish_kernel``, one program per column block: rho_hat = sum_t P_h / B,
     c = sum_t P_s2 and the block's share of jac = (1/B) sum_j c_j ||W_j||^2; the program
     that finishes last adds the shares in block order (deterministic: an atomic ticket only
     says which program is last; the reductions over the batch stay atomic-free partial sums).
Backward, three launches (the formulas of ``fastae.reference.encode_backward``):
  1. ``_encoder_grad_z_kernel``: dz = s (g_h + g_rho/B) + g_jac (2/B) w_j s a'' and db partials.
  2. ``_encoder_grad_weight_kernel``: dW = dz^T x~ + g_jac (2/B) c_j W_j (x~ regenerated),
     and db; where dW is few tiles over many rows, autotuning may share each tile's rows among
     2 or 4 programs (split-K, ``common.split_k_sum``).
  3. ``_encoder_grad_input_kernel`` (only when x needs a gradient): dx = (dz W) * dx~/dx.
Saved for backward: h, W, x and the H-vectors c and w = ||W_j||^2.

The other fusion boundary, ``split``: cuBLAS computes z = x~ W^T + b (torch.addmm), one fused
pass applies the activation in place and reduces the statistics, and backward uses cuBLAS for
dW and dx around the same dz pass. ``FASTAE_ENCODER_FUSION=gemm|split|auto`` forces one. In
tf32 the backward takes cuBLAS's products after a fused forward too (``backward_fusion``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastae import reference

from . import noise as noise_kernels
from .common import (
    ACTIVATION_CODES,
    NOISE_CODES,
    acc_dtype,
    activate,
    autotune,
    cdiv,
    check_sizes,
    column_index,
    corrupt_tile,
    curvature,
    dot_precision,
    element_offsets,
    elementwise_configs,
    empty,
    flat_tile,
    fusion_choice,
    gemm_autotune,
    grid_2d,
    grid_split_k,
    grid_tiles,
    input_grad_mask,
    k_major,
    launch,
    launch_split_k,
    product_aligned,
    seed_pointer,
    slope,
    split_k_buffers,
    split_k_sum,
    split_k_tile,
    stat_buffer,
    tf32_products,
    ticket,
    tile_ids,
    wide_columns,
)

# The finish kernel: columns per program, partial-sum rows per load, warps; shares of jac the
# last program adds per load. As one program it took 150-380 us at B=8192, H=4096 on an H200
# (the GEMMs 640 us): one SM reading 2 MB of partial sums.
FINISH_BLOCK, FINISH_ROWS, FINISH_WARPS, FINISH_SHARES = 128, 32, 4, 1024


# float32 at or above this many multiply-adds (B * d * H) takes cuBLAS's GEMMs: our dW product
# reads both float32 operands transposed, which tf32 tensor-core instructions cannot take
# from shared memory. Measured on an H200 (encode with statistics, forward and backward):
# at 8192 x 4096 -> 4096 (1.4e11) split took 2.76 against 6.14 ms in tf32 (our dW kernel
# 4.4 ms, cuBLAS's 1.06), while in bf16 the fused GEMM stayed ahead, 1.65 against 1.88 ms;
# at 4096 x 784 -> 1024 (3.3e9), host-bound, the fused GEMM (4 launches against 10) took
# 1.54 against 1.74 ms in tf32 and 1.29 against 1.47 ms in bf16. The threshold lies between
# the two measured shapes.
SPLIT_FROM_MACS = 2**34


def fusion(
    batch: int, features: int, hidden: int, dtype: torch.dtype, k_major_operands: bool = True
) -> str:
    """The forward's fusion boundary: ``FASTAE_ENCODER_FUSION`` if set, else the measured
    rule: the fused GEMM (fewest launches), except float32 from ``SPLIT_FROM_MACS``
    multiply-adds on, d or H not a multiple of 16 (``product_aligned``), and tf32 with x or W
    not contiguous along d (``k_major_operands``; ``common.tf32_products``), which take
    cuBLAS's GEMM plus one fused statistics pass."""
    choice = fusion_choice("FASTAE_ENCODER_FUSION")
    if choice != "auto":
        return choice
    large = batch * features * hidden >= SPLIT_FROM_MACS
    if (dtype == torch.float32 and large) or not product_aligned(features, hidden):
        return "split"
    if tf32_products(dtype) and not k_major_operands:
        return "split"
    return "gemm"


def backward_fusion(
    batch: int, features: int, hidden: int, dtype: torch.dtype, noise_kind: str
) -> str:
    """The backward's fusion boundary: ``FASTAE_ENCODER_FUSION`` if set, else the forward's
    rule, except that tf32 takes cuBLAS's dW and dx (their operands are never both K-major:
    ``common.tf32_products``) unless x~ is regenerated inside the dW product (noise passed to
    the kernels), which keeps that path free of a (B, d) tensor."""
    choice = fusion_choice("FASTAE_ENCODER_FUSION")
    if choice != "auto":
        return choice
    if tf32_products(dtype) and noise_kind == "none":
        return "split"
    return fusion(batch, features, hidden, dtype)


@triton.jit
def store_column_partials(
    h, ok, col_ok, part, part_h_ptr, part_s2_ptr, ACTIVATION: tl.constexpr, ACC: tl.constexpr
):
    """A tile's column sums of h and of s^2 (padded rows masked out) into the partial buffers
    at ``part``: statistics of the stored (rounded) h, as backward will see it."""
    h_acc = tl.where(ok, h.to(ACC), 0.0)
    s = tl.where(ok, slope(h_acc, ACTIVATION), 0.0)
    tl.store(part_h_ptr + part, tl.sum(h_acc, axis=0), mask=col_ok)
    tl.store(part_s2_ptr + part, tl.sum(s * s, axis=0), mask=col_ok)


@gemm_autotune(("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("x_ptr", "w_ptr"))
@triton.jit
def _encoder_forward_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, part_h_ptr, part_s2_ptr, sq_norm_ptr, ticket_ptr,
    B, D, H,
    stride_xm, stride_xk, stride_wn, stride_wk,
    seed_ptr, level, low, high,
    ACTIVATION: tl.constexpr, NOISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    STATISTICS: tl.constexpr, WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    if STATISTICS and tl.program_id(0) == 0:
        tl.store(ticket_ptr, 0)  # the finish kernel's ticket (it runs after this kernel)
    pid_m, pid_n = tile_ids(tl.program_id(0), B, H, BLOCK_M, BLOCK_N, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < H
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    seed = tl.load(seed_ptr) if NOISE != 0 else 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        k_idx = column_index(ks, WIDE_COLUMNS)
        x_ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + k_idx[None, :] * stride_xk, mask=x_ok, other=0.0)
        if NOISE != 0:
            # corrupt as loaded; padding stays zero (salt would otherwise fill it)
            offsets = element_offsets(rows, ks, D, 0)
            x = corrupt_tile(x.to(ACC), offsets, seed, level, low, high, NOISE).to(x.dtype)
            x = tl.where(x_ok, x, 0.0)
        w = tl.load(
            w_cols + k_idx[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc = tl.dot(x, w, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h = activate(acc, ACTIVATION).to(h_ptr.dtype.element_ty)
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], h, mask=out_ok)
    if STATISTICS:
        part = pid_m.to(tl.int64) * H + cols
        store_column_partials(h, out_ok, col_ok, part, part_h_ptr, part_s2_ptr, ACTIVATION, ACC)
        if pid_m == 0:
            # ||W_j||^2 in a second pass over this column block of W (mostly from L2), by row
            # tile 0 only: summed inside the GEMM loop, it made every program copy each W tile
            # from shared memory to registers (the branch does not sink that copy)
            sq_norm = tl.zeros((BLOCK_N,), dtype=ACC)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(
                    w_cols + column_index(ks, WIDE_COLUMNS)[:, None] * stride_wk,
                    mask=(ks < D)[:, None] & col_ok[None, :], other=0.0,
                ).to(ACC)  # fmt: skip
                sq_norm += tl.sum(w * w, axis=0)
            tl.store(sq_norm_ptr + cols, sq_norm, mask=col_ok)


# h = a(z) overwrites z: the autotuner restores z after timing each config
@autotune(elementwise_configs(), key=["B", "H"], restore_value=["z_ptr"])
@triton.jit
def _encoder_statistics_kernel(
    z_ptr, w_ptr, part_h_ptr, part_s2_ptr, sq_norm_ptr, ticket_ptr,
    B, D, H, stride_wn, stride_wk,
    ACTIVATION: tl.constexpr, STATISTICS: tl.constexpr, WIDE_COLUMNS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``split`` boundary: h = a(z) in place over z, partial sums, and ||W_j||^2 (row tile 0);
    without ``STATISTICS`` only h."""
    pid_m, pid_n = flat_tile(H, BLOCK_N)
    if STATISTICS and (pid_m == 0) & (pid_n == 0):
        tl.store(ticket_ptr, 0)  # the finish kernel's ticket (it runs after this kernel)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ok = (rows < B)[:, None] & col_ok[None, :]
    idx = rows.to(tl.int64)[:, None] * H + cols[None, :]
    z = tl.load(z_ptr + idx, mask=ok, other=0.0).to(ACC)
    h = activate(z, ACTIVATION).to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + idx, h, mask=ok)
    if STATISTICS:
        part = pid_m.to(tl.int64) * H + cols
        store_column_partials(h, ok, col_ok, part, part_h_ptr, part_s2_ptr, ACTIVATION, ACC)
        if pid_m == 0:
            sq_norm = tl.zeros((BLOCK_N,), dtype=ACC)
            for k0 in range(0, D, 64):
                ks = k0 + tl.arange(0, 64)
                k_idx = column_index(ks, WIDE_COLUMNS)
                w_idx = cols.to(tl.int64)[:, None] * stride_wn + k_idx[None, :] * stride_wk
                w_ok = col_ok[:, None] & (ks < D)[None, :]
                w = tl.load(w_ptr + w_idx, mask=w_ok, other=0.0).to(ACC)
                sq_norm += tl.sum(w * w, axis=1)
            tl.store(sq_norm_ptr + cols, sq_norm, mask=col_ok)


@triton.jit
def _encoder_finish_kernel(
    part_h_ptr, part_s2_ptr, sq_norm_ptr, rho_ptr, c_ptr, jac_ptr, share_ptr, ticket_ptr,
    n_parts, B, H,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < H
    sum_h = tl.zeros((BLOCK,), dtype=ACC)
    sum_s2 = tl.zeros((BLOCK,), dtype=ACC)
    for t0 in range(0, n_parts, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        idx = ts.to(tl.int64)[:, None] * H + cols[None, :]
        ok = (ts < n_parts)[:, None] & col_ok[None, :]
        sum_h += tl.sum(tl.load(part_h_ptr + idx, mask=ok, other=0.0), axis=0)
        sum_s2 += tl.sum(tl.load(part_s2_ptr + idx, mask=ok, other=0.0), axis=0)
    tl.store(rho_ptr + cols, sum_h / B, mask=col_ok)
    tl.store(c_ptr + cols, sum_s2, mask=col_ok)
    share = tl.sum(sum_s2 * tl.load(sq_norm_ptr + cols, mask=col_ok, other=0.0), axis=0)
    # The ticket's atomic add (acquire-release) orders each program's share before it: the
    # program that draws the last ticket sees every share (volatile loads: not from L1).
    tl.store(share_ptr + pid, share)
    n_programs = tl.num_programs(0)
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == n_programs - 1:
        total = tl.zeros((BLOCK_S,), dtype=ACC)
        for s0 in range(0, n_programs, BLOCK_S):
            shares = s0 + tl.arange(0, BLOCK_S)
            total += tl.load(share_ptr + shares, mask=shares < n_programs, other=0.0, volatile=True)
        tl.store(jac_ptr, tl.sum(total, axis=0) / B)


@autotune(elementwise_configs(), key=["B", "H"])
@triton.jit
def _encoder_grad_z_kernel(
    h_ptr, gh_ptr, grho_ptr, gjac_ptr, sq_norm_ptr, dz_ptr, part_db_ptr,
    B, H, stride_gm, stride_gn,
    ACTIVATION: tl.constexpr, HAS_GRAD_RHO: tl.constexpr, HAS_GRAD_JAC: tl.constexpr,
    WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = flat_tile(H, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ok = (rows < B)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(h_ptr + r64 * H + cols[None, :], mask=ok, other=0.0).to(ACC)
    g_cols = column_index(cols, WIDE_COLUMNS)[None, :]
    g_h = tl.load(gh_ptr + r64 * stride_gm + g_cols * stride_gn, mask=ok, other=0.0)
    s = slope(h, ACTIVATION)
    if HAS_GRAD_RHO:
        g_rho = tl.load(grho_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        dz = s * (g_h.to(ACC) + g_rho[None, :] / B)
    else:
        dz = s * g_h.to(ACC)
    if HAS_GRAD_JAC:
        jac_coef = tl.load(gjac_ptr).to(ACC) * 2.0 / B
        w = tl.load(sq_norm_ptr + cols, mask=col_ok, other=0.0)
        dz += (jac_coef * w)[None, :] * s * curvature(h, s, ACTIVATION)
    dz = tl.where(ok, dz, 0.0)
    tl.store(dz_ptr + r64 * H + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(part_db_ptr + pid_m.to(tl.int64) * H + cols, tl.sum(dz, axis=0), mask=col_ok)


@gemm_autotune(("BLOCK_N", "BLOCK_K", "BLOCK_M"), ("dz_ptr", "x_ptr"), split=True)
@triton.jit
def _encoder_grad_weight_kernel(
    dz_ptr, x_ptr, w_ptr, c_ptr, gjac_ptr, part_db_ptr, dw_ptr, db_ptr, work_ptr, ticket_ptr,
    B, D, H, n_parts,
    stride_xm, stride_xk, stride_wn, stride_wk,
    seed_ptr, level, low, high,
    NOISE: tl.constexpr, HAS_GRAD_JAC: tl.constexpr, WIDE_COLUMNS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """dW = dz^T x~ + g_jac (2/B) c_j W_j, and db (programs of column block 0). With SPLIT > 1
    each tile's programs share the rows out (``split_k_sum``)."""
    pid_n, pid_k, n_tiles, first_row, end_row = split_k_tile(
        H, D, B, BLOCK_N, BLOCK_K, BLOCK_M, GROUP, SPLIT
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden units: rows of dW
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # input features: columns of dW
    col_ok = cols < H
    k_ok = ks < D
    k_idx = column_index(ks, WIDE_COLUMNS)
    seed = tl.load(seed_ptr) if NOISE != 0 else 0
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for m0 in range(first_row, end_row, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        r64 = rows.to(tl.int64)
        dz_t = tl.load(
            dz_ptr + r64[None, :] * H + cols[:, None],
            mask=col_ok[:, None] & row_ok[None, :], other=0.0,
        )  # fmt: skip
        x_ok = row_ok[:, None] & k_ok[None, :]
        x_idx = r64[:, None] * stride_xm + k_idx[None, :] * stride_xk
        x = tl.load(x_ptr + x_idx, mask=x_ok, other=0.0)
        if NOISE != 0:
            offsets = element_offsets(rows, ks, D, 0)
            x = corrupt_tile(x.to(ACC), offsets, seed, level, low, high, NOISE).to(x.dtype)
            x = tl.where(x_ok, x, 0.0)
        acc = tl.dot(dz_t, x, acc, input_precision=PRECISION, out_dtype=ACC)
    last = True
    if SPLIT > 1:
        acc, last = split_k_sum(acc, work_ptr, ticket_ptr, tl.program_id(0), n_tiles, SPLIT)
    if last:
        out_ok = col_ok[:, None] & k_ok[None, :]
        if HAS_GRAD_JAC:  # the contractive W-term g_jac (2/B) c_j W_j
            jac_coef = tl.load(gjac_ptr).to(ACC) * 2.0 / B
            c = tl.load(c_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            w_idx = cols.to(tl.int64)[:, None] * stride_wn + k_idx[None, :] * stride_wk
            w = tl.load(w_ptr + w_idx, mask=out_ok, other=0.0).to(ACC)
            acc += (jac_coef * c)[:, None] * w
        out_idx = cols.to(tl.int64)[:, None] * D + ks[None, :]
        tl.store(dw_ptr + out_idx, acc.to(dw_ptr.dtype.element_ty), mask=out_ok)
        if pid_k == 0:
            db = tl.zeros((BLOCK_N,), dtype=ACC)
            part = part_db_ptr + cols  # advanced by H per row tile: pointer (64-bit) arithmetic
            for _ in range(0, n_parts):
                db += tl.load(part, mask=col_ok, other=0.0)
                part += H
            tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


@gemm_autotune(("BLOCK_M", "BLOCK_K", "BLOCK_N"), ("dz_ptr", "w_ptr"))
@triton.jit
def _encoder_grad_input_kernel(
    dz_ptr, w_ptr, dx_ptr,
    B, D, H, stride_wn, stride_wk, seed_ptr, level,
    NOISE: tl.constexpr, WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = tile_ids(tl.program_id(0), B, D, BLOCK_M, BLOCK_K, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    k_ok = ks < D
    k_idx = column_index(ks, WIDE_COLUMNS)
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        dz = tl.load(
            dz_ptr + r64[:, None] * H + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(
            w_ptr + cols.to(tl.int64)[:, None] * stride_wn + k_idx[None, :] * stride_wk,
            mask=col_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(dz, w, acc, input_precision=PRECISION, out_dtype=ACC)
    if NOISE != 0:
        offsets = element_offsets(rows, ks, D, 0)
        acc = input_grad_mask(acc, offsets, tl.load(seed_ptr), level, NOISE)
    out_ok = row_ok[:, None] & k_ok[None, :]
    tl.store(dx_ptr + r64[:, None] * D + ks[None, :], acc.to(dx_ptr.dtype.element_ty), mask=out_ok)


def encode_forward(
    x, weight, bias, activation, noise_kind, level, low, high, seed, statistics=True
):  # fmt: skip
    """(h, rho_hat, jac, stats) with stats = [c; w] (2, H); same math as the reference.
    Without ``statistics``: one launch, h only (and the reference's empty placeholders)."""
    check_sizes(x=x, weight=weight)
    batch, features = x.shape
    hidden = weight.shape[0]
    acc = acc_dtype(x.dtype)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads it at unit stride; copying an H-vector is free
    if statistics:
        # partial buffers sized for the smallest BLOCK_M any config uses
        part_h = stat_buffer(x, cdiv(batch, 16), hidden)
        part_s2 = stat_buffer(x, cdiv(batch, 16), hidden)
        stats = stat_buffer(x, 2, hidden)  # row 0: c, row 1: w
        sq_norm = stats[1]
        finish_ticket = ticket(x.device)  # zeroed by the first kernel
    else:  # the kernels write none of these: any pointer will do
        part_h = part_s2 = sq_norm = finish_ticket = x
    code = ACTIVATION_CODES[activation]
    noise = NOISE_CODES[noise_kind]
    k_major_operands = k_major(x, 1) and k_major(weight, 1)
    if fusion(batch, features, hidden, x.dtype, k_major_operands) == "split":
        x_tilde = noise_kernels.corrupt(x, noise_kind, level, low, high, seed)
        h = x_tilde @ weight.t() if bias is None else torch.addmm(bias, x_tilde, weight.t())
        grid = grid_tiles(batch, hidden)
        launch(_encoder_statistics_kernel, grid,
            h, weight, part_h, part_s2, sq_norm, finish_ticket, batch, features, hidden,
            weight.stride(0), weight.stride(1), ACTIVATION=code, STATISTICS=statistics,
            WIDE_COLUMNS=wide_columns(weight), ACC=acc,
        )  # fmt: skip
    else:
        h = empty((batch, hidden), x.device, x.dtype)
        grid = grid_2d(batch, hidden, "BLOCK_M", "BLOCK_N")
        launch(_encoder_forward_kernel, grid,
            x, weight, bias if bias is not None else weight, h, part_h, part_s2, sq_norm,
            finish_ticket, batch, features, hidden,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            seed_pointer(seed, x) if noise else x, level, low, high,
            ACTIVATION=code, NOISE=noise, HAS_BIAS=bias is not None,
            STATISTICS=statistics, WIDE_COLUMNS=wide_columns(x, weight), ACC=acc,
            PRECISION=dot_precision(x.dtype),
        )  # fmt: skip
    if not statistics:
        return h, *reference.no_statistics(h)
    rho_hat, jac = stat_buffer(x, hidden), stat_buffer(x)
    n_finish = cdiv(hidden, FINISH_BLOCK)
    shares = stat_buffer(x, n_finish)
    n_parts = cdiv(batch, grid.meta["BLOCK_M"])
    launch(_encoder_finish_kernel, (n_finish,),
        part_h, part_s2, stats[1], rho_hat, stats[0], jac, shares, finish_ticket, n_parts, batch,
        hidden, ACC=acc, BLOCK_T=FINISH_ROWS, BLOCK=FINISH_BLOCK, BLOCK_S=FINISH_SHARES,
        num_warps=FINISH_WARPS,
    )  # fmt: skip
    return h, rho_hat, jac, stats


def encode_backward(
    grad_h, grad_rho, grad_jac, x, weight, h, stats, activation, noise_kind, level, low, high,
    seed, needs_input_grad,
):  # fmt: skip
    """(dW, db, dx or None) as ``fastae.reference.encode_backward``."""
    batch, features = x.shape
    hidden = weight.shape[0]
    acc = acc_dtype(x.dtype)
    precision = dot_precision(x.dtype)
    noise = NOISE_CODES[noise_kind]
    # the kernels read these at unit stride (h and the H-vectors of stats as the forward wrote
    # them: then .contiguous() returns them as they are); copying a vector is free. A None
    # gradient (the output was not used) is zero: the kernels skip its terms.
    has_grad_rho, has_grad_jac = grad_rho is not None, grad_jac is not None
    grad_rho = grad_rho.contiguous() if has_grad_rho else stats
    grad_jac = grad_jac.contiguous() if has_grad_jac else stats
    h = h.contiguous()
    stats = stats.contiguous()
    dz = empty(h.shape, h.device, h.dtype)
    part_db = stat_buffer(x, cdiv(batch, 16), hidden)
    grid = grid_tiles(batch, hidden)
    launch(_encoder_grad_z_kernel, grid,
        h, grad_h, grad_rho, grad_jac, stats[1], dz, part_db,
        batch, hidden, grad_h.stride(0), grad_h.stride(1),
        ACTIVATION=ACTIVATION_CODES[activation], HAS_GRAD_RHO=has_grad_rho,
        HAS_GRAD_JAC=has_grad_jac, WIDE_COLUMNS=wide_columns(grad_h), ACC=acc,
    )  # fmt: skip
    n_parts = cdiv(batch, grid.meta["BLOCK_M"])
    if backward_fusion(batch, features, hidden, x.dtype, noise_kind) == "split":
        x_tilde = noise_kernels.corrupt(x, noise_kind, level, low, high, seed)
        if has_grad_jac:
            # dW = dz^T x~ + (2/B) g_jac c_j W_j, scaled in fp32 before the cast (c_j <= B
            # would overflow float16 unscaled)
            coef = stats[0] * (grad_jac * (2.0 / batch))
            contractive = (weight * coef.unsqueeze(1)).to(weight.dtype)
            grad_weight = torch.addmm(contractive, dz.t(), x_tilde)
        else:
            grad_weight = dz.t() @ x_tilde
        grad_bias = part_db[:n_parts].sum(0).to(weight.dtype)
        grad_input = None
        if needs_input_grad:
            grad_input = noise_kernels.corrupt_input_grad(dz @ weight, noise_kind, level, seed)
        return grad_weight, grad_bias, grad_input
    grad_weight = empty((hidden, features), x.device, weight.dtype)
    grad_bias = empty((hidden,), x.device, weight.dtype)
    launch_split_k(_encoder_grad_weight_kernel, grid_split_k(hidden, features),
        (dz, x, weight, stats[0], grad_jac, part_db, grad_weight, grad_bias),
        functools.partial(split_k_buffers, x, batch, hidden, features),
        (batch, features, hidden, n_parts,
         x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
         seed_pointer(seed, x) if noise else x, level, low, high),
        NOISE=noise, HAS_GRAD_JAC=has_grad_jac, WIDE_COLUMNS=wide_columns(x, weight), ACC=acc,
        PRECISION=precision,
    )  # fmt: skip
    grad_input = None
    if needs_input_grad:
        grad_input = empty((batch, features), x.device, x.dtype)
        launch(_encoder_grad_input_kernel, grid_2d(batch, features, "BLOCK_M", "BLOCK_K"),
            dz, weight, grad_input, batch, features, hidden,
            weight.stride(0), weight.stride(1), seed_pointer(seed, x) if noise else x, level,
            NOISE=noise, WIDE_COLUMNS=wide_columns(weight), ACC=acc, PRECISION=precision,
        )  # fmt: skip
    return grad_weight, grad_bias, grad_input
