"""Reparameterization of a diagonal Gaussian and its KL divergence to N(0, I), one launch each way.

Forward, ``_reparameterize_forward_kernel``: each program owns ``BLOCK_M`` rows and walks
their k columns in ``BLOCK_N`` chunks; per element it draws eps = ``tl.randn(seed, row * k +
col)`` (the Philox stream of the noise ops), stores z = mu + exp(logvar / 2) * eps, and
accumulates kl_i = 1/2 sum_j (mu_ij^2 + exp(logvar_ij) - 1 - logvar_ij) in registers, so the
per-sample KL needs no partial buffer and no second launch.
Backward, ``_reparameterize_backward_kernel`` (elementwise): eps is regenerated from the seed,
never stored;
    dmu = g_z + g_kl mu,   dlogvar = g_z eps exp(logvar / 2) / 2 + g_kl (exp(logvar) - 1) / 2.
Saved for backward: mu and logvar (alive anyway) and the seed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    acc_dtype,
    autotune,
    cdiv,
    check_sizes,
    column_index,
    element_offsets,
    empty,
    flat_tile,
    grid_tiles,
    interpreting,
    launch,
    seed_pointer,
    stat_buffer,
    wide_columns,
)


def _forward_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
        for bm, bn, w in [
            (1, 1024, 4),
            (2, 512, 4),
            (4, 256, 4),
            (8, 128, 4),
            (16, 64, 4),
            (4, 1024, 8),
            (8, 256, 4),
            (32, 64, 4),
        ]
    ]


def _backward_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
        for bm, bn, w in [
            (8, 256, 4),
            (16, 256, 8),
            (4, 512, 4),
            (2, 1024, 4),
            (32, 128, 4),
            (64, 64, 4),
            (32, 64, 4),
        ]
    ]


@triton.jit
def _expm1(x):
    """exp(x) - 1 to full precision near 0: (u - 1) x / log(u), u = exp(x) (Kahan)."""
    u = tl.exp(x)
    small = tl.abs(x) < 0.5
    u_small = tl.where(small, u, 2.0)
    log_u = tl.log(u_small)
    log_u = tl.where(log_u == 0.0, 1.0, log_u)
    kahan = tl.where(u_small == 1.0, x, (u_small - 1.0) * x / log_u)
    return tl.where(small, kahan, u - 1.0)


@autotune(_forward_configs(), key=["B", "K"])
@triton.jit
def _reparameterize_forward_kernel(
    mu_ptr, lv_ptr, z_ptr, kl_ptr, B, K,
    stride_mm, stride_mk, stride_lm, stride_lk, seed_ptr,
    WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    r64 = rows.to(tl.int64)[:, None]
    kl = tl.zeros((BLOCK_M,), dtype=ACC)
    seed = tl.load(seed_ptr)
    for n0 in range(0, K, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < K)[None, :]
        c = column_index(cols, WIDE_COLUMNS)[None, :]
        mu = tl.load(mu_ptr + r64 * stride_mm + c * stride_mk, mask=ok, other=0.0)
        lv = tl.load(lv_ptr + r64 * stride_lm + c * stride_lk, mask=ok, other=0.0)
        mu = mu.to(ACC)
        lv = lv.to(ACC)
        eps = tl.randn(seed, element_offsets(rows, cols, K, 0))
        z = mu + tl.exp(0.5 * lv) * eps.to(ACC)
        tl.store(z_ptr + r64 * K + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=ok)
        term = mu * mu + _expm1(lv) - lv
        kl += tl.sum(tl.where(ok, term, 0.0), axis=1)
    tl.store(kl_ptr + rows, 0.5 * kl, mask=row_ok)


@autotune(_backward_configs(), key=["B", "K"])
@triton.jit
def _reparameterize_backward_kernel(
    gz_ptr, gkl_ptr, mu_ptr, lv_ptr, dmu_ptr, dlv_ptr, B, K,
    stride_gm, stride_gk, stride_gkl, stride_mm, stride_mk, stride_lm, stride_lk, seed_ptr,
    HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr, WIDE_COLUMNS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = flat_tile(K, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    ok = row_ok[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = column_index(cols, WIDE_COLUMNS)[None, :]
    lv = tl.load(lv_ptr + r64 * stride_lm + c * stride_lk, mask=ok, other=0.0)
    lv = lv.to(ACC)
    dmu = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dlv = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if HAS_GZ:
        gz = tl.load(gz_ptr + r64 * stride_gm + c * stride_gk, mask=ok, other=0.0)
        gz = gz.to(ACC)
        eps = tl.randn(tl.load(seed_ptr), element_offsets(rows, cols, K, 0))
        dmu += gz
        dlv += 0.5 * gz * eps.to(ACC) * tl.exp(0.5 * lv)
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + rows.to(tl.int64) * stride_gkl, mask=row_ok, other=0.0)
        gkl = gkl.to(ACC)[:, None]
        mu = tl.load(mu_ptr + r64 * stride_mm + c * stride_mk, mask=ok, other=0.0)
        dmu += gkl * mu.to(ACC)
        dlv += 0.5 * gkl * _expm1(lv)
    out = r64 * K + cols[None, :]
    tl.store(dmu_ptr + out, dmu.to(dmu_ptr.dtype.element_ty), mask=ok)
    tl.store(dlv_ptr + out, dlv.to(dlv_ptr.dtype.element_ty), mask=ok)


def reparameterize_forward(mu, logvar, seed):
    """(z, kl) as ``fastae.reference.reparameterize_forward``; eps equals ``tl.randn`` at
    (seed, row * k + col). z is contiguous in mu's dtype, kl (B,) float32 (float64 for
    float64 inputs)."""
    check_sizes(mu=mu)
    batch, latent = mu.shape
    z = empty((batch, latent), mu.device, mu.dtype)
    kl = stat_buffer(mu, batch)
    launch(_reparameterize_forward_kernel, lambda meta: (cdiv(batch, meta["BLOCK_M"]),),
        mu, logvar, z, kl, batch, latent,
        mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1), seed_pointer(seed, mu),
        WIDE_COLUMNS=wide_columns(mu, logvar), ACC=acc_dtype(mu.dtype),
    )  # fmt: skip
    return z, kl


def reparameterize_backward(grad_z, grad_kl, mu, logvar, seed):
    """(dmu, dlogvar) as ``fastae.reference.reparameterize_backward``; a missing upstream
    gradient (None) counts as zero."""
    batch, latent = mu.shape
    dmu = empty((batch, latent), mu.device, mu.dtype)
    dlogvar = empty((batch, latent), mu.device, mu.dtype)
    gz = grad_z if grad_z is not None else mu
    gkl = grad_kl if grad_kl is not None else mu[:, 0]
    launch(_reparameterize_backward_kernel, grid_tiles(batch, latent),
        gz, gkl, mu, logvar, dmu, dlogvar, batch, latent,
        gz.stride(0), gz.stride(1), gkl.stride(0),
        mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1), seed_pointer(seed, mu),
        HAS_GZ=grad_z is not None, HAS_GKL=grad_kl is not None,
        WIDE_COLUMNS=wide_columns(gz, mu, logvar), ACC=acc_dtype(mu.dtype),
    )  # fmt: skip
    return dmu, dlogvar
