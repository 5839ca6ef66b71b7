"""The eager PyTorch a competent user writes for each benchmark case.

One sigmoid layer with tied weights: h = sigmoid(x W^T + b), x^ = sigmoid(h W + c), binary
cross-entropy on the decoder logits, the analytic contractive penalty
mean_i sum_j (h_ij (1 - h_ij))^2 ||W_j||^2, KL sparsity on the batch mean of h and a
``torch.rand_like`` mask for denoising. Each function below computes what the fastae call in its
docstring computes (the denoising mask aside: fastae draws it from Philox), so the two read side
by side. ``contractive_penalty_jacrev`` is the brute-force alternative: the full encoder
Jacobian of every sample through ``torch.func``. ``vae_step`` is a VAE's: ReLU layers, a
Gaussian posterior, BCE. ``deep_step`` is a deep autoencoder's (Keras's tutorial one): ReLU
layers of ``deep_sizes(H)`` units, untied, a sigmoid output and BCE.

Arguments: x (B, d) in [0, 1]; W (H, d) encoder weight (the decoder uses W^T); b (H,) encoder
bias; c (d,) decoder bias. Every step returns the scalar training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import KL_EPS  # the clamp fastae.KLSparsity applies to the batch mean

# the hyper-parameters of the benchmark cases (fastae side: KLSparsity(RHO, SPARSITY_WEIGHT),
# MaskingNoise(MASK_P), contractive=CONTRACTIVE)
RHO = 0.05
SPARSITY_WEIGHT = 0.1
MASK_P = 0.3
CONTRACTIVE = 0.1
VAE_LATENT = 32  # the VAE step's latent size k (fastae side: VAE(d, H, VAE_LATENT))


def deep_sizes(hidden: int) -> tuple[int, int, int]:
    """The deep step's layer widths for a size's H: H, H / 2, H / 4 (Keras's tutorial deep
    autoencoder is 128, 64, 32; fastae side: DeepAutoencoder(d, deep_sizes(H), tied=False))."""
    if hidden < 4:
        raise ValueError(f"the deep step halves H twice: H must be at least 4, got {hidden}")
    return hidden, hidden // 2, hidden // 4


__all__ = [
    "CONTRACTIVE",
    "MASK_P",
    "RHO",
    "SPARSITY_WEIGHT",
    "VAE_LATENT",
    "all_step",
    "contractive_jacrev_step",
    "contractive_penalty",
    "contractive_penalty_jacrev",
    "contractive_step",
    "corrupt",
    "decode_loss",
    "deep_sizes",
    "deep_step",
    "denoising_step",
    "encode",
    "encode_with_statistics",
    "kl_sparsity",
    "plain_step",
    "reparameterize",
    "sparse_step",
    "vae_step",
]


# ----------------------------------------------------------------------------- ops


def encode(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """fastae: ``h, _, _ = fastae.ops.encode(x, W, b)``."""
    return torch.sigmoid(F.linear(x, W, b))


def encode_with_statistics(x: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fastae: ``h, rho_hat, jac = fastae.ops.encode(x, W, b)``."""
    h = torch.sigmoid(F.linear(x, W, b))
    s = h * (1 - h)
    rho_hat = h.mean(0)
    jac = (s.square() @ W.square().sum(1)).mean()
    return h, rho_hat, jac


def corrupt(x: Tensor, p: float = MASK_P) -> Tensor:
    """fastae: ``fastae.ops.corrupt(x, fastae.MaskingNoise(p))``."""
    return x * (torch.rand_like(x) >= p)


def decode_loss(h: Tensor, W: Tensor, c: Tensor, x: Tensor) -> Tensor:
    """fastae: ``fastae.ops.decode_loss(h, W.t(), c, target=x)`` (per-sample BCE, (B,))."""
    logits = F.linear(h, W.t(), c)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


def kl_sparsity(h: Tensor, rho: float = RHO, weight: float = SPARSITY_WEIGHT) -> Tensor:
    """weight * sum_j KL(rho || mean_i h_ij)."""
    rho_hat = h.mean(0).clamp(KL_EPS, 1 - KL_EPS)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return weight * kl.sum()


def contractive_penalty(h: Tensor, W: Tensor) -> Tensor:
    """mean_i ||J_enc(x_i)||_F^2 for a sigmoid layer: sum_j (h_ij (1 - h_ij))^2 ||W_j||^2."""
    s = h * (1 - h)
    return (s.square() @ W.square().sum(1)).mean()


def contractive_penalty_jacrev(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """The same penalty by brute force: every sample's (H, d) Jacobian through torch.func."""

    def encoder(xi: Tensor) -> Tensor:
        return torch.sigmoid(F.linear(xi, W, b))

    jacobians = torch.vmap(torch.func.jacrev(encoder))(x)  # (B, H, d)
    return jacobians.square().sum((1, 2)).mean()


# ----------------------------------------------------------------------------- training steps


def plain_step(x: Tensor, W: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fastae: ``fastae.Autoencoder(d, H)(x).loss``."""
    h = torch.sigmoid(F.linear(x, W, b))
    return decode_loss(h, W, c, x).mean()


def sparse_step(x: Tensor, W: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fastae: ``fastae.Autoencoder(d, H, sparsity=KLSparsity(RHO, SPARSITY_WEIGHT))(x).loss``."""
    h = torch.sigmoid(F.linear(x, W, b))
    return decode_loss(h, W, c, x).mean() + kl_sparsity(h)


def denoising_step(x: Tensor, W: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fastae: ``fastae.Autoencoder(d, H, noise=MaskingNoise(MASK_P))(x).loss``."""
    x_tilde = x * (torch.rand_like(x) >= MASK_P)
    h = torch.sigmoid(F.linear(x_tilde, W, b))
    return decode_loss(h, W, c, x).mean()


def contractive_step(x: Tensor, W: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fastae: ``fastae.Autoencoder(d, H, contractive=CONTRACTIVE)(x).loss``."""
    h = torch.sigmoid(F.linear(x, W, b))
    return decode_loss(h, W, c, x).mean() + CONTRACTIVE * contractive_penalty(h, W)


def all_step(x: Tensor, W: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fastae: ``fastae.Autoencoder(d, H, noise=..., sparsity=..., contractive=...)(x).loss``."""
    x_tilde = x * (torch.rand_like(x) >= MASK_P)
    h = torch.sigmoid(F.linear(x_tilde, W, b))
    loss = decode_loss(h, W, c, x).mean() + kl_sparsity(h)
    return loss + CONTRACTIVE * contractive_penalty(h, W)


def contractive_jacrev_step(x: Tensor, W: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The contractive step with the penalty from ``torch.func.jacrev`` (brute force)."""
    h = torch.sigmoid(F.linear(x, W, b))
    return decode_loss(h, W, c, x).mean() + CONTRACTIVE * contractive_penalty_jacrev(x, W, b)


def reparameterize(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """fastae: ``fastae.ops.reparameterize(mu, logvar)`` — z = mu + exp(logvar / 2) eps and
    the per-sample KL to N(0, I)."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)
    return z, kl


def vae_step(x: Tensor, W: Tensor, b: Tensor, Wq: Tensor, bq: Tensor, W2: Tensor, b2: Tensor,
             V: Tensor, c: Tensor) -> Tensor:  # fmt: skip
    """fastae: ``fastae.VAE(d, H, VAE_LATENT)(x).loss`` — ReLU layers, the posterior layer
    Wq (2k, H) giving [mu, logvar], a decoder hidden layer W2 (H, k), a sigmoid output layer
    V (d, H) and BCE: the batch mean of the negative ELBO."""
    h = F.relu(F.linear(x, W, b))
    mu, logvar = F.linear(h, Wq, bq).chunk(2, dim=1)
    z, kl = reparameterize(mu, logvar)
    h2 = F.relu(F.linear(z, W2, b2))
    return (decode_loss(h2, V.t(), c, x) + kl).mean()


def deep_step(x: Tensor, *params: Tensor) -> Tensor:
    """fastae: ``fastae.DeepAutoencoder(d, deep_sizes(H), tied=False)(x).loss``; params as
    the model's: the encoder weights W_1..W_L, their biases, the decoder weights V_1..V_L
    (nn.Linear layout, V_1 the output layer's), their biases."""
    depth = len(params) // 4
    weights, biases = params[:depth], params[depth : 2 * depth]
    decoder_weights, decoder_biases = params[2 * depth : 3 * depth], params[3 * depth :]
    h = x
    for weight, bias in zip(weights, biases, strict=True):
        h = F.relu(F.linear(h, weight, bias))
    for k in range(depth - 1, 0, -1):
        h = F.relu(F.linear(h, decoder_weights[k], decoder_biases[k]))
    return decode_loss(h, decoder_weights[0].t(), decoder_biases[0], x).mean()
