"""``fastae.VAE``: a variational autoencoder built from the fused ops.

x -> h = a(x W1^T + b1)                        (:func:`fastae.ops.encode`)
  -> [mu, logvar] = h Wq^T + bq                 (one linear layer of 2k outputs)
  -> z = mu + exp(logvar / 2) eps, kl           (:func:`fastae.ops.reparameterize`)
  -> h2 = a(z W2^T + b2)                        (:func:`fastae.ops.encode`)
  -> per-sample reconstruction loss of x        (:func:`fastae.ops.decode_loss`)

With several hidden widths (H_1, ..., H_L) the encoder has L such layers before the posterior
layer and the decoder L after z, mirrored (k -> H_L -> ... -> H_1 -> d).

Training minimizes mean_i (reconstruction_i + beta * kl_i); with beta = 1 that is the
negative evidence lower bound (ELBO). In eval mode z = mu, so the codes, reconstructions and
anomaly scores of an input do not depend on random draws (its batch or row changes them only
by the rounding of the matrix products at the dtype).
"""

from __future__ import annotations

import math
import numbers
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import _checks, ops, reference, steps
from .modules import OutputOptions
from .noise import check_seed

SCORES = ("elbo", "reconstruction")
# rows (draws x batch) that log_likelihood decodes in one pass: as many draws as fit, at
# least one (a batch of more rows is decoded whole, as the encoder took it)
LOG_LIKELIHOOD_ROWS = 2**14


@dataclass
class VAEOutput:
    """What ``VAE.forward`` returns.

    loss: mean_i (reconstruction_i + beta * kl_i), the training objective.
    elbo: per-sample ELBO (B,) = -(reconstruction + kl) (beta = 1; for loss="mse" up to the
    constant -(d/2) log(pi) of the density exp(-squared error) / pi^(d/2) that
    ``log_likelihood`` takes): in training mode a one-draw estimate of the bound on log p(x);
    in eval mode, at z = mu, a deterministic score that is not a bound (it may exceed
    log p(x)).
    reconstruction: per-sample reconstruction loss (B,) (BCE or squared error, summed).
    kl: per-sample KL(q(z|x) || N(0, I)) (B,).
    per_sample: per-sample negative ELBO (B,) = -elbo, the anomaly score.
    mu, logvar: posterior parameters (B, k); z: the latent code used (mu in eval mode).

    A training step computes them in one autograd node (see ``fastae.steps``): mu, logvar, z
    and the per-sample terms are its outputs beside loss, not inputs to it (a hook on z sees
    only the gradient of a term of your own).
    """

    loss: Tensor
    elbo: Tensor
    reconstruction: Tensor
    kl: Tensor
    per_sample: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor

    @property
    def code(self) -> Tensor:
        """The posterior mean mu (B, k), the deterministic code."""
        return self.mu


torch.export.register_dataclass(VAEOutput, serialized_type_name="fastae.VAEOutput")  # as modules


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def hidden_widths(hidden: object) -> tuple[int, ...]:
    """A VAE's ``hidden``, checked, as its widths: an int H is one layer, (H,)."""
    if _is_int(hidden):
        return (_checks.positive_int("hidden", hidden),)
    return _checks.widths("hidden", hidden, one=True)


class VAE(OutputOptions, nn.Module):
    """Variational autoencoder with a diagonal Gaussian posterior and hidden layers on each
    side: one by default, or several (a deep encoder, its decoder mirrored).

    Args:
        in_features: d. hidden: H, the units of the encoder's hidden layer and of the
            decoder's, or the widths (H_1, ..., H_L) of the encoder's hidden layers, the
            decoder's mirroring them (PyOD's VAE: ``(128, 64, 32)``). latent: k (latent
            dimensions).
        activation: hidden activation ("relu", "sigmoid", "tanh", "softplus").
        output: "sigmoid" or "identity". loss: "bce" (sigmoid output, inputs in [0, 1]) or
            "mse".
        beta: weight of the KL term in the training objective (beta-VAE; 1 = the ELBO).
        check_targets: for BCE, check every batch lies in [0, 1] (one device sync per step;
            ``fastae.fit`` checks tensor or array data once and skips the per-step check, and
            checks a DataLoader's batches on the host before their copy, without a sync).
        device, dtype: where and in which dtype the parameters are made and initialised, as
            ``torch.nn.Linear``'s (None: torch's defaults).
    """

    _FIXED = ("in_features", "hidden", "hidden_sizes", "latent")
    _OPTIONS = (*OutputOptions._OPTIONS, "beta")

    def __init__(
        self,
        in_features: int,
        hidden: int | Sequence[int],
        latent: int,
        *,
        activation: str = "relu",
        output: str = "sigmoid",
        loss: str = "bce",
        beta: float = 1.0,
        check_targets: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = _checks.positive_int("in_features", in_features)
        self.hidden_sizes = hidden_widths(hidden)
        self.hidden = self.hidden_sizes[0] if _is_int(hidden) else self.hidden_sizes
        self.latent = _checks.positive_int("latent", latent)
        self.activation, self.output, self.loss_name = activation, output, loss  # checked
        self.beta = beta
        self.check_targets = _checks.flag("check_targets", check_targets)
        d, sizes, latent = self.in_features, self.hidden_sizes, self.latent
        pairs = list(zip(sizes[:-1], sizes[1:], strict=True))  # (H_i, H_i+1)
        made = {"device": device, "dtype": _checks.float_dtype("dtype", dtype, none=True)}
        self.encoder = nn.Linear(d, sizes[0], **made)
        self.encoder_stack = nn.ModuleList(nn.Linear(a, b, **made) for a, b in pairs)  # H_1..H_L
        self.posterior = nn.Linear(sizes[-1], 2 * latent, **made)  # [:k] mu, [k:] logvar
        self.decoder_hidden = nn.Linear(latent, sizes[-1], **made)
        self.decoder_stack = nn.ModuleList(nn.Linear(b, a, **made) for a, b in reversed(pairs))
        self.decoder = nn.Linear(sizes[0], d, **made)

    def reset_parameters(self) -> None:
        """Initialise every layer afresh, as construction does (``torch.nn.Linear``'s
        initialisation, in the same order): e.g. after ``to_empty`` from the meta device."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    @property
    def beta(self) -> float:
        """Weight of the KL term; checked when set (KL annealing sets it between epochs)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _checks.finite_number("beta", value, low=0, float32=True)

    def extra_repr(self) -> str:
        widths = " -> ".join(map(str, (self.in_features, *self.hidden_sizes, self.latent)))
        return (
            f"{widths}, "
            f"activation={self.activation!r}, output={self.output!r}, "
            f"loss={self.loss_name!r}, beta={self.beta}"
        )

    def _check_x(self, x: object) -> Tensor:
        return _checks.model_input(x, self.encoder.weight, self.in_features)

    def posterior_parameters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x), each (B, k)."""
        h = self._hidden(self._check_x(x), [self.encoder, *self.encoder_stack])
        posterior = F.linear(h, self.posterior.weight, self.posterior.bias)
        return posterior[:, : self.latent], posterior[:, self.latent :]

    def _hidden(self, h: Tensor, layers: list[nn.Linear]) -> Tensor:
        """``h`` through hidden ``layers``, each a(h W^T + b)."""
        for layer in layers:
            h = ops.encode(
                h, layer.weight, layer.bias, activation=self.activation, statistics=False
            )[0]
        return h

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean mu (B, k): deterministic."""
        return self.posterior_parameters(x)[0]

    def _decoder_code(self, z: Tensor) -> Tensor:
        return self._hidden(z, [self.decoder_hidden, *self.decoder_stack])

    def decode(self, z: Tensor, *, logits: bool = False) -> Tensor:
        """Decoded mean x^ (B, d) of latent codes z (B, k); ``logits``: the output layer's
        pre-activation (a sigmoid output's logits; x^ itself for an identity output)."""
        z = _checks.tensor("z", z, 2)
        if z.shape[1] != self.latent:
            raise ValueError(
                f"z must have {self.latent} columns (latent), got shape {tuple(z.shape)}"
            )
        _checks.model_kind("z", z, "the model's parameters", self.decoder_hidden.weight)
        _checks.rows("z", z)
        logits = _checks.flag("logits", logits)
        h2 = self._decoder_code(z)
        return reference.reconstruct(
            h2, self.decoder.weight, self.decoder.bias, self.output, logits
        )

    def reconstruct(self, x: Tensor) -> Tensor:
        """x^ (B, d) decoded from the posterior mean: deterministic."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n new samples (n, d): decoded means of z ~ N(0, I) drawn from ``generator`` (or
        torch's default generator) on the generator's device, so a CPU generator gives the
        same draws whatever device the model is on."""
        n = _checks.positive_int("n", n)
        generator = _checks.generator("generator", generator)
        like = self.decoder.weight
        device = like.device if generator is None else generator.device
        z = torch.randn(n, self.latent, generator=generator, device=device, dtype=like.dtype)
        return self.decode(z.to(like.device))

    def _reconstruction(self, z: Tensor, x: Tensor, check: bool = True) -> Tensor:
        if check:
            steps.check_bce_input(self, x)
        return ops.decode_loss(
            self._decoder_code(z), self.decoder.weight, self.decoder.bias, target=x,
            output=self.output, loss=self.loss_name, check_target=False,
        )  # fmt: skip

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss (B,) with z = mu: deterministic."""
        return self._reconstruction(self.encode(x), x)

    def negative_elbo(self, x: Tensor) -> Tensor:
        """Per-sample negative ELBO (B,) = reconstruction + kl with z = mu: deterministic
        (no draw: the same batch gives the same values; a row's value in another batch
        differs only by the rounding of the matrix products at the dtype). At z = mu it is a
        score, not a bound: minus it may exceed log p(x) (:meth:`log_likelihood` estimates
        that)."""
        mu, logvar = self.posterior_parameters(x)
        return self._reconstruction(mu, x) + reference.gaussian_kl(mu, logvar)

    @torch.no_grad()
    def log_likelihood(
        self, x: Tensor, samples: int = 100, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Importance-weighted estimate of log p(x) (B,) (Burda et al., 2016, eq. 8):
        log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x), z_k = mu + sigma eps_k, K = ``samples``.
        Its expectation is a lower bound on log p(x) that rises to it as K grows; at K = 1 it
        is the ELBO's. p(x | z) is the density the loss stands for: exp(-BCE) for "bce" (the
        Bernoulli likelihood, normalized for binary x), exp(-SE) / pi^(d/2) for "mse" (a
        Gaussian of variance 1/2 per element). eps is drawn from ``generator`` (or torch's
        default generator) on its device, so a seeded generator repeats the estimate. The
        estimate is float32 for a float16 or bfloat16 model (the weights are summed in it).
        An evaluation, computed without autograd (its result carries no gradient): to train on
        an importance-weighted bound, build it from ``posterior_parameters`` and ``decode``."""
        x = self._check_x(x)
        steps.check_bce_input(self, x)
        samples = _checks.positive_int("samples", samples)
        generator = _checks.generator("generator", generator)
        # the weights' arithmetic in float32 at least; a half-precision model decodes z rounded
        # to its dtype, and q is evaluated at that z
        acc = reference.stat_dtype(x.dtype)
        mu, logvar = (t.to(acc) for t in self.posterior_parameters(x))
        rows, k = mu.shape
        sigma = torch.exp(0.5 * logvar)
        device = mu.device if generator is None else generator.device
        per_pass = max(1, min(samples, LOG_LIKELIHOOD_ROWS // rows))  # draws a pass
        log_weights = []
        for start in range(0, samples, per_pass):
            draws = min(per_pass, samples - start)
            eps = torch.randn(draws, rows, k, generator=generator, device=device, dtype=acc)
            eps = eps.to(mu.device)
            z = mu + sigma * eps  # (draws, B, k)
            decoded = z.to(x.dtype)
            if x.dtype != acc:
                z = decoded.to(acc)
                eps = torch.where(sigma > 0, (z - mu) / sigma, eps)
            log_p_x = self._reconstruction(decoded.flatten(0, 1), x.repeat(draws, 1), False)
            log_p_x = -log_p_x.to(acc)
            # log p(z) - log q(z | x): the 2 pi terms cancel, (z - mu) / sigma = eps
            log_ratio = 0.5 * (logvar + eps.square() - z.square()).sum(2)
            log_weights.append(log_p_x.view(draws, rows) + log_ratio)
        estimate = torch.logsumexp(torch.cat(log_weights), 0) - math.log(samples)
        if self.loss_name == "mse":
            estimate = estimate - 0.5 * self.in_features * math.log(math.pi)
        return estimate

    def anomaly_score(self, x: Tensor, kind: str = "elbo") -> Tensor:
        """Per-sample anomaly score (B,), higher = more abnormal: the negative ELBO
        (``kind="elbo"``) or the reconstruction error (``"reconstruction"``), both with z = mu.
        """
        kind = _checks.choice("kind", kind, SCORES)
        return self.negative_elbo(x) if kind == "elbo" else self.reconstruction_error(x)

    def forward(self, x: Tensor, seed: int | None = None) -> VAEOutput:
        """Training mode: z = mu + exp(logvar / 2) eps with eps from Philox at ``seed`` (None:
        a fresh seed from torch's generator); with gradients in plain eager mode the step
        runs as one autograd node (:mod:`fastae.steps`). Eval mode:
        z = mu (no random draws; the seed, unused, is still checked)."""
        x = self._check_x(x)
        seed = check_seed(seed)
        layers = [
            self.encoder, *self.encoder_stack, self.posterior, self.decoder_hidden,
            *self.decoder_stack, self.decoder,
        ]  # fmt: skip
        params = tuple(p for layer in layers for p in (layer.weight, layer.bias))
        if self.training and steps.available(x, params):
            outputs = steps.vae_step(
                x, params, activation=self.activation, output=self.output, loss=self.loss_name,
                check_target=self.check_targets, beta=self.beta, seed=seed,
            )  # fmt: skip
            return VAEOutput(*outputs)
        mu, logvar = self.posterior_parameters(x)
        if self.training:
            z, kl = ops.reparameterize(mu, logvar, seed)
        else:
            z, kl = mu, reference.gaussian_kl(mu, logvar)
        reconstruction = self._reconstruction(z, x)
        per_sample = reconstruction + kl
        loss = (reconstruction + self.beta * kl).mean()
        return VAEOutput(loss, -per_sample, reconstruction, kl, per_sample, mu, logvar, z)


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike | typing.BinaryIO,
    image_shape: tuple[int, int],
    *,
    columns: int = 8,
    title: str | None = None,
) -> None:
    """Save images (n, h * w), e.g. ``VAE.sample(n)`` of 8x8 digits, as one PNG mosaic
    (gray scale, ink dark, a blank pixel between images). Needs matplotlib (``apps`` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("save_image_grid needs matplotlib: pip install 'fastae[apps]'") from error
    if not (isinstance(path, (str, os.PathLike)) or hasattr(path, "write")):
        raise TypeError(
            f"path must be a str, os.PathLike or binary file, got {type(path).__name__}"
        )
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__}")
    if not (isinstance(image_shape, (tuple, list)) and len(image_shape) == 2):
        raise TypeError(f"image_shape must be (height, width), got {image_shape!r}")
    height = _checks.positive_int("image_shape[0]", image_shape[0])
    width = _checks.positive_int("image_shape[1]", image_shape[1])
    images = _checks.tensor("images", images, 2)
    if images.is_meta:
        raise ValueError("images is on the meta device: it holds no values to draw")
    images = images.detach().float().cpu()
    _checks.rows("images", images)
    if not torch.isfinite(images).all():
        raise ValueError("images holds NaN or inf, which a gray scale cannot show")
    if images.shape[1] != height * width:
        raise ValueError(
            f"images must have {height * width} columns (image_shape {image_shape}), got "
            f"shape {tuple(images.shape)}"
        )
    columns = _checks.positive_int("columns", columns)
    count = images.shape[0]
    rows = max(1, math.ceil(count / columns))
    low, high = min(0.0, images.min().item()), max(1.0, images.max().item())
    mosaic = torch.full((rows * (height + 1) + 1, columns * (width + 1) + 1), low)
    for i, image in enumerate(images.reshape(count, height, width)):
        top, left = 1 + (i // columns) * (height + 1), 1 + (i % columns) * (width + 1)
        mosaic[top : top + height, left : left + width] = image
    figure = Figure(figsize=(0.6 * columns, 0.6 * rows + (0.4 if title else 0.0)))
    axes = figure.add_subplot()
    axes.imshow(mosaic.numpy(), cmap="gray_r", vmin=low, vmax=high, interpolation="nearest")
    axes.set_axis_off()
    if title:
        axes.set_title(title)
    figure.savefig(path, dpi=100, bbox_inches="tight")
