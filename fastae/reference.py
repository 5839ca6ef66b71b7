"""The math of every op in plain torch: the CPU backend and the oracle for the kernels.

Forward and backward are written out analytically (each function's docstring gives its
formulas); nothing here relies on autograd. Statistics accumulate in float32 at least
(float64 stays float64).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import philox

ACTIVATIONS = ("sigmoid", "tanh", "relu", "softplus")
OUTPUTS = ("sigmoid", "identity")
LOSSES = ("bce", "mse")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and partial sums: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def column_major(matrix: torch.Tensor) -> bool:
    """Whether a 2-D tensor is laid out column by column, as W^T of a row-major W is (the
    decoder weight of a tied autoencoder)."""
    return matrix.stride(0) < matrix.stride(1)


def empty_in_layout(matrix: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped as the 2-D ``matrix``, column-major where it is, else row-major.
    A weight's gradient in the weight's own layout goes into ``.grad`` without a copy (autograd
    copies a gradient whose strides differ from its parameter's)."""
    if column_major(matrix):
        return matrix.new_empty(matrix.shape[::-1]).t()
    return matrix.new_empty(matrix.shape)


def affine(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """inputs W^T + b, the bias added by the matrix product itself (one pass fewer)."""
    if bias is None:
        return inputs @ weight.t()
    return torch.addmm(bias, inputs, weight.t())


# ----------------------------------------------------------------------------- activations


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)) to full precision. ``F.softplus`` returns z past its threshold, which
    must lie where log(1 + exp(-z)) drops below z's rounding: 20 serves float32 and the half
    types (exp(-20) / 20 < 2^-24), float64 needs 40 (exp(-40) / 40 < 2^-53)."""
    return F.softplus(z, threshold=40.0 if z.dtype == torch.float64 else 20.0)


def bce_with_logits(
    z: torch.Tensor, target: torch.Tensor, differentiable: bool = False
) -> torch.Tensor:
    """softplus(z) - t z as max(z, 0) - t z + log(1 + e^-|z|), the first two as (1 - t) z or
    -t z: a confident logit on its target keeps its loss e^-|z|, which ``softplus(z) - t z``
    rounds away at t = 1, z = 20 and ``F.binary_cross_entropy_with_logits`` at t = 0, z = -20.

    ``differentiable``: autograd will differentiate the result (torch.func's route), so each
    side of z = 0 is one smooth branch: at z = 0 clamp and abs would give d/dz 1 - 2t and
    d2/dz2 0 instead of 1/2 - t and 1/4. Otherwise the same values without torch.where's
    passes (4x as fast on the CPU): (1 - t) max(z, 0) + (-t) min(z, 0), the unselected
    product a signed zero."""
    if differentiable:
        right = z >= 0
        linear = torch.where(right, (1 - target) * z, -target * z)
        return linear + torch.log1p(torch.exp(torch.where(right, -z, z)))
    linear = (1 - target) * z.clamp(min=0) + (-target) * z.clamp(max=0)
    return linear + torch.log1p(torch.exp(-z.abs()))


def sigmoid_slope(z: torch.Tensor) -> torch.Tensor:
    """sigmoid'(z) = sigmoid(z) sigmoid(-z) = m (1 - m), m = sigmoid(-|z|): no 1 - sigmoid(z)
    to round the tail away (z = 20: 2.1e-9, not 0)."""
    tail = torch.sigmoid(-z.abs())
    return tail * (1 - tail)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "relu":
        return torch.relu(z)
    if activation == "softplus":
        return softplus(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def slope(h: torch.Tensor, activation: str) -> torch.Tensor:
    """s = a'(z) written in terms of h = a(z)."""
    if activation == "sigmoid":
        return h * (1 - h)
    if activation == "tanh":
        return 1 - h * h
    if activation == "relu":
        return torch.sign(h)  # h = relu(z) >= 0 or NaN (sign 0): 1 where h > 0, else 0
    if activation == "softplus":
        return -torch.expm1(-h)  # 1 - exp(-h) = sigmoid(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def curvature(h: torch.Tensor, s: torch.Tensor, activation: str) -> torch.Tensor:
    """a''(z) from h and s: sigmoid s(1-2h), tanh -2hs, relu 0, softplus s(1-s) = s exp(-h)
    (1 - s is exp(-h): no cancellation where s rounds to 1)."""
    if activation == "sigmoid":
        return s * (1 - 2 * h)
    if activation == "tanh":
        return -2 * h * s
    if activation == "relu":
        return torch.zeros_like(h)
    if activation == "softplus":
        return s * torch.exp(-h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- noise


def _f32(value: float) -> torch.Tensor:
    """Noise hyper-parameters act in float32, as they do inside the kernels."""
    return torch.tensor(value, dtype=torch.float32)


def corrupt(
    x: torch.Tensor, kind: str, level: float, low: float, high: float, seed: int, base: int = 0
) -> torch.Tensor:
    """x~ for a (B, d) tensor; random numbers from Philox at offset base + row*d + col."""
    if kind == "none":
        return x
    compute = stat_dtype(x.dtype)
    level32 = _f32(level)
    rows, cols = x.shape
    if kind == "gaussian":
        eps = philox.element_normals(seed, rows, cols, x.device, base)
        return (x.to(compute) + (level32 * eps).to(compute)).to(x.dtype)
    count = 2 if kind == "salt_pepper" else 1
    uniforms = philox.element_uniforms(seed, rows, cols, x.device, base, count)
    keep = uniforms[0] >= level32
    # masking multiplies by the mask (x m, as dropout: a NaN or inf dropped stays non-finite)
    if kind == "masking":
        return x * keep.to(x.dtype)
    if kind == "masking_rescale":
        return (x.to(compute) / (1 - level32).to(compute) * keep.to(compute)).to(x.dtype)
    if kind == "salt_pepper":
        salt = uniforms[1] >= 0.5
        fill = torch.where(salt, _f32(high), _f32(low)).to(x.dtype)
        return torch.where(keep, x, fill)
    raise ValueError(f"unknown noise kind {kind!r}")


def corrupt_input_grad(
    grad: torch.Tensor, kind: str, level: float, seed: int, base: int = 0
) -> torch.Tensor:
    """d loss / d x from d loss / d x~: the mask regenerated from the seed, never stored."""
    if kind in ("none", "gaussian"):
        return grad
    level32 = _f32(level)
    keep = philox.element_uniforms(seed, *grad.shape, grad.device, base)[0] >= level32
    if kind == "masking_rescale":
        compute = stat_dtype(grad.dtype)
        return (grad.to(compute) / (1 - level32).to(compute) * keep.to(compute)).to(grad.dtype)
    if kind == "salt_pepper":
        return torch.where(keep, grad, 0.0)  # replaced entries do not depend on x
    return grad * keep.to(grad.dtype)


# ----------------------------------------------------------------------------- encoder


def encode_forward(
    x, weight, bias, activation, noise_kind, level, low, high, seed, statistics=True
):
    """(h, rho_hat, jac, stats): h = a(x~ W^T + b), rho_hat = mean_i h, and
    jac = (1/B) sum_j c_j w_j with c_j = sum_i s_ij^2, w_j = ||W_j||^2; stats = [c; w] (2, H)
    is what backward needs besides h, W and x. Without ``statistics``, rho_hat, jac and stats
    are empty ((0,), (0,), (2, 0)): only h is computed (backward then takes no g_rho, g_jac).
    """
    x_tilde = corrupt(x, noise_kind, level, low, high, seed)
    z = affine(x_tilde, weight, bias)
    h = activate(z, activation)
    acc = stat_dtype(h.dtype)
    if not statistics:
        return h, *no_statistics(h)
    h_acc = h.to(acc)
    batch = x.shape[0]
    rho_hat = h_acc.sum(0) / batch
    c = slope(h_acc, activation).square().sum(0)
    row_sq_norm = weight.to(acc).square().sum(1)
    jac = (c * row_sq_norm).sum() / batch
    return h, rho_hat, jac, torch.stack([c, row_sq_norm])


def no_statistics(h):
    """The empty rho_hat, jac and stats of an encode without statistics."""
    acc = stat_dtype(h.dtype)
    return h.new_empty(0, dtype=acc), h.new_empty(0, dtype=acc), h.new_empty((2, 0), dtype=acc)


def encode_backward(
    grad_h, grad_rho, grad_jac, x, weight, h, stats, activation, noise_kind, level, low, high,
    seed, needs_input_grad,
):  # fmt: skip
    """(dW, db, dx or None):
    dz = s (g_h + g_rho/B) + g_jac (2/B) w_j s a'';  dW = dz^T x~ + g_jac (2/B) c_j W_j;
    db = sum_i dz;  dx = (dz W) * dx~/dx. A None g_rho or g_jac is zero (its output unused).
    """
    batch = x.shape[0]
    acc = stat_dtype(h.dtype)
    h_acc = h.to(acc)
    s = slope(h_acc, activation)
    c, row_sq_norm = stats[0], stats[1]
    dz = grad_h.to(acc) if grad_rho is None else grad_h.to(acc) + grad_rho.to(acc) / batch
    dz = s * dz
    if grad_jac is not None:
        jac_coef = grad_jac.to(acc) * (2.0 / batch)
        dz = dz + jac_coef * row_sq_norm * s * curvature(h_acc, s, activation)
    grad_bias = dz.sum(0)
    dz = dz.to(h.dtype)
    x_tilde = corrupt(x, noise_kind, level, low, high, seed)
    grad_weight = dz.t() @ x_tilde
    if grad_jac is not None:
        grad_weight = grad_weight + (jac_coef * c).unsqueeze(1).to(weight.dtype) * weight
    grad_input = None
    if needs_input_grad:
        grad_input = corrupt_input_grad(dz @ weight, noise_kind, level, seed)
    return grad_weight, grad_bias.to(weight.dtype), grad_input


# ----------------------------------------------------------------------------- decoder + loss


def decode_forward(
    h, weight, bias, target, output, loss, with_reconstruction=False, with_gradient=True,
    differentiable=False,
):  # fmt: skip
    """Per-sample loss l_i = sum_k ell(x^_ik, x_ik) and the per-element d ell / d z^ (B, d)
    (and x^ with ``with_reconstruction``). Without ``with_gradient`` (the gradient is not
    wanted: scoring, validation, or autograd differentiates the loss itself) d ell / d z^ is
    not computed and is None; ``differentiable``: autograd will differentiate the loss (see
    :func:`bce_with_logits`).

    BCE uses the logits form ell = softplus(z^) - x z^, whose gradient is x^ - x.
    """
    z = affine(h, weight, bias)
    acc = stat_dtype(z.dtype)
    z_acc, t = z.to(acc), target.to(acc)
    grad_z = None
    if loss == "bce":
        per_element = bce_with_logits(z_acc, t, differentiable)
        if with_gradient:
            grad_z = (torch.sigmoid(z_acc) - t).to(z.dtype)
    else:
        out = torch.sigmoid(z_acc) if output == "sigmoid" else z_acc
        diff = out - t
        per_element = diff.square()
        if with_gradient:
            grad_z = 2 * diff
            if output == "sigmoid":
                grad_z = grad_z * out * (1 - out)
            grad_z = grad_z.to(z.dtype)
    if with_reconstruction:
        x_hat = torch.sigmoid(z_acc) if output == "sigmoid" else z_acc
        return per_element.sum(1), grad_z, x_hat.to(z.dtype)
    return per_element.sum(1), grad_z


def reconstruct(h, weight, bias, output, logits=False):
    """x^ = a_out(h V^T + c); ``logits``: the pre-activation z^ = h V^T + c itself."""
    z = affine(h, weight, bias)
    return torch.sigmoid(z) if output == "sigmoid" and not logits else z


def decode_backward(grad_loss, h, weight, grad_z, needs_h_grad):
    """(dV, dc, dh or None): dz = g_l_i * d ell/d z^; dV = dz^T h, dc = sum_i dz, dh = dz V."""
    dz = grad_z * grad_loss.to(grad_z.dtype).unsqueeze(1)
    # dV in V's layout (see empty_in_layout): (h^T dz)^T when V is column-major
    grad_weight = (h.t() @ dz).t() if column_major(weight) else dz.t() @ h
    grad_bias = dz.sum(0, dtype=stat_dtype(dz.dtype)).to(weight.dtype)  # no float32 copy of dz
    grad_h = dz @ weight if needs_h_grad else None
    return grad_weight, grad_bias, grad_h


def decode_target_grad(grad_loss, h, weight, bias, target, output, loss):
    """d l / d x (target): BCE -z^; MSE -2 (x^ - x). Recomputes z^ (only when asked for)."""
    out = reconstruct(h, weight, bias, "identity" if loss == "bce" else output)
    acc = stat_dtype(out.dtype)
    per_element = -out.to(acc) if loss == "bce" else -2 * (out.to(acc) - target.to(acc))
    return (per_element * grad_loss.to(acc).unsqueeze(1)).to(target.dtype)


# ----------------------------------------------------------------------------- reparameterize


def standard_normal(seed: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """eps (rows, cols) float32 = ``tl.randn(seed, row * cols + col)``."""
    return philox.element_normals(seed, rows, cols, torch.device(device))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, exp(logvar)) || N(0, I)) = 1/2 sum_j (mu^2 + exp(logvar) - 1 - logvar)
    (B,), float32 at least; differentiable by autograd (no sampling)."""
    acc = stat_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    return 0.5 * (m * m + torch.expm1(lv) - lv).sum(1)


def reparameterize_forward(mu, logvar, seed):
    """(z, kl): z = mu + exp(logvar / 2) * eps with eps = :func:`standard_normal` at
    (seed, row * k + col), contiguous in mu's dtype; kl (B,) = :func:`gaussian_kl`."""
    return reparameterize_with(mu, logvar, standard_normal(seed, *mu.shape, mu.device))


def reparameterize_with(mu, logvar, eps):
    """(z, kl) of :func:`reparameterize_forward` for a given eps (float32)."""
    acc = stat_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    z = (m + torch.exp(0.5 * lv) * eps.to(acc)).to(mu.dtype).contiguous()
    return z, gaussian_kl(mu, logvar)


def reparameterize_backward(grad_z, grad_kl, mu, logvar, seed):
    """(dmu, dlogvar), eps regenerated from the seed (a None upstream gradient is zero):
    dmu = g_z + g_kl mu;  dlogvar = g_z eps exp(logvar / 2) / 2 + g_kl (exp(logvar) - 1) / 2.
    """
    acc = stat_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    dmu = torch.zeros_like(m, memory_format=torch.contiguous_format)
    dlogvar = torch.zeros_like(dmu)
    if grad_z is not None:
        eps = standard_normal(seed, mu.shape[0], mu.shape[1], mu.device).to(acc)
        g = grad_z.to(acc)
        dmu = dmu + g
        dlogvar = dlogvar + 0.5 * g * eps * torch.exp(0.5 * lv)
    if grad_kl is not None:
        g = grad_kl.to(acc).unsqueeze(1)
        dmu = dmu + g * m
        dlogvar = dlogvar + 0.5 * g * torch.expm1(lv)
    return dmu.to(mu.dtype).contiguous(), dlogvar.to(mu.dtype).contiguous()


# ----------------------------------------------------------------------------- sparsity

# rho_hat is clamped to [KL_EPS, 1 - KL_EPS] inside the KL penalty, so it stays finite when a
# unit is always off or always on. A power of two (about 1e-6): both bounds are exact in every
# float type, so the kernel's float32 constants and the reference's clamp agree in float64.
KL_EPS = 2.0**-20


def bernoulli_kl(rho_hat: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, grad): kl () = sum_j KL(rho || q_j) = sum_j rho log(rho / q_j) + (1 - rho)
    log((1 - rho) / (1 - q_j)) with q = clamp(rho_hat, KL_EPS, 1 - KL_EPS), and its gradient
    grad (H,) = d kl / d rho_hat = (q - rho) / (q (1 - q)) where the clamp is inactive, 0 where
    it clamps (or rho_hat is NaN). Both in rho_hat's dtype, float32 at least."""
    r = rho_hat.to(stat_dtype(rho_hat.dtype))
    q = r.clamp(KL_EPS, 1 - KL_EPS)
    kl = rho * (math.log(rho) - torch.log(q)) + (1 - rho) * (math.log1p(-rho) - torch.log1p(-q))
    # q - rho as (q - rho_hi) - rho_lo, rho_hi = rho in float32: no rounding of rho near q
    rho_hi = float(np.float32(rho))
    grad = torch.where(q == r, ((q - rho_hi) - (rho - rho_hi)) / (q * (1 - q)), 0.0)
    return kl.sum(), grad
