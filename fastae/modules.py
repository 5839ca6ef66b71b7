"""``fastae.Autoencoder`` (one hidden layer with sparsity, denoising and contractive terms),
``fastae.DeepAutoencoder`` (several, mirrored in the decoder) and ``StackModule`` (pretrained
autoencoders stacked, as ``fastae.StackedAutoencoder`` fine-tunes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import _checks, ops, reference, steps
from .noise import Noise, check_noise


@dataclass(frozen=True)
class KLSparsity:
    """weight * sum_j KL(rho || rho_hat_j): Bernoulli KL against the target mean activation
    (:func:`fastae.ops.bernoulli_kl`; rho_hat clamped to [2^-20, 1 - 2^-20], so a unit whose
    batch mean falls outside is no longer pulled toward rho). rho_hat is each batch's mean:
    ``fit(..., batch_size=len(x))`` takes the training set's, as full-batch objectives do."""

    rho: float
    weight: float = 1.0

    def __post_init__(self):
        rho = _checks.finite_number("rho", self.rho, low=0.0, high=1.0, open_low=True)
        object.__setattr__(self, "rho", rho)
        object.__setattr__(
            self, "weight", _checks.finite_number("weight", self.weight, low=0, float32=True)
        )

    def penalty(self, h: Tensor, rho_hat: Tensor) -> Tensor:
        """The penalty (a scalar) from the batch's mean activations rho_hat (H,); h unused."""
        return self.weight * ops.bernoulli_kl(rho_hat, self.rho)


@dataclass(frozen=True)
class L1Sparsity:
    """weight * mean_i sum_j |h_ij| (the L1 norm of each code, averaged over the batch)."""

    weight: float

    def __post_init__(self):
        object.__setattr__(
            self, "weight", _checks.finite_number("weight", self.weight, low=0, float32=True)
        )

    def penalty(self, h: Tensor, rho_hat: Tensor, nonnegative: bool = True) -> Tensor:
        """The penalty (a scalar) from the codes h (B, H) and their column means rho_hat (H,),
        which are the mean |h_ij| when ``nonnegative`` (sigmoid, relu, softplus units)."""
        # for nonnegative activations mean_i |h_ij| is rho_hat_j: no pass over h needed
        column_mean = rho_hat if nonnegative else h.abs().mean(0, dtype=rho_hat.dtype)
        return self.weight * column_mean.sum()


@dataclass
class AutoencoderOutput:
    """What ``Autoencoder.forward`` returns.

    loss: total = reconstruction_loss + sum(penalties.values()); reconstruction_loss: batch mean
    of the per-sample loss; penalties: each regularizer's term by name ("sparsity",
    "contractive"); code: h (B, H); per_sample: per-sample reconstruction loss (B,);
    jacobian_norm: batch mean of ||J_enc(x_i)||_F^2 at the encoder's input (x~ with noise in
    training mode; ``Autoencoder`` only; None when no penalty
    needed the encoder's statistics, and always None from ``DeepAutoencoder``, whose one
    penalty, on the code, is "sparsity", and ``StackModule``, which names its penalties per
    layer: "sparsity0", "contractive0", "sparsity1", ...).

    A training step computes them in one autograd node (see ``fastae.steps``): code,
    per_sample, the penalties and jacobian_norm are that node's outputs beside loss, not inputs
    to it. A term of your own built on them adds its gradient; loss's does not pass through
    them, so a hook or ``retain_grad`` on code sees only yours.
    """

    loss: Tensor
    reconstruction_loss: Tensor
    code: Tensor
    per_sample: Tensor
    penalties: dict[str, Tensor] = field(default_factory=dict)
    jacobian_norm: Tensor | None = None  # batch mean of ||J_enc||_F^2 (None: not computed)


# a pytree node, so that torch.export, torch.func.vmap and the like take a module returning it
torch.export.register_dataclass(AutoencoderOutput, serialized_type_name="fastae.AutoencoderOutput")


class _SumOverProcesses(torch.autograd.Function):
    """y = sum over processes of x. Every process's y depends on every x with slope 1, so
    dL/dx is the sum over processes of dL/dy: backward all-reduces the gradient too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()
        torch.distributed.all_reduce(total)
        return total


def global_column_mean(column_mean: Tensor, batch: int) -> Tensor:
    """Mean over the batches of all processes from each process's mean, differentiably.

    The backward of the sum all-reduces the gradient, so after data-parallel gradient
    averaging each process holds the gradient of the global-batch statistic. Without an
    initialized process group: unchanged.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return column_mean
    total = _SumOverProcesses.apply(column_mean * batch)
    # a fill, not a copy from the host (which would wait for the GPU at every step)
    count = torch.full((), float(batch), device=column_mean.device, dtype=column_mean.dtype)
    torch.distributed.all_reduce(count)
    return total / count


class FixedAtBuild:
    """A model's layout (``_FIXED``: its widths, tied or not), set once when it is built: its
    parameters' shapes follow it, so changing one is an error, not a model whose description
    no longer matches its weights. Its flags (``_FLAGS``) are checked whenever set."""

    _FIXED: tuple[str, ...] = ()
    _FLAGS = ("check_targets", "sync_statistics")

    def __setattr__(self, name: str, value) -> None:
        held = self.__dict__.get(name, value)
        if name in self._FIXED and not (type(held) is type(value) and held == value):
            raise AttributeError(
                f"{name} is fixed when the model is built (the parameters' shapes follow it): "
                f"build a new {type(self).__name__}"
            )
        if name in self._FLAGS:
            value = _checks.flag(name, value)
        super().__setattr__(name, value)


class OutputOptions(FixedAtBuild):
    """A model's ``activation``, ``output`` and ``loss_name``, checked whenever set, alone and
    together (a model set up again after construction trains as one constructed so would):
    each against the others as they are then, so from output "sigmoid" with loss "bce" to
    "identity" with "mse" set ``loss_name`` first, and back ``output`` first."""

    _OPTIONS = ("activation", "output", "loss_name")

    def __setattr__(self, name: str, value) -> None:
        if name in self._OPTIONS:  # through its property's check, whatever the value
            # (nn.Module's __setattr__ would take a module for a child module instead)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def __setstate__(self, state: dict) -> None:
        # a model pickled while the options were plain attributes holds them by those names
        for name in self._OPTIONS:
            if name in state:
                state[f"_{name}"] = state.pop(name)
        super().__setstate__(state)

    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, value: str) -> None:
        value = _checks.choice("activation", value, reference.ACTIVATIONS)
        _check_kl_activation(getattr(self, "_sparsity", None), value)
        self._activation = value

    @property
    def output(self) -> str:
        return self._output

    @output.setter
    def output(self, value: str) -> None:
        value = _checks.choice("output", value, reference.OUTPUTS)
        _check_bce_output(getattr(self, "_loss_name", None), value)
        self._output = value

    @property
    def loss_name(self) -> str:
        return self._loss_name

    @loss_name.setter
    def loss_name(self, value: str) -> None:
        value = _checks.choice("loss", value, reference.LOSSES)
        _check_bce_output(value, getattr(self, "_output", None))
        self._loss_name = value


class RegularizerOptions(OutputOptions):
    """OutputOptions, and an autoencoder's ``noise`` and ``sparsity``, checked whenever set
    (a schedule may set them)."""

    _OPTIONS = (*OutputOptions._OPTIONS, "noise", "sparsity")

    @property
    def noise(self) -> Noise | None:
        return self._noise

    @noise.setter
    def noise(self, value: Noise | None) -> None:
        self._noise = check_noise(value)

    @property
    def sparsity(self) -> KLSparsity | L1Sparsity | None:
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: KLSparsity | L1Sparsity | None) -> None:
        if value is not None and not isinstance(value, (KLSparsity, L1Sparsity)):
            raise TypeError(
                f"sparsity must be None, KLSparsity or L1Sparsity, got {type(value).__name__}"
            )
        _check_kl_activation(value, getattr(self, "_activation", None))
        self._sparsity = value


def _check_bce_output(loss: str | None, output: str | None) -> None:
    if loss == "bce" and output not in (None, "sigmoid"):
        raise ValueError(f"loss 'bce' needs output 'sigmoid', got output {output!r}")


def _check_kl_activation(sparsity, activation: str | None) -> None:
    if isinstance(sparsity, KLSparsity) and activation not in (None, "sigmoid"):
        raise ValueError(
            f"sparsity KLSparsity needs activation 'sigmoid' (activations in (0, 1)), "
            f"got activation {activation!r}"
        )


def _set_options(module, activation, output, loss, noise, sparsity) -> None:
    """Check and set an autoencoder's activation, output, loss_name, noise and sparsity."""
    module.activation, module.output, module.loss_name = activation, output, loss
    module.noise, module.sparsity = noise, sparsity


def _sparsity_penalty(sparsity, activation: str, h: Tensor, rho_hat: Tensor) -> Tensor:
    """The sparsity term of codes h (rho_hat: their column means)."""
    if isinstance(sparsity, KLSparsity):
        return sparsity.penalty(h, rho_hat)
    return sparsity.penalty(h, rho_hat, nonnegative=activation != "tanh")


def _one_node_possible(model: nn.Module, x: Tensor, params: tuple) -> bool:
    """Whether a training step of ``model`` on x can run as one autograd node (see
    ``steps.available``): not with statistics summed over processes, nor with an L1 penalty on
    tanh codes (|h| is not rho_hat)."""
    sparsity = model.sparsity
    return (
        not (model.sync_statistics and model.training and isinstance(sparsity, KLSparsity))
        and not (isinstance(sparsity, L1Sparsity) and model.activation == "tanh")
        and steps.available(x, params)
    )


def _step_sparsity(sparsity) -> tuple[tuple[float, float] | None, float | None]:
    """(kl, l1_weight) as the one-node steps take a sparsity spec: (rho, weight) of a
    KLSparsity, the weight of an L1Sparsity."""
    if isinstance(sparsity, KLSparsity):
        return (sparsity.rho, sparsity.weight), None
    if isinstance(sparsity, L1Sparsity):
        return None, sparsity.weight
    return None, None


class Autoencoder(RegularizerOptions, nn.Module):
    """Regularized one-layer autoencoder.

    Args:
        in_features: d. hidden_features: H.
        activation: hidden activation ("sigmoid", "tanh", "relu", "softplus").
        output: "sigmoid" or "identity". loss: "bce" (sigmoid output) or "mse".
        tied: decoder weight is the encoder weight transposed.
        noise: a GaussianNoise / MaskingNoise / SaltPepperNoise spec for denoising training
            (applied in training mode only; a spec without seed draws a fresh one each step).
        sparsity: KLSparsity (sigmoid only) or L1Sparsity, or None.
        contractive: weight lambda of the contractive penalty lambda * mean_i ||J_enc(x_i)||_F^2,
            the Jacobian taken where the encoder is evaluated: at the corrupted x~_i in
            training mode with noise, at the clean x_i otherwise (eval mode, as validation).
        check_targets: for BCE, check every batch lies in [0, 1] (one device sync per step;
            ``fastae.fit`` checks tensor or array data once and skips the per-step check, and
            checks a DataLoader's batches on the host before their copy, without a sync; a
            ``torch.compile`` graph skips it too).
        sync_statistics: under torch.distributed, in training mode, all-reduce the sparsity
            column sums so the KL penalty sees the mean activation of the global batch (like
            SyncBatchNorm, which also syncs in training mode only: in eval mode each process
            takes its own batch's, so one process can evaluate alone); the other terms are
            per-sample means, which data-parallel averaging already makes global for equal
            local batch sizes.
        device, dtype: where and in which dtype the parameters are made and initialised, as
            ``torch.nn.Linear``'s (None: torch's defaults).
    """

    _FIXED = ("in_features", "hidden_features", "tied")
    _OPTIONS = (*RegularizerOptions._OPTIONS, "contractive")

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        activation: str = "sigmoid",
        output: str = "sigmoid",
        loss: str = "bce",
        tied: bool = True,
        noise: Noise | None = None,
        sparsity: KLSparsity | L1Sparsity | None = None,
        contractive: float = 0.0,
        check_targets: bool = True,
        sync_statistics: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        in_features = _checks.positive_int("in_features", in_features)
        hidden_features = _checks.positive_int("hidden_features", hidden_features)
        _set_options(self, activation, output, loss, noise, sparsity)
        tied = _checks.flag("tied", tied)
        self.contractive = contractive
        self.sync_statistics = _checks.flag("sync_statistics", sync_statistics)
        self.check_targets = _checks.flag("check_targets", check_targets)
        self.in_features, self.hidden_features, self.tied = in_features, hidden_features, tied

        made = {"device": device, "dtype": _checks.float_dtype("dtype", dtype, none=True)}
        self.weight = nn.Parameter(torch.empty(hidden_features, in_features, **made))
        self.bias = nn.Parameter(torch.zeros(hidden_features, **made))
        self.decoder_weight = (
            None if tied else nn.Parameter(torch.empty(in_features, hidden_features, **made))
        )
        self.decoder_bias = nn.Parameter(torch.zeros(in_features, **made))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise afresh as construction does: Xavier-uniform weights, zero biases."""
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.decoder_bias)
        if self.decoder_weight is not None:
            nn.init.xavier_uniform_(self.decoder_weight)

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_features} -> {self.hidden_features}",
            f"activation={self.activation!r}",
            f"output={self.output!r}",
            f"loss={self.loss_name!r}",
            f"tied={self.tied}",
        ]
        if self.noise is not None:
            parts.append(f"noise={self.noise}")
        if self.sparsity is not None:
            parts.append(f"sparsity={self.sparsity}")
        if self.contractive:
            parts.append(f"contractive={self.contractive}")
        return ", ".join(parts)

    @property
    def contractive(self) -> float:
        """Weight of the contractive term; checked when set (a schedule may set it)."""
        return self._contractive

    @contractive.setter
    def contractive(self, value: float) -> None:
        self._contractive = _checks.finite_number("contractive", value, low=0, float32=True)

    @property
    def decoder_matrix(self) -> Tensor:
        """Decoder weight in nn.Linear layout (d, H): W^T when tied."""
        return self.weight.t() if self.decoder_weight is None else self.decoder_weight

    def encode(self, x: Tensor) -> Tensor:
        """Codes h (B, H) of x as given (never corrupted, in either mode)."""
        x = _checks.model_input(x, self.weight, self.in_features)
        h, _, _ = ops.encode(
            x, self.weight, self.bias, activation=self.activation, statistics=False
        )
        return h

    def decode(self, h: Tensor, *, logits: bool = False) -> Tensor:
        """Reconstruction x^ (B, d) from codes; ``logits``: the output layer's pre-activation
        z^ (a sigmoid output's logits; x^ itself for an identity output)."""
        h = _checks.tensor("h", h, 2)
        weight = self.decoder_matrix
        _checks.model_kind("h", h, "the decoder weight", weight)
        _checks.size("h", h, 1, weight.shape[1], "the model has that many hidden units")
        _checks.rows("h", h)
        logits = _checks.flag("logits", logits)
        return reference.reconstruct(h, weight, self.decoder_bias, self.output, logits)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruction x^ (B, d) of x as given, never corrupted: ``decode(encode(x))`` (a
        denoising model's reconstruction of a noisy x denoises it)."""
        return self.decode(self.encode(x))

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss (B,) of clean inputs: the anomaly score."""
        return self._per_sample(self.encode(x), x)

    def _per_sample(self, h: Tensor, x: Tensor) -> Tensor:
        """The per-sample loss (B,) of the reconstruction from ``h`` against the input x."""
        steps.check_bce_input(self, x)
        return ops.decode_loss(
            h, self.decoder_matrix, self.decoder_bias, target=x, output=self.output,
            loss=self.loss_name, check_target=False,
        )  # fmt: skip

    @property
    def needs_statistics(self) -> bool:
        """Whether a training step needs encode's statistics (rho_hat, jac): with a sparsity
        or contractive penalty. Without, the encoder computes h alone, and the output's
        ``jacobian_norm`` is None."""
        return self.sparsity is not None or bool(self.contractive)

    def forward(self, x: Tensor) -> AutoencoderOutput:
        x = _checks.model_input(x, self.weight, self.in_features)
        noise = self.noise if self.training else None
        if self._one_node(x):
            return self._one_node_forward(x, noise)
        h, rho_hat, jac = ops.encode(
            x, self.weight, self.bias, activation=self.activation, noise=noise,
            statistics=self.needs_statistics,
        )  # fmt: skip
        per_sample = self._per_sample(h, x)
        reconstruction_loss = per_sample.mean()
        if isinstance(self.sparsity, KLSparsity) and self.sync_statistics and self.training:
            rho_hat = global_column_mean(rho_hat, x.shape[0])
        penalties = self.penalties(h, rho_hat, jac)
        loss = reconstruction_loss
        for term in penalties.values():
            loss = loss + term
        return AutoencoderOutput(loss, reconstruction_loss, h, per_sample, penalties, jac)

    def penalties(self, h: Tensor, rho_hat: Tensor, jac: Tensor) -> dict[str, Tensor]:
        """The regularizers' terms by name ("sparsity", "contractive") from encode's h,
        rho_hat and jac."""
        penalties = {}
        if self.sparsity is not None:
            penalties["sparsity"] = _sparsity_penalty(self.sparsity, self.activation, h, rho_hat)
        if self.contractive:
            penalties["contractive"] = self.contractive * jac
        return penalties

    def _one_node(self, x: Tensor) -> bool:
        params = (self.weight, self.bias, self.decoder_weight, self.decoder_bias)
        return _one_node_possible(self, x, params)

    def _one_node_forward(self, x: Tensor, noise: Noise | None) -> AutoencoderOutput:
        kl, l1 = _step_sparsity(self.sparsity)
        loss, reconstruction, per_sample, h, jac, sparsity, contractive = steps.autoencoder_step(
            x, self.weight, self.bias, self.decoder_weight, self.decoder_bias,
            activation=self.activation, noise=noise, statistics=self.needs_statistics,
            output=self.output, loss=self.loss_name, check_target=self.check_targets, kl=kl,
            l1_weight=l1, contractive=self.contractive,
        )  # fmt: skip
        penalties = {}
        if sparsity is not None:
            penalties["sparsity"] = sparsity
        if contractive is not None:
            penalties["contractive"] = contractive
        return AutoencoderOutput(loss, reconstruction, h, per_sample, penalties, jac)


class DeepAutoencoder(RegularizerOptions, nn.Module):
    """Regularized autoencoder with several hidden layers, the decoder mirroring the encoder.

    With sizes (s_1, ..., s_L) and s_0 = d: the encoder computes h_k = a(h_{k-1} W_k^T + b_k)
    (s_k units) from h_0 = x~, the code is h_L; the decoder computes g_k = a(g_{k+1} V_k^T +
    c_k) from g_L = h_L down to g_1, then x^ = a_out(g_1 V_0^T + c_0) and its per-sample
    loss. Every hidden layer is :func:`fastae.ops.encode` (the activation in the product's
    epilogue; the first layer's noise as ``encode``'s: one corrupt pass by default, in the
    layer's input loads with ``FASTAE_CORRUPTED_INPUT=regenerate``), the output layer
    :func:`fastae.ops.decode_loss` (output activation and loss in one pass). Keras's deep
    autoencoder is ``DeepAutoencoder(784, (128, 64, 32), activation="relu", tied=False)``.

    Args:
        in_features: d. sizes: the encoder's layer widths, the last the code size.
        activation, output, loss, noise, check_targets: as :class:`Autoencoder`; every
            hidden layer, the decoder's included, takes ``activation``.
        tied: each decoder weight is its encoder weight transposed (V_k = W_{k+1}^T).
        sparsity: KLSparsity (sigmoid) or L1Sparsity on the code h_L, or None.
        sync_statistics: as :class:`Autoencoder` (the KL penalty's code means over processes).
        device, dtype: as :class:`Autoencoder`'s.

    No contractive penalty: the fused op's Jacobian is one layer's, not the whole encoder's
    (use :class:`Autoencoder`, or :class:`fastae.StackedAutoencoder` for a per-layer one).
    """

    _FIXED = ("in_features", "sizes", "tied")

    def __init__(
        self,
        in_features: int,
        sizes,
        *,
        activation: str = "relu",
        output: str = "sigmoid",
        loss: str = "bce",
        tied: bool = False,
        noise: Noise | None = None,
        sparsity: KLSparsity | L1Sparsity | None = None,
        check_targets: bool = True,
        sync_statistics: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        in_features = _checks.positive_int("in_features", in_features)
        sizes = _checks.widths("sizes", sizes)
        _set_options(self, activation, output, loss, noise, sparsity)
        self.tied = _checks.flag("tied", tied)
        self.check_targets = _checks.flag("check_targets", check_targets)
        self.sync_statistics = _checks.flag("sync_statistics", sync_statistics)
        self.in_features, self.sizes = in_features, sizes
        widths = (in_features, *sizes)
        # layer k maps widths[k] -> widths[k + 1]; its decoder maps back
        made = {"device": device, "dtype": _checks.float_dtype("dtype", dtype, none=True)}
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(widths[k + 1], widths[k], **made)) for k in range(len(sizes))
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(w, **made)) for w in sizes)
        self.decoder_weights = (
            None
            if self.tied
            else nn.ParameterList(
                nn.Parameter(torch.empty(widths[k], widths[k + 1], **made))
                for k in range(len(sizes))
            )
        )
        self.decoder_biases = nn.ParameterList(
            nn.Parameter(torch.zeros(w, **made)) for w in widths[:-1]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise afresh as construction does: Xavier-uniform weights, zero biases."""
        decoders = [] if self.decoder_weights is None else list(self.decoder_weights)
        for weight in [*self.weights, *decoders]:
            nn.init.xavier_uniform_(weight)
        for bias in [*self.biases, *self.decoder_biases]:
            nn.init.zeros_(bias)

    @property
    def hidden_features(self) -> int:
        """The code size s_L."""
        return self.sizes[-1]

    def extra_repr(self) -> str:
        widths = " -> ".join(map(str, (self.in_features, *self.sizes)))
        parts = [widths, f"activation={self.activation!r}", f"output={self.output!r}"]
        parts += [f"loss={self.loss_name!r}", f"tied={self.tied}"]
        if self.noise is not None:
            parts.append(f"noise={self.noise}")
        if self.sparsity is not None:
            parts.append(f"sparsity={self.sparsity}")
        return ", ".join(parts)

    def decoder_matrix(self, k: int) -> Tensor:
        """Decoder weight of layer k in nn.Linear layout (widths[k], widths[k + 1])."""
        return self.weights[k].t() if self.decoder_weights is None else self.decoder_weights[k]

    def _encode(self, x: Tensor, noise: Noise | None, statistics: bool):
        """(code, rho_hat of the code or None) of checked x, the first layer corrupting."""
        h, rho_hat = x, None
        last = len(self.sizes) - 1
        for k, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h, rho_hat, _ = ops.encode(
                h, weight, bias, activation=self.activation, noise=noise if k == 0 else None,
                statistics=statistics and k == last,
            )  # fmt: skip
        return h, rho_hat

    def _decode_hidden(self, h: Tensor) -> Tensor:
        """g_1 from the code: the decoder's hidden layers."""
        for k in range(len(self.sizes) - 1, 0, -1):
            h = ops.encode(
                h, self.decoder_matrix(k), self.decoder_biases[k], activation=self.activation,
                statistics=False,
            )[0]  # fmt: skip
        return h

    def _per_sample(self, h: Tensor, x: Tensor) -> Tensor:
        steps.check_bce_input(self, x)
        return ops.decode_loss(
            self._decode_hidden(h), self.decoder_matrix(0), self.decoder_biases[0], target=x,
            output=self.output, loss=self.loss_name, check_target=False,
        )  # fmt: skip

    def encode(self, x: Tensor) -> Tensor:
        """Codes h_L (B, s_L) of x as given (never corrupted, in either mode)."""
        x = _checks.model_input(x, self.weights[0], self.in_features)
        return self._encode(x, None, statistics=False)[0]

    def decode(self, h: Tensor, *, logits: bool = False) -> Tensor:
        """Reconstruction x^ (B, d) from codes; ``logits``: the output layer's pre-activation
        z^ (a sigmoid output's logits; x^ itself for an identity output)."""
        h = _checks.tensor("h", h, 2)
        _checks.model_kind("h", h, "the decoder weight", self.decoder_matrix(len(self.sizes) - 1))
        _checks.size("h", h, 1, self.sizes[-1], "the model's code has that many units")
        _checks.rows("h", h)
        logits = _checks.flag("logits", logits)
        return reference.reconstruct(
            self._decode_hidden(h), self.decoder_matrix(0), self.decoder_biases[0], self.output,
            logits,
        )  # fmt: skip

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruction x^ (B, d) of x as given, never corrupted: ``decode(encode(x))`` (a
        denoising model's reconstruction of a noisy x denoises it)."""
        return self.decode(self.encode(x))

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss (B,) of clean inputs: the anomaly score."""
        x = _checks.model_input(x, self.weights[0], self.in_features)
        return self._per_sample(self._encode(x, None, statistics=False)[0], x)

    def forward(self, x: Tensor) -> AutoencoderOutput:
        x = _checks.model_input(x, self.weights[0], self.in_features)
        noise = self.noise if self.training else None
        encoder = list(zip(self.weights, self.biases, strict=True))
        decoder = [
            (None if self.tied else self.decoder_weights[k], self.decoder_biases[k])
            for k in range(len(self.sizes) - 1, -1, -1)
        ]
        params = tuple(p for pair in (*encoder, *decoder) for p in pair)
        if _one_node_possible(self, x, params):
            kl, l1 = _step_sparsity(self.sparsity)
            loss, reconstruction, per_sample, code, sparsity = steps.deep_autoencoder_step(
                x, encoder, decoder, activation=self.activation, noise=noise,
                output=self.output, loss=self.loss_name, check_target=self.check_targets,
                kl=kl, l1_weight=l1,
            )  # fmt: skip
            penalties = {} if sparsity is None else {"sparsity": sparsity}
            return AutoencoderOutput(loss, reconstruction, code, per_sample, penalties)
        h, rho_hat = self._encode(x, noise, statistics=self.sparsity is not None)
        per_sample = self._per_sample(h, x)
        reconstruction_loss = per_sample.mean()
        penalties = {}
        if self.sparsity is not None:
            if isinstance(self.sparsity, KLSparsity) and self.sync_statistics and self.training:
                rho_hat = global_column_mean(rho_hat, x.shape[0])
            penalties["sparsity"] = _sparsity_penalty(self.sparsity, self.activation, h, rho_hat)
        loss = reconstruction_loss
        for term in penalties.values():
            loss = loss + term
        return AutoencoderOutput(loss, reconstruction_loss, h, per_sample, penalties)


class StackModule(nn.Module):
    """A deep autoencoder made of pretrained :class:`fastae.Autoencoder` layers.

    Encoding runs every layer's encoder in order; decoding runs their decoders in reverse,
    the bottom layer's output activation and loss giving the reconstruction error. In
    training mode the bottom layer's noise corrupts the input, and each layer's sparsity and
    contractive terms (per-layer encoder Jacobian) join the loss. A stack of sigmoid layers
    without penalties is a :class:`fastae.DeepAutoencoder`'s network (the upper layers'
    sigmoid reconstructions are its decoder's hidden layers): its training step runs as that
    model's does, as one autograd node.
    """

    def __init__(self, layers: list[Autoencoder]):
        super().__init__()
        if not layers:
            raise ValueError("StackModule needs at least one layer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, Autoencoder):
                raise TypeError(
                    f"layers[{k}] must be a fastae.Autoencoder, got {type(layer).__name__}"
                )
            if k and layer.in_features != layers[k - 1].hidden_features:
                raise ValueError(
                    f"layers[{k}] takes {layer.in_features} features, but layers[{k - 1}] "
                    f"gives {layers[k - 1].hidden_features} codes"
                )
            first, this = layers[0].weight, layer.weight
            if (this.dtype, this.device) != (first.dtype, first.device):
                raise ValueError(
                    f"layers[{k}] is {this.dtype} on {this.device}, but layers[0] is "
                    f"{first.dtype} on {first.device}: one dtype and device for the stack"
                )
        self.layers = nn.ModuleList(layers)

    @property
    def hidden_features(self) -> int:
        """The top layer's code size."""
        return self.layers[-1].hidden_features

    @property
    def in_features(self) -> int:
        """The bottom layer's input size d."""
        return self.layers[0].in_features

    @property
    def noise(self) -> Noise | None:
        """The bottom layer's noise, which corrupts the stack's input in training mode."""
        return self.layers[0].noise

    def extra_repr(self) -> str:
        widths = [self.in_features] + [layer.hidden_features for layer in self.layers]
        return " -> ".join(map(str, widths))

    def encode(self, x: Tensor) -> Tensor:
        """The top layer's codes of clean inputs, each layer encoding the one below's."""
        for layer in self.layers:
            x = layer.encode(x)
        return x

    def decode(self, h: Tensor, *, logits: bool = False) -> Tensor:
        """Reconstruction from the top layer's codes, each layer decoding the one above's;
        ``logits``: the bottom layer's output pre-activation."""
        for layer in reversed(self.layers[1:]):
            h = layer.decode(h)
        return self.layers[0].decode(h, logits=logits)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruction x^ (B, d) of x as given, never corrupted: ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss (B,) of clean inputs (the bottom layer's loss; the
        anomaly score): the ``per_sample`` of the forward in eval mode, without its penalties."""
        bottom = self.layers[0]
        x = _checks.model_input(x, bottom.weight, bottom.in_features)
        h = self.encode(x)
        for layer in reversed(self.layers[1:]):
            h = layer.decode(h)
        return bottom._per_sample(h, x)

    def _is_deep_autoencoder(self) -> bool:
        """Whether the stack is a sigmoid DeepAutoencoder's network without penalties (the
        one-node deep step has a sparsity term on the code only)."""
        return all(
            layer.activation == "sigmoid"
            and (k == 0 or layer.output == "sigmoid")
            and layer.sparsity is None
            and not layer.contractive
            for k, layer in enumerate(self.layers)
        )

    def forward(self, x: Tensor) -> AutoencoderOutput:
        bottom = self.layers[0]
        x = _checks.model_input(x, bottom.weight, bottom.in_features)
        encoder = [(layer.weight, layer.bias) for layer in self.layers]
        decoder = [(layer.decoder_weight, layer.decoder_bias) for layer in reversed(self.layers)]
        params = tuple(p for pair in (*encoder, *decoder) for p in pair)
        if self._is_deep_autoencoder() and steps.available(x, params):
            loss, reconstruction, per_sample, code, _ = steps.deep_autoencoder_step(
                x, encoder, decoder, activation="sigmoid",
                noise=self.noise if self.training else None, output=bottom.output,
                loss=bottom.loss_name, check_target=bottom.check_targets, kl=None, l1_weight=None,
            )  # fmt: skip
            return AutoencoderOutput(loss, reconstruction, code, per_sample, {})
        h, penalties = x, {}
        for i, layer in enumerate(self.layers):
            noise = self.noise if (self.training and i == 0) else None
            h, rho_hat, jac = ops.encode(
                h, layer.weight, layer.bias, activation=layer.activation, noise=noise,
                statistics=layer.needs_statistics,
            )  # fmt: skip
            if isinstance(layer.sparsity, KLSparsity) and layer.sync_statistics and self.training:
                rho_hat = global_column_mean(rho_hat, x.shape[0])
            for name, term in layer.penalties(h, rho_hat, jac).items():
                penalties[f"{name}{i}"] = term
        code = h
        for layer in reversed(self.layers[1:]):
            if layer.output == "sigmoid":  # the fused layer a DeepAutoencoder's decoder runs
                h = ops.encode(
                    h, layer.decoder_matrix, layer.decoder_bias, activation="sigmoid",
                    statistics=False,
                )[0]  # fmt: skip
            else:
                h = layer.decode(h)
        per_sample = bottom._per_sample(h, x)
        reconstruction_loss = per_sample.mean()
        loss = reconstruction_loss
        for term in penalties.values():
            loss = loss + term
        return AutoencoderOutput(loss, reconstruction_loss, code, per_sample, penalties)
