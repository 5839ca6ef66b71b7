"""Fused decoder and reconstruction loss: z^ = h V^T + c, x^ = a_out(z^), per-sample loss.

Forward, two launches: ``_decoder_forward_kernel`` computes a GEMM tile of z^ and, in its
epilogue, the per-element loss (BCE in the logits form softplus(z^) - x z^, or squared error)
and its gradient d ell / d z^ (x^ - x for sigmoid + BCE), stores that gradient — the only
(B, d) tensor kept for backward — and the tile's row sums of the loss into fp32 partials
[column tiles, B]; a sum over the partials gives the per-sample loss.
Backward is matrix products only, with the per-sample upstream weights g_i:
``_decoder_grad_weight_kernel`` dV = (g * G)^T h with dc = sum_i g_i G_i from the same loop,
and ``_decoder_grad_code_kernel`` dh = g * (G V), g applied in the epilogue. For dV, g scales
the reduction dimension, so each G tile is scaled in registers on its way to the tensor cores;
but when every g_i is the same (the loss is a sum of the per-sample losses, or a multiple
of one such as ``per_sample.sum() / B``: autograd then passes g as one value expanded, stride
0; ``.mean()``'s backward writes it out), dV = g_0 (G^T h) and dc = g_0 sum_i G_i take g_0 in
the epilogue too, and G's tiles go from shared memory to the tensor cores untouched. Where
dV is few tiles over many rows, autotuning may share each tile's rows among 2 or 4 programs
(split-K, ``common.split_k_sum``; dc's partials ride along).

The other fusion boundary, ``split``: cuBLAS computes z^ = h V^T + c (torch.addmm), one
elementwise pass ``_decoder_loss_kernel`` turns z^ into G in place with the same epilogue, and
backward is the reference's: dz = g * G (one pass), then cuBLAS for dV = dz^T h and dh = dz V
and a sum for dc. ``FASTAE_DECODER_FUSION=gemm|split|auto`` forces one. In tf32 the
backward takes cuBLAS's products after a fused forward too (``backward_fusion``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastae import reference

from .common import (
    acc_dtype,
    autotune,
    cdiv,
    check_sizes,
    column_index,
    dot_precision,
    elementwise_configs,
    empty,
    empty_in_layout,
    flat_tile,
    fusion_choice,
    gemm_autotune,
    grid_2d,
    grid_split_k,
    grid_tiles,
    k_major,
    launch,
    launch_split_k,
    log1p,
    product_aligned,
    split_k_buffers,
    split_k_sum,
    split_k_tile,
    stat_buffer,
    tf32_products,
    tile_ids,
    wide_columns,
    wide_index,
    wide_shape,
)

OUTPUT_CODES = {"sigmoid": 0, "identity": 1}
LOSS_CODES = {"bce": 0, "mse": 1}

# From this many multiply-adds (B * d * H) on, in every dtype, decode_loss takes cuBLAS's
# products. From the kernels' times on an H200 at B=8192, 4096 -> 4096 (a full step's
# profile): our GEMMs took 564 (forward) + 994 (dV) + 382 (dh) us in bf16 and
# 2,736 + 3,088 + 747 us in tf32, against cuBLAS's 323-343 us (bf16) and 706-1,059 us (tf32) for
# products of the same size. dV reads both operands transposed, and so does a tied forward in
# tf32 (V^T = W is N-major), which tensor-core instructions cannot take from shared memory.
# The passes the split adds read and write (B, d) once each (tens of microseconds there). At
# 4096 x 784 -> 1024 (3.3e9, host-bound) the fused kernels keep their fewer launches. The
# end-to-end crossover is not measured yet.
SPLIT_FROM_MACS = 2**34


def fusion(
    batch: int, features: int, hidden: int, dtype: torch.dtype, k_major_operands: bool = True
) -> str:
    """The forward's fusion boundary: ``FASTAE_DECODER_FUSION`` if set, else the fused GEMM
    below ``SPLIT_FROM_MACS`` multiply-adds with d and H multiples of 16
    (``product_aligned``) and, in tf32, h and V contiguous along H (``k_major_operands``: not
    a tied V = W^T; ``common.tf32_products``); cuBLAS's product otherwise."""
    choice = fusion_choice("FASTAE_DECODER_FUSION")
    if choice != "auto":
        return choice
    large = batch * features * hidden >= SPLIT_FROM_MACS
    if large or not product_aligned(features, hidden):
        return "split"
    return "split" if tf32_products(dtype) and not k_major_operands else "gemm"


def backward_fusion(batch: int, features: int, hidden: int, dtype: torch.dtype) -> str:
    """The backward's fusion boundary: ``FASTAE_DECODER_FUSION`` if set, else the forward's
    rule, except that tf32 always takes cuBLAS's products (dV = (g G)^T h reduces over the
    rows of both operands: ``common.tf32_products``)."""
    choice = fusion_choice("FASTAE_DECODER_FUSION")
    if choice != "auto":
        return choice
    return "split" if tf32_products(dtype) else fusion(batch, features, hidden, dtype)


@triton.jit
def reconstruction_loss(z, t, OUTPUT: tl.constexpr, LOSS: tl.constexpr):
    """(ell, d ell / d z^, x^) per element from z^ and the target t (both in the accumulator
    dtype): BCE in the logits form softplus(z) - t z with gradient sigmoid(z) - t, or squared
    error (x^ - t)^2 with gradient 2 (x^ - t) x^' (x^' = x^ (1 - x^) for a sigmoid output)."""
    if OUTPUT == 0:
        x_hat = 1.0 / (1.0 + tl.exp(-z))
    else:
        x_hat = z
    if LOSS == 0:
        # softplus(z) - t z = max(z, 0) - t z + log(1 + e^-|z|), the first two as (1 - t) z or
        # -t z: a confident logit on its target (t = 1, z = 20) keeps its loss e^-20 instead of
        # losing it to 20 + e^-20 - 20
        ell = tl.where(z >= 0.0, (1.0 - t) * z, -t * z) + log1p(tl.exp(-tl.abs(z)))
        grad = x_hat - t
    else:
        diff = x_hat - t
        ell = diff * diff
        grad = 2.0 * diff
        if OUTPUT == 0:
            grad = grad * x_hat * (1.0 - x_hat)
    return ell, grad, x_hat


@triton.jit
def epilogue_index(rows, cols, WIDE_INDEX: tl.constexpr):
    """Row and column indices for the loss epilogue's per-element offsets: int32 unless they
    can pass 2^31 (``WIDE_INDEX``): 64-bit offset tensors for the target, G and x^ made it
    spill twice as many registers."""
    if WIDE_INDEX:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return rows, cols


# The loss epilogue holds the target, G and x^ beside the accumulator: compiled for sm_90 in
# bf16, the 128x256 and 256x128 tiles (8 warps) and 128x128 (4 warps), 128 accumulator values
# a thread, spilled 2.7-2.9 KB a thread (about 1,300 local stores and 1,500 loads a tile);
# 64 a thread (128x128 with 8 warps and the smaller tiles) spill nothing, in 253-255 of 255
# registers: one more live value an element (e.g. x^ - t for z^ >= 0 as (1 - t) - sigmoid(-z^),
# which would keep a confident logit's gradient tail) spills 88-472 bytes.
@gemm_autotune(("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("h_ptr", "v_ptr"), accumulator_per_thread=64)
@triton.jit
def _decoder_forward_kernel(
    h_ptr, v_ptr, c_ptr, t_ptr, gz_ptr, xhat_ptr, part_ptr,
    B, D, H,
    stride_hm, stride_hk, stride_vn, stride_vk, stride_tm, stride_tn,
    OUTPUT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    WRITE_XHAT: tl.constexpr, WIDE_INDEX: tl.constexpr, WIDE_COLUMNS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_ids(tl.program_id(0), B, D, BLOCK_M, BLOCK_N, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < D
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        k_idx = column_index(ks, WIDE_COLUMNS)
        h = tl.load(
            h_ptr + r64[:, None] * stride_hm + k_idx[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        v = tl.load(
            v_ptr + cols.to(tl.int64)[None, :] * stride_vn + k_idx[:, None] * stride_vk,
            mask=k_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(h, v, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(c_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    out_rows, out_cols = epilogue_index(rows, cols, WIDE_INDEX)
    t = tl.load(
        t_ptr + out_rows[:, None] * stride_tm + out_cols[None, :] * stride_tn, mask=ok, other=0.0
    ).to(ACC)
    ell, grad, x_hat = reconstruction_loss(acc, t, OUTPUT, LOSS)
    out = out_rows[:, None] * D + cols[None, :]
    if WRITE_GRAD:
        tl.store(gz_ptr + out, grad.to(gz_ptr.dtype.element_ty), mask=ok)
    if WRITE_XHAT:
        tl.store(xhat_ptr + out, x_hat.to(xhat_ptr.dtype.element_ty), mask=ok)
    ell = tl.where(ok, ell, 0.0)
    tl.store(part_ptr + pid_n.to(tl.int64) * B + rows, tl.sum(ell, axis=1), mask=row_ok)


# G overwrites z^: the autotuner restores z^ after timing each config
@autotune(elementwise_configs(), key=["B", "D"], restore_value=["z_ptr"])
@triton.jit
def _decoder_loss_kernel(
    z_ptr, t_ptr, xhat_ptr, part_ptr, B, D, stride_tm, stride_tn,
    OUTPUT: tl.constexpr, LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_XHAT: tl.constexpr,
    WIDE_INDEX: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``split`` boundary: the forward kernel's epilogue over z^ = h V^T + c from cuBLAS, G
    written in place over z^ (with ``WRITE_GRAD``)."""
    pid_m, pid_n = flat_tile(D, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    ok = row_ok[:, None] & (cols < D)[None, :]
    out_rows, out_cols = epilogue_index(rows, cols, WIDE_INDEX)
    out = out_rows[:, None] * D + out_cols[None, :]
    z = tl.load(z_ptr + out, mask=ok, other=0.0).to(ACC)
    t = tl.load(
        t_ptr + out_rows[:, None] * stride_tm + out_cols[None, :] * stride_tn, mask=ok, other=0.0
    ).to(ACC)
    ell, grad, x_hat = reconstruction_loss(z, t, OUTPUT, LOSS)
    if WRITE_XHAT:
        tl.store(xhat_ptr + out, x_hat.to(xhat_ptr.dtype.element_ty), mask=ok)
    if WRITE_GRAD:
        tl.store(z_ptr + out, grad.to(z_ptr.dtype.element_ty), mask=ok)
    ell = tl.where(ok, ell, 0.0)
    tl.store(part_ptr + pid_n.to(tl.int64) * B + rows, tl.sum(ell, axis=1), mask=row_ok)


@gemm_autotune(("BLOCK_N", "BLOCK_K", "BLOCK_M"), ("gz_ptr", "h_ptr"), split=True)
@triton.jit
def _decoder_grad_weight_kernel(
    gz_ptr, gl_ptr, h_ptr, dv_ptr, dc_ptr, work_ptr, work_dc_ptr, ticket_ptr,
    B, D, H, stride_hm, stride_hk, stride_dvn, stride_dvk,
    UNIFORM: tl.constexpr, WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """dV[n, k] = sum_i g_i G[i, n] h[i, k]; programs of column block 0 also write dc.
    ``UNIFORM``: every g_i equals g_0 (read once, applied to the sums). With SPLIT > 1 each
    tile's programs share the rows out (``split_k_sum``; dc's partials ride along)."""
    pid_n, pid_k, n_tiles, first_row, end_row = split_k_tile(
        D, H, B, BLOCK_N, BLOCK_K, BLOCK_M, GROUP, SPLIT
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # outputs d: rows of dV
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # hidden units: columns of dV
    col_ok = cols < D
    k_ok = ks < H
    k_idx = column_index(ks, WIDE_COLUMNS)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    # dc's elementwise sums over the row blocks, in each thread's own registers, reduced
    # across threads once after the loop: a reduction inside the loop (shuffles, barriers)
    # made Triton 3.9 wait for each tensor-core product before issuing the next
    sums_dc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    writes_dc = pid_k == 0
    for m0 in range(first_row, end_row, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        r64 = rows.to(tl.int64)
        gz_t = tl.load(
            gz_ptr + r64[None, :] * D + cols[:, None],
            mask=col_ok[:, None] & row_ok[None, :], other=0.0,
        )  # fmt: skip
        h = tl.load(
            h_ptr + r64[:, None] * stride_hm + k_idx[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        if not UNIFORM:
            g = tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            scaled = gz_t.to(ACC) * g[None, :]
            if writes_dc:
                sums_dc += scaled
            gz_t = scaled.to(h.dtype)
        elif writes_dc:
            sums_dc += gz_t.to(ACC)
        acc = tl.dot(gz_t, h, acc, input_precision=PRECISION, out_dtype=ACC)
    dc = tl.sum(sums_dc, axis=1)
    last = True
    if SPLIT > 1:
        # dc's partial per split and column block (only column block 0 computes one), ordered
        # before the ticket like the partial tile
        split = tl.program_id(0) // n_tiles
        dc_part = work_dc_ptr + (split * tl.cdiv(D, BLOCK_N) + pid_n) * BLOCK_N
        if writes_dc:
            tl.store(dc_part + tl.arange(0, BLOCK_N), dc)
        acc, last = split_k_sum(acc, work_ptr, ticket_ptr, tl.program_id(0), n_tiles, SPLIT)
        if last & writes_dc:
            dc = tl.zeros((BLOCK_N,), dtype=ACC)
            for s in tl.static_range(SPLIT):
                part = work_dc_ptr + (s * tl.cdiv(D, BLOCK_N) + pid_n) * BLOCK_N
                dc += tl.load(part + tl.arange(0, BLOCK_N), volatile=True)
    if last:
        if UNIFORM:
            g0 = tl.load(gl_ptr).to(ACC)
            acc = acc * g0
            dc = dc * g0
        out_ok = col_ok[:, None] & k_ok[None, :]
        out = cols.to(tl.int64)[:, None] * stride_dvn + k_idx[None, :] * stride_dvk
        tl.store(dv_ptr + out, acc.to(dv_ptr.dtype.element_ty), mask=out_ok)
        if writes_dc:
            tl.store(dc_ptr + cols, dc.to(dc_ptr.dtype.element_ty), mask=col_ok)


@gemm_autotune(("BLOCK_M", "BLOCK_K", "BLOCK_N"), ("gz_ptr", "v_ptr"))
@triton.jit
def _decoder_grad_code_kernel(
    gz_ptr, gl_ptr, v_ptr, dh_ptr,
    B, D, H, stride_vn, stride_vk,
    UNIFORM: tl.constexpr, WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """dh[i, k] = g_i sum_n G[i, n] V[n, k] (``UNIFORM``: g_0 for every i)."""
    pid_m, pid_k = tile_ids(tl.program_id(0), B, H, BLOCK_M, BLOCK_K, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    k_ok = ks < H
    k_idx = column_index(ks, WIDE_COLUMNS)
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < D
        gz = tl.load(
            gz_ptr + r64[:, None] * D + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip
        v = tl.load(
            v_ptr + cols.to(tl.int64)[:, None] * stride_vn + k_idx[None, :] * stride_vk,
            mask=col_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(gz, v, acc, input_precision=PRECISION, out_dtype=ACC)
    if UNIFORM:
        acc = acc * tl.load(gl_ptr).to(ACC)
    else:
        acc = acc * tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    out_ok = row_ok[:, None] & k_ok[None, :]
    tl.store(dh_ptr + r64[:, None] * H + ks[None, :], acc.to(dh_ptr.dtype.element_ty), mask=out_ok)


def decode_forward(
    h, weight, bias, target, output, loss, with_reconstruction=False, with_gradient=True
):  # fmt: skip
    """(per-sample loss, d ell / d z^) as ``fastae.reference.decode_forward``; with
    ``with_reconstruction`` also x^ from the same tiles (no second GEMM); without
    ``with_gradient`` d ell / d z^ is neither stored nor returned (None)."""
    check_sizes(h=h, weight=weight)
    batch, hidden = h.shape
    features = weight.shape[0]
    x_hat = empty((batch, features), h.device, h.dtype) if with_reconstruction else None
    parts = stat_buffer(h, cdiv(features, 16), batch)  # the smallest BLOCK_N of any config
    k_major_operands = k_major(h, 1) and k_major(weight, 1)
    if fusion(batch, features, hidden, h.dtype, k_major_operands) == "split":
        z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        grid = grid_tiles(batch, features)
        launch(_decoder_loss_kernel, grid,
            z, target, x_hat if with_reconstruction else z, parts, batch, features,
            target.stride(0), target.stride(1),
            OUTPUT=OUTPUT_CODES[output], LOSS=LOSS_CODES[loss], WRITE_GRAD=with_gradient,
            WRITE_XHAT=with_reconstruction, WIDE_INDEX=wide_index(target, z),
            ACC=acc_dtype(h.dtype),
        )  # fmt: skip
        grad_z = z if with_gradient else None  # G written over z^
    else:
        if bias is not None:
            bias = bias.contiguous()  # the kernel reads it at unit stride; a d-vector copy is free
        grad_z = empty((batch, features), h.device, h.dtype) if with_gradient else None
        grid = grid_2d(batch, features, "BLOCK_M", "BLOCK_N")
        launch(_decoder_forward_kernel, grid,
            h, weight, bias if bias is not None else weight, target,
            h if grad_z is None else grad_z, h if x_hat is None else x_hat, parts,
            batch, features, hidden,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            target.stride(0), target.stride(1),
            OUTPUT=OUTPUT_CODES[output], LOSS=LOSS_CODES[loss], HAS_BIAS=bias is not None,
            WRITE_GRAD=with_gradient, WRITE_XHAT=with_reconstruction,
            WIDE_INDEX=wide_index(target) or wide_shape(batch, features),  # G and x^: (B, d)
            WIDE_COLUMNS=wide_columns(h, weight), ACC=acc_dtype(h.dtype),
            PRECISION=dot_precision(h.dtype),
        )  # fmt: skip
    per_sample = parts[: cdiv(features, grid.meta["BLOCK_N"])].sum(0)
    if with_reconstruction:
        return per_sample, grad_z, x_hat
    return per_sample, grad_z


def decode_backward(grad_loss, h, weight, grad_z, needs_h_grad):
    """(dV, dc, dh or None) as ``fastae.reference.decode_backward``."""
    batch, hidden = h.shape
    features = weight.shape[0]
    if backward_fusion(batch, features, hidden, h.dtype) == "split":
        # dz = g * G in one pass, then cuBLAS's products and a sum: the reference's own ops
        return reference.decode_backward(grad_loss, h, weight, grad_z, needs_h_grad)
    acc = acc_dtype(h.dtype)
    precision = dot_precision(h.dtype)
    # one weight for every sample (stride 0): the gradient of a sum of the per-sample losses
    uniform = batch == 1 or grad_loss.stride(0) == 0
    # the kernels read the B-vector grad_loss and G at unit stride (G as the forward wrote it:
    # then .contiguous() returns it as it is); copying a vector is free
    grad_loss = grad_loss if uniform else grad_loss.contiguous()
    grad_z = grad_z.contiguous()
    grad_weight = empty_in_layout(weight)  # column-major for a tied V = W^T: no copy into .grad
    grad_bias = empty((features,), h.device, weight.dtype)
    launch_split_k(_decoder_grad_weight_kernel, grid_split_k(features, hidden),
        (grad_z, grad_loss, h, grad_weight, grad_bias),
        functools.partial(split_k_buffers, h, batch, features, hidden, vector=True),
        (batch, features, hidden,
         h.stride(0), h.stride(1), grad_weight.stride(0), grad_weight.stride(1)),
        UNIFORM=uniform, WIDE_COLUMNS=wide_columns(h, grad_weight), ACC=acc,
        PRECISION=precision,
    )  # fmt: skip
    grad_h = None
    if needs_h_grad:
        grad_h = empty((batch, hidden), h.device, h.dtype)
        launch(_decoder_grad_code_kernel, grid_2d(batch, hidden, "BLOCK_M", "BLOCK_K"),
            grad_z, grad_loss, weight, grad_h, batch, features, hidden,
            weight.stride(0), weight.stride(1), UNIFORM=uniform,
            WIDE_COLUMNS=wide_columns(weight), ACC=acc, PRECISION=precision,
        )  # fmt: skip
    return grad_weight, grad_bias, grad_h


# The target's own gradient is rarely needed (targets are data); it recomputes z^ in torch.
decode_target_grad = reference.decode_target_grad
