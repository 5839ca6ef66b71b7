"""The KL sparsity penalty and its gradient in one launch (one program: H is a vector).

``_bernoulli_kl_kernel`` walks rho_hat in blocks: q = clamp(rho_hat, eps, 1 - eps), sums
kl_j = rho log(rho / q_j) + (1 - rho) log((1 - rho) / (1 - q_j)), and stores the gradient
d kl / d rho_hat_j = (q_j - rho) / (q_j (1 - q_j)) where the clamp is inactive (0 where it
clamps), so backward is one product with the upstream scalar. In plain torch this is about
twenty small kernels forward and backward.
"""

from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl

from fastae.reference import KL_EPS, stat_dtype

from .common import acc_dtype, empty, interpreting, launch, log1p


@triton.jit
def _joined(hi, mid, lo, ACC: tl.constexpr):
    """(hi + mid) + lo in ACC: a float64 constant exactly in float64, rounded in float32."""
    return (tl.cast(hi, ACC) + tl.cast(mid, ACC)) + tl.cast(lo, ACC)


@triton.jit
def _bernoulli_kl_kernel(
    rho_hat_ptr, grad_ptr, kl_ptr, H, rho_hi, rho_mid, rho_lo,
    one_minus_rho_hi, one_minus_rho_mid, one_minus_rho_lo,
    log_rho_hi, log_rho_mid, log_rho_lo,
    log_one_minus_rho_hi, log_one_minus_rho_mid, log_one_minus_rho_lo,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # rho, 1 - rho, log(rho) and log(1 - rho) come from the host in float64, each as three
    # float32 scalars (Triton passes Python floats as float32): 1 - rho in float32 would lose
    # the digits of a rho near 1, and two parts leave float64 2^-48 short
    rho = _joined(rho_hi, rho_mid, rho_lo, ACC)
    one_minus_rho = _joined(one_minus_rho_hi, one_minus_rho_mid, one_minus_rho_lo, ACC)
    log_rho = _joined(log_rho_hi, log_rho_mid, log_rho_lo, ACC)
    log_one_minus_rho = _joined(
        log_one_minus_rho_hi, log_one_minus_rho_mid, log_one_minus_rho_lo, ACC
    )
    total = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < H
        r = tl.load(rho_hat_ptr + cols, mask=ok, other=0.5).to(ACC)
        q = tl.minimum(tl.maximum(r, EPS, tl.PropagateNan.ALL), 1.0 - EPS, tl.PropagateNan.ALL)
        kl = rho * (log_rho - tl.log(q)) + one_minus_rho * (log_one_minus_rho - log1p(-q))
        total += tl.where(ok, kl, 0.0)
        # q - rho as ((q - rho_hi) - rho_mid) - rho_lo: exact where q is near rho, with no
        # rounding of rho
        q_minus_rho = ((q - tl.cast(rho_hi, ACC)) - tl.cast(rho_mid, ACC)) - tl.cast(rho_lo, ACC)
        grad = tl.where(q == r, q_minus_rho / (q * (1.0 - q)), 0.0)
        tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=ok)
    tl.store(kl_ptr, tl.sum(total, axis=0).to(kl_ptr.dtype.element_ty))


def bernoulli_kl(rho_hat, rho):
    """(kl, grad) as ``fastae.reference.bernoulli_kl``."""
    rho_hat = rho_hat.contiguous()  # a vector: the copy of a strided one is free
    dtype = stat_dtype(rho_hat.dtype)
    grad = empty(rho_hat.shape, rho_hat.device, dtype)
    kl = empty((), rho_hat.device, dtype)
    constants = (rho, 1.0 - rho, math.log(rho), math.log1p(-rho))
    launch(_bernoulli_kl_kernel, (1,),
        rho_hat, grad, kl, rho_hat.shape[0], *(part for c in constants for part in _split(c)),
        EPS=KL_EPS, ACC=acc_dtype(rho_hat.dtype), BLOCK=64 if interpreting() else 1024,
    )  # fmt: skip
    return kl, grad


def _split(value: float) -> tuple[float, float, float]:
    """(hi, mid, lo), each a float32, hi + mid + lo = value: 24 + 24 bits of the float64
    significand's 53 in hi and mid, the rest in lo (exactly, unless lo is too small for
    float32's normal range: rho below about 1e-24)."""
    hi = float(np.float32(value))
    mid = float(np.float32(value - hi))
    return hi, mid, value - hi - mid
