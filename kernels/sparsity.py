"""The KL sparsity penalty and its gradient in one launch (one program: H is a vector).

``_bernoulli_kl_kernel`` walks rho_hat in blocks: q = clamp(rho_hat, eps, 1 - eps), sums
kl_j = rho log(rho / q_j) + (1 - rho) log((1 - rho) / (1 - q_j)), and stores the gradient
d kl / d rho_hat_j = (q_j - rho) / (q_j (1 - q_j)) where the clamp is inactive (0 where it
clamps), so backward is one product with the upstream scalar. In plain torch this is about
twenty small kernels forward and backward.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from fastae.reference import KL_EPS, stat_dtype

from .common import acc_dtype, empty, interpreting, launch, log1p


@triton.jit
def _bernoulli_kl_kernel(
    rho_hat_ptr, grad_ptr, kl_ptr, H, rho_hi, rho_lo,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # rho arrives as two float32 scalars (Triton passes Python floats as float32): their sum
    # recovers it to about 2^-48 in float64, and rounds to rho_hi in float32
    rho = tl.cast(rho_hi, ACC) + tl.cast(rho_lo, ACC)
    log_rho = tl.log(rho)
    log_one_minus_rho = log1p(-rho)
    total = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < H
        r = tl.load(rho_hat_ptr + cols, mask=ok, other=0.5).to(ACC)
        q = tl.minimum(tl.maximum(r, EPS, tl.PropagateNan.ALL), 1.0 - EPS, tl.PropagateNan.ALL)
        kl = rho * (log_rho - tl.log(q)) + (1.0 - rho) * (log_one_minus_rho - log1p(-q))
        total += tl.where(ok, kl, 0.0)
        grad = tl.where(q == r, (q - rho) / (q * (1.0 - q)), 0.0)
        tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=ok)
    tl.store(kl_ptr, tl.sum(total, axis=0).to(kl_ptr.dtype.element_ty))


def bernoulli_kl(rho_hat, rho):
    """(kl, grad) as ``fastae.reference.bernoulli_kl``."""
    rho_hat = rho_hat.contiguous()  # a vector: the copy of a strided one is free
    dtype = stat_dtype(rho_hat.dtype)
    grad = empty(rho_hat.shape, rho_hat.device, dtype)
    kl = empty((), rho_hat.device, dtype)
    rho_hi = float(np.float32(rho))
    launch(_bernoulli_kl_kernel, (1,),
        rho_hat, grad, kl, rho_hat.shape[0], rho_hi, rho - rho_hi,
        EPS=KL_EPS, ACC=acc_dtype(rho_hat.dtype), BLOCK=64 if interpreting() else 1024,
    )  # fmt: skip
    return kl, grad
