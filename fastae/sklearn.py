"""scikit-learn estimators built on :class:`fastae.Autoencoder` (the ``apps`` extra).

- :class:`AutoencoderTransformer`: fit / transform / inverse_transform / score_samples, a
  drop-in for ``PCA`` in a ``Pipeline`` (``n_components`` code units).
- :class:`AutoencoderOutlierDetector`: reconstruction error (or, with ``model="vae"``, a
  variational autoencoder's negative ELBO) as the anomaly score, with scikit-learn's
  outlier-detector conventions and PyOD's fitted attributes.

Both take the regularizers of :class:`fastae.Autoencoder` (``sparsity``, ``noise``,
``contractive``), scale their inputs (``scale="standard"``, ``"minmax"`` or ``None``), train
with :func:`fastae.fit` on the GPU when there is one (``device="auto"``), draw their torch
seed from ``random_state`` in ``fit`` and restore torch's global generator's state after it
(fits from several threads take turns with it), stop early on held-out rows
(``early_stopping=True``, as scikit-learn's MLP), train on from their fitted weights
(``warm_start=True``; ``partial_fit`` one epoch a call), fit all or nothing (a fit that
raises leaves the estimator as it was), and pickle to CPU tensors (an unpickled estimator
predicts on the CPU when CUDA is missing).
"""

from __future__ import annotations

import contextlib
import copy
import fractions
import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

try:
    import sklearn
    from scipy.special import erf
    from scipy.stats import binom
    from sklearn.base import (
        BaseEstimator,
        ClassNamePrefixFeaturesOutMixin,
        OutlierMixin,
        TransformerMixin,
    )
    from sklearn.preprocessing import MinMaxScaler, StandardScaler
    from sklearn.utils import check_array, check_random_state
    from sklearn.utils.validation import check_is_fitted
except ImportError as error:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError("fastae.sklearn needs scikit-learn: pip install 'fastae[apps]'") from error

from . import _checks, reference
from .backend import use_backend
from .modules import Autoencoder, DeepAutoencoder, KLSparsity, L1Sparsity
from .noise import check_noise
from .training import (
    SEEDED_RUNS,
    History,
    LossNotFinite,
    cuda_index,
    default_optimizer,
    fit,
    recording_autograd,
    seed_torch,
)
from .vae import SCORES, VAE, hidden_widths


def _quiet_overflow():
    """numpy's overflow warnings off, where a check right after raises a ValueError naming X."""
    return np.errstate(over="ignore", invalid="ignore")


try:
    from sklearn.utils.validation import validate_data as _sklearn_validate_data
except ImportError:  # scikit-learn < 1.6

    def _sklearn_validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)


def host_array(name: str, value):
    """A torch tensor as the numpy array scikit-learn's checks read (detached, on the host, in
    its own dtype; bfloat16, which numpy lacks, widened to float32, which holds each value
    exactly); a masked array as its data, where it masks nothing; anything else as given."""
    if not isinstance(value, torch.Tensor):
        return _checks.unmasked(name, value)
    _checks.dense(name, value)
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no values")
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy(force=True)


def _validate_data(estimator, X, *args, **kwargs):
    """scikit-learn's ``validate_data`` of X (and y), torch tensors read as arrays; its
    finiteness check sums X first and, where the sum overflows (finite values near float's
    largest), checks each value, so numpy's overflow warning says nothing."""
    if args:
        args = (host_array("y", args[0]), *args[1:])
    if "y" in kwargs:
        kwargs["y"] = host_array("y", kwargs["y"])
    with _quiet_overflow():
        return _sklearn_validate_data(estimator, host_array("X", X), *args, **kwargs)


__all__ = ["AutoencoderOutlierDetector", "AutoencoderTransformer", "neg_reconstruction_error"]


def random_state_generator(random_state: object) -> np.random.RandomState:
    """scikit-learn's ``check_random_state`` for ``random_state`` (None or the ``np.random``
    module: numpy's global generator, an int seeds a new one, a RandomState is used as is),
    with errors naming it."""
    if random_state is None or random_state is np.random:
        return check_random_state(random_state)  # numpy's global RandomState
    if isinstance(random_state, np.random.RandomState):
        return random_state
    if isinstance(random_state, (bool, np.bool_)) or not isinstance(random_state, numbers.Integral):
        advice = (
            " (np.random.RandomState(seed) is one)"
            if isinstance(random_state, np.random.Generator)
            else ""
        )
        raise TypeError(
            "random_state must be None, an int or a numpy RandomState, got "
            f"{type(random_state).__name__}{advice}"
        )
    if not 0 <= random_state < 2**32:
        raise ValueError(f"random_state must be in [0, 2**32 - 1], got {random_state}")
    return np.random.RandomState(int(random_state))


SCALES = ("standard", "minmax", None)
# the modules are made and initialised on the CPU in float32 (then moved to the device):
# a fit is the same whatever torch's default dtype and device
_MADE = {"device": "cpu", "dtype": torch.float32}
ESTIMATOR_LOSSES = ("auto", "bce", "mse")
MODELS = ("autoencoder", "vae")  # what the autoencoder estimators train
# lr="auto": Adam's learning rate for each model
AUTOENCODER_LR, VAE_LR = 1e-2, 3e-3
VAE_HIDDEN = 128  # model="vae": the default width of its encoder's and decoder's hidden layer
PROBABILITY_METHODS = ("linear", "unify")  # predict_proba, as PyOD's
# rows per forward pass at predict time (bounds memory on large inputs)
PREDICT_CHUNK = 8192
_SEED_BOUND = np.iinfo(np.int32).max
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
# the parameters that set the shapes of an estimator's weights
_SHAPE_PARAMETERS = "n_components, hidden_layer_sizes, tied, activation (and model, hidden)"


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = _checks.cpu_or_cuda("device", device, "'auto', 'cpu' or a CUDA device")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    return resolved


def _nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _positive_float(name: str, value) -> float:
    return _checks.finite_number(name, value, low=0, open_low=True, float32=True)


def _entropies(x: torch.Tensor) -> torch.Tensor:
    """H(x_k) per element, H(p) = -p log p - (1 - p) log(1 - p): the minimum of BCE."""
    x = x.clamp(0.0, 1.0)
    return -(torch.xlogy(x, x) + torch.xlogy(1 - x, 1 - x))


def bernoulli_entropy(x: torch.Tensor) -> torch.Tensor:
    """sum_k H(x_k) per row (see :func:`_entropies`)."""
    return _entropies(x).sum(1)


def code_width(module) -> int:
    """The width of ``module.encode``'s codes: a VAE's latent size (its posterior means), an
    autoencoder's ``hidden_features``."""
    return module.latent if isinstance(module, VAE) else module.hidden_features


def _activations(module) -> list[str]:
    """The activation of every layer in ``module``, in order: what a fitted model's weights
    were trained through."""
    return [
        m.activation for m in module.modules() if isinstance(getattr(m, "activation", None), str)
    ]


def _encode(module, x):
    return module.encode(x)


def _decode(module, h):
    return module.decode(h)


def _feature_errors(module, x: torch.Tensor, bce: bool) -> torch.Tensor:
    """Per-element reconstruction loss of x (B, d) from the posterior mean or code: BCE above
    its minimum, KL(x || x^) = BCE - H(x), from the logits; else the squared error."""
    z = module.decode(module.encode(x), logits=True)
    if not bce:
        return (z - x).square()
    return reference.bce_with_logits(z, x) - _entropies(x)


def _as_dtype(array: np.ndarray, like: torch.Tensor) -> np.ndarray:
    return array.astype(np.float32 if like.dtype == torch.float32 else np.float64, copy=False)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """torch's generators that a run on ``device`` draws from (the CPU's, and ``device``'s
    where it is a CUDA device) forked and seeded with ``seed``: runs repeat, the caller's
    generator states are left as they were, and a run on the CPU does not start CUDA (in a
    process forked from one that did, it could not); other threads' seeded fits wait
    (``SEEDED_RUNS``, as ``fit``'s with a seed), their other torch draws do not (they share
    the generators)."""
    devices = [cuda_index(device)] if device.type == "cuda" else []
    with SEEDED_RUNS, torch.random.fork_rng(devices=devices):
        seed_torch(seed, device)
        yield


def all_or_nothing(fit_method):
    """``fit_method`` made atomic: if it raises (a bad X or y, a diverging loss, Ctrl-C), the
    estimator's attributes are put back as they were, so a fitted estimator keeps predicting
    as before and an unfitted one stays unfitted. The fitted objects are replaced, never
    changed in place, by fitting; the random streams that are drawn in place (a RandomState
    given as ``random_state``, partial_fit's seeds) are wound back. It trains whatever the
    caller's grad mode: inside ``torch.no_grad()`` or ``torch.inference_mode()`` too."""

    @functools.wraps(fit_method)
    def atomic(self, *args, **kwargs):
        before = dict(vars(self))
        streams = [
            (value, value.get_state())
            for value in before.values()
            if isinstance(value, np.random.RandomState)
        ]
        try:
            with recording_autograd():
                return fit_method(self, *args, **kwargs)
        except BaseException:
            vars(self).clear()
            vars(self).update(before)
            for stream, state in streams:
                stream.set_state(state)
            raise

    return atomic


def _graphs_possible(device: torch.device) -> bool:
    """Whether training on ``device`` can replay CUDA graphs."""
    return device.type == "cuda"


class ScaledRows:
    """Validated rows of X scaled (``clip``: see ``_scale``) and made tensors in X's
    precision chunk by chunk, as :meth:`~AutoencoderEstimatorMixin._map_chunks` slices
    them: predicting on a large X holds one chunk's copies at a time, on the host and on the
    device, not the whole X's."""

    def __init__(self, estimator, X: np.ndarray, clip: bool = True):
        self.estimator, self.rows, self.clip = estimator, X, clip
        self.shape, self.dtype = X.shape, _TORCH_DTYPES[X.dtype]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        scaled = self.estimator._scale(self.rows[rows], clip=self.clip)
        return self.estimator._tensor(scaled, self.dtype)


def _chunked(fn, X: np.ndarray) -> np.ndarray:
    """``fn`` over row chunks of X, concatenated."""
    return np.concatenate([fn(X[i : i + PREDICT_CHUNK]) for i in range(0, len(X), PREDICT_CHUNK)])


class AutoencoderEstimatorMixin:
    """Shared machinery: parameter checks, scaling, device, seeding, training and pickling.

    Subclasses set ``self.module_`` (an ``nn.Module`` with ``encode(x)`` and a forward that
    returns an object with ``loss``, ``code`` and ``per_sample``).
    """

    weight_decay = 0.0  # the default of an estimator pickled before it was a parameter

    # -- parameters --------------------------------------------------------------------------

    def _check_common_params(self) -> torch.device:
        """Check the parameters every estimator shares; returns the device to train on."""
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.loss not in ESTIMATOR_LOSSES:
            raise ValueError(f"loss must be one of {ESTIMATOR_LOSSES}, got {self.loss!r}")
        activation = self._activation()
        check_noise(self.noise)
        if self.sparsity is not None and not isinstance(self.sparsity, (KLSparsity, L1Sparsity)):
            raise TypeError(
                "sparsity must be None, fastae.KLSparsity or fastae.L1Sparsity, got "
                f"{type(self.sparsity).__name__}"
            )
        if isinstance(self.sparsity, KLSparsity) and activation != "sigmoid":
            raise ValueError(f"sparsity KLSparsity needs activation 'sigmoid', got {activation!r}")
        _checks.flag("tied", self.tied)
        _checks.finite_number("contractive", self.contractive, low=0, float32=True)
        _checks.positive_int("batch_size", self.batch_size)
        _checks.verbosity("verbose", self.verbose)
        self._learning_rate()
        self._weight_decay()
        device = resolve_device(self.device)
        if _checks.flag("cuda_graph", self.cuda_graph) and not _graphs_possible(device):
            raise ValueError(
                f"cuda_graph=True needs a CUDA device, got device={self.device!r} ({device})"
            )
        return device

    def _activation(self) -> str:
        """The hidden activation to build with (checked)."""
        if self.activation not in reference.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {reference.ACTIVATIONS}, got {self.activation!r}"
            )
        return self.activation

    def _early_stopping(self) -> dict:
        """The early-stopping parameters, checked (all of them, whether or not
        ``early_stopping`` is set): ``{}`` without early stopping."""
        on = _checks.flag("early_stopping", self.early_stopping)
        fraction = _checks.finite_number(
            "validation_fraction", self.validation_fraction, low=0, high=1, open_low=True
        )
        patience = _checks.positive_int("n_iter_no_change", self.n_iter_no_change)
        tol = _checks.finite_number("tol", self.tol, low=0)
        return {"fraction": fraction, "patience": patience, "tol": tol} if on else {}

    def _learning_rate(self) -> float:
        return _positive_float("lr", self.lr)

    def _weight_decay(self) -> float:
        return _checks.finite_number("weight_decay", self.weight_decay, low=0, float32=True)

    def _draw_seed(self) -> int:
        return int(random_state_generator(self.random_state).randint(_SEED_BOUND))

    # -- data --------------------------------------------------------------------------------

    def _fit_scaling(self, X: np.ndarray) -> np.ndarray:
        """Fit the scaler, resolve ``loss_`` and return the scaled training data."""
        if self.scale == "standard":
            with _quiet_overflow():  # checked here, with a message that names X
                # numpy out, whatever sklearn.set_config(transform_output=...) asks of the
                # estimators' outputs (which follow it)
                self.scaler_ = StandardScaler().set_output(transform="default").fit(X)
            if not np.isfinite(self.scaler_.var_).all():
                raise ValueError(
                    "X's column variances overflow float64 (values up to "
                    f"{np.abs(X).max():.4g}): divide X by a constant before fitting"
                )
        elif self.scale == "minmax":
            with _quiet_overflow():  # in float64, as X is scaled (a float32 column's range
                # below 10 float32 epsilons would be taken for a constant)
                self.scaler_ = MinMaxScaler(clip=True).set_output(transform="default")
                self.scaler_.fit(np.asarray(X, dtype=np.float64))
            self._check_minmax_ranges(X)
        else:
            self.scaler_ = None
        scaled = self._scale(X)
        # standardized data lies in [0, 1] only by accident (one row, constant columns)
        in_unit = bool(scaled.min() >= 0.0 and scaled.max() <= 1.0)
        if self.loss == "auto":
            self.loss_ = "bce" if in_unit and self.scale != "standard" else "mse"
        else:
            self.loss_ = self.loss
        self._check_bce_range(scaled)
        self.output_ = "sigmoid" if self.loss_ == "bce" else "identity"
        return scaled

    def _check_minmax_ranges(self, X: np.ndarray) -> None:
        """MinMaxScaler (fitted in float64) maps a column whose range overflows to zeros, and
        one whose range is below 10 epsilons (an absolute bound) to its offset alone: both
        would drop the column's values. A range that small next to X's largest magnitude is
        rounding noise about a constant and stays dropped."""
        data_range = self.scaler_.data_range_
        if not np.isfinite(data_range).all():
            raise ValueError(
                "X's column ranges overflow float64 (values up to "
                f"{np.abs(X).max():.4g}): divide X by a constant before fitting"
            )
        eps = np.finfo(np.float64).eps
        magnitude = np.abs(X).max()
        lost = (data_range > 0) & (data_range < 10 * eps) & (data_range > 10 * eps * magnitude)
        if lost.any():
            column = int(np.flatnonzero(lost)[0])
            raise ValueError(
                f"X's column {column} spans only {data_range[column]:.4g}, which "
                "scale='minmax' treats as constant (a range below 10 * float64's epsilon): "
                "multiply X by a constant before fitting, or use scale='standard'"
            )

    def _check_bce_range(self, scaled: np.ndarray) -> None:
        if self.loss_ == "bce" and not (scaled.min() >= 0.0 and scaled.max() <= 1.0):
            raise ValueError(
                "loss='bce' needs inputs in [0, 1] after scaling; use scale='minmax' or "
                f"loss='mse' (scaled inputs span [{scaled.min():.4g}, {scaled.max():.4g}])"
            )

    def _rescaled(self, X: np.ndarray, caller: str) -> np.ndarray:
        """X scaled by the fitted ``scaler_`` for training on (``caller``: warm_start or
        partial_fit), which keep the scaler and ``loss_`` of the first fit."""
        fitted = {StandardScaler: "standard", MinMaxScaler: "minmax"}.get(type(self.scaler_))
        if self.scale != fitted:
            raise ValueError(
                f"{caller} keeps the fitted scaler_ (scale={fitted!r}), so scale must stay "
                f"{fitted!r}, got scale={self.scale!r}; refit from scratch to change it"
            )
        if self.loss not in ("auto", self.loss_):
            raise ValueError(
                f"{caller} keeps the fitted loss_ {self.loss_!r}, so loss must be 'auto' or "
                f"{self.loss_!r}, got loss={self.loss!r}; refit from scratch to change it"
            )
        if isinstance(self.scaler_, MinMaxScaler):
            unclipped = self._scale(X, clip=False)
            outside = float(np.mean((unclipped < 0.0) | (unclipped > 1.0)))
            if outside > 0.5:  # a drifted stream: most of it trains as the range's bounds
                _checks.warn_caller(
                    f"{caller}: {outside:.0%} of X's values lie outside the range scaler_ was "
                    "fitted to (scale='minmax', by the first fit) and train clipped to its "
                    "bounds, where the model cannot tell them apart; refit on representative "
                    "rows, or pass scale=None and data you scale yourself"
                )
        scaled = self._scale(X)
        self._check_bce_range(scaled)
        return scaled

    def _scale(self, X: np.ndarray, clip: bool = True) -> np.ndarray:
        """X scaled as the training data (float64); ``scale="minmax"`` clips to [0, 1] unless
        ``clip=False``."""
        X = np.asarray(X, dtype=np.float64)
        if self.scaler_ is None:
            return X
        with _quiet_overflow():  # _tensor names values scaled beyond range
            if not clip and isinstance(self.scaler_, MinMaxScaler):
                return X * self.scaler_.scale_ + self.scaler_.min_
            return self.scaler_.transform(X)

    def _unscale(self, X: np.ndarray) -> np.ndarray:
        return X if self.scaler_ is None else self.scaler_.inverse_transform(X)

    def _tensor(
        self, scaled: np.ndarray, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        """Tensor on ``device`` (default ``device_``; float32 for training); BCE targets are
        clipped to [0, 1]."""
        if self.loss_ == "bce":
            scaled = np.clip(scaled, 0.0, 1.0)
        # finite X (check_array) overflows here only by scaling: to inf in float64, beyond
        # float32's range where it trains or predicts in float32
        largest = np.abs(scaled).max(initial=0.0)
        if not largest <= torch.finfo(dtype).max:
            advice = (
                "use scale='standard' or 'minmax'"
                if self.scaler_ is None
                else "X lies far beyond the range of the data the scaler was fitted to"
            )
            raise ValueError(
                f"X has values beyond {str(dtype).removeprefix('torch.')}'s range after scaling "
                f"(largest magnitude {largest:.4g}); {advice}"
            )
        return torch.tensor(scaled, dtype=dtype, device=self.device_ if device is None else device)

    def _check_X(self, X, reset: bool) -> np.ndarray:
        return _validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])

    def _validated(self, X) -> np.ndarray:
        """X checked against the fitted estimator (float64 or float32), module on device_."""
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        self._sync_device()
        return X

    def _prepared(self, X) -> ScaledRows:
        """Validated X for prediction, scaled and made tensors chunk by chunk in X's precision
        (float64/float32)."""
        return ScaledRows(self, self._validated(X))

    # -- modules -----------------------------------------------------------------------------

    def _layer(self, in_features: int, hidden: int, loss: str) -> Autoencoder:
        return Autoencoder(
            in_features,
            hidden,
            activation=self._activation(),
            output="sigmoid" if loss == "bce" else "identity",
            loss=loss,
            tied=self.tied,
            noise=self.noise,
            sparsity=self.sparsity,
            contractive=self.contractive,
            check_targets=False,  # BCE inputs are clipped to [0, 1] by _tensor
            **_MADE,
        )

    def _train(
        self, module, data: torch.Tensor, epochs: int, seed: int, early=None, rows=None, **kwargs
    ) -> History:
        """:func:`fastae.fit` with this estimator's batch size, learning rate (that of the
        default Adam, where ``kwargs`` pass no optimizer), progress and ``cuda_graph``; with
        ``early`` (:meth:`_early_stopping`'s parameters) on the training rows of ``rows``
        (default: :func:`hold_out`'s, drawn with ``seed``), stopping on the loss of the
        held-out ones."""
        if early:
            train, held = rows or hold_out(data.shape[0], early["fraction"], seed)
            data, validation = data[train.to(data.device)], data[held.to(data.device)]
            kwargs |= {
                "validation_data": validation,
                "patience": early["patience"],
                "min_delta": early["tol"],
            }
        batch_size = min(int(self.batch_size), data.shape[0])
        # a caller may override either
        progress = _checks.verbosity("verbose", self.verbose)
        kwargs = {"progress": progress, "cuda_graph": bool(self.cuda_graph)} | kwargs
        if "optimizer" not in kwargs:
            kwargs |= {"lr": self._learning_rate(), "weight_decay": self._weight_decay()}
        try:
            history = fit(module, data, epochs=epochs, batch_size=batch_size, seed=seed, **kwargs)
        except LossNotFinite as error:
            raise ValueError(f"training diverged: {error.what()}; {self._advice()}") from error
        module.zero_grad(set_to_none=True)  # a fitted estimator keeps no gradient buffers
        return history

    def _advice(self) -> str:
        """What to change where training diverged."""
        return "lower lr" if self.scale else "scale X (scale='standard' or 'minmax')"

    def _record(self, history: History, early: dict, more: bool = False) -> None:
        """The fitted attributes that describe training; ``more``: the run continued the
        fitted model, so ``loss_curve_``, ``n_iter_`` and ``train_seconds_`` add to theirs
        (the validation attributes describe the last run's held-out rows alone)."""
        self.loss_curve_ = (self.loss_curve_ if more else []) + list(history.loss)
        self.n_iter_ = len(self.loss_curve_)
        self.train_seconds_ = (self.train_seconds_ if more else 0.0) + history.seconds
        self.validation_loss_curve_ = list(history.val_loss) if early else None
        self.best_validation_loss_ = history.val_loss[history.best_epoch] if early else None

    def _continue_from(self, layer, caller: str, keep: str = _SHAPE_PARAMETERS) -> None:
        """Copy the fitted ``module_``'s weights into ``layer``, which the parameters now
        build: it must have the same parameters, of the same shapes, and the same
        activations (``keep`` names the parameters that set them)."""
        fitted = {name: tuple(p.shape) for name, p in self.module_.state_dict().items()}
        now = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
        same = type(layer) is type(self.module_) and fitted == now
        if not same or _activations(layer) != _activations(self.module_):
            raise ValueError(
                f"{caller} trains on from the fitted {type(self.module_).__name__}"
                f"({self.module_.extra_repr()}), but the parameters now give "
                f"{type(layer).__name__}({layer.extra_repr()}): keep {keep} or refit from "
                "scratch"
            )
        layer.load_state_dict(self.module_.state_dict())

    @torch.no_grad()
    def _map_chunks(self, fn, x: torch.Tensor | ScaledRows, module=None) -> np.ndarray:
        """``fn(module, chunk)`` over row chunks of ``x`` in eval mode, as float64 numpy.

        ``module`` (default ``module_``) runs in x's dtype: float64 inputs get a float64 copy
        (on the reference backend), so predictions for float64 data are reproducible to
        float64 precision whatever the batch composition; float32 inputs use the trained
        float32 module as is.
        """
        module = self.module_ if module is None else module
        context = contextlib.nullcontext()
        if x.dtype != next(module.parameters()).dtype:
            module = copy.deepcopy(module).to(x.dtype)
            context = use_backend("reference")
        was_training = module.training
        module.eval()
        try:
            with context:
                parts = [
                    fn(module, x[i : i + PREDICT_CHUNK])
                    for i in range(0, x.shape[0], PREDICT_CHUNK)
                ]
        finally:
            module.train(was_training)
        return torch.cat(parts).double().cpu().numpy()

    def _anomaly_scores(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score of validated X: the reconstruction error of X scaled without
        clipping (a row beyond the training range scores as far as it lies); for BCE, of X
        clipped to [0, 1] plus the squared excess beyond [0, 1]."""
        scores = self._reconstruction_error(ScaledRows(self, X, clip=False))
        if self.loss_ == "bce":  # _tensor clipped the targets to [0, 1]
            scores = scores + _chunked(lambda rows: self._excess(rows).sum(1), X)
        return scores

    def _excess(self, X: np.ndarray) -> np.ndarray:
        """The square of each scaled value's distance beyond [0, 1] (the BCE score's term)."""
        scaled = self._scale(X, clip=False)
        with np.errstate(over="ignore"):  # a distance beyond 1e154 scores inf, as it does
            return np.square(scaled - np.clip(scaled, 0.0, 1.0))  # under scale="standard"

    def _reconstruction_error(self, x: torch.Tensor | ScaledRows) -> np.ndarray:
        """Per-sample loss above its minimum: squared error, or for BCE the KL divergence
        sum_k KL(x_k || x^_k) = BCE - sum_k H(x_k), so a perfect reconstruction scores 0."""
        if self.loss_ != "bce":
            return self._map_chunks(lambda module, chunk: module(chunk).per_sample, x)
        return self._map_chunks(
            lambda module, chunk: module(chunk).per_sample - bernoulli_entropy(chunk), x
        )

    def _sync_device(self) -> None:
        """Keep module and ``device_`` together (an unpickled estimator may lack CUDA)."""
        self.device_ = usable_device(self.device_)
        self.module_.to(self.device_)

    # -- pickling ----------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__())
        module = state.get("module_")
        if module is not None and any(p.device.type != "cpu" for p in module.parameters()):
            state["module_"] = copy.deepcopy(module).cpu()
        adam = state.get("_optimizer_state")
        if adam is not None:
            moments = {i: {k: v.cpu() for k, v in s.items()} for i, s in adam["state"].items()}
            state["_optimizer_state"] = {"state": moments, "param_groups": adam["param_groups"]}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if getattr(self, "module_", None) is not None and hasattr(self, "device_"):
            self._sync_device()


def hold_out(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of n rows as int64 index tensors: round(fraction * n)
    rows, at least one, drawn at random (a permutation seeded with ``seed``) are held out."""
    held = max(1, round(fraction * n))
    if held >= n:
        raise ValueError(
            f"early_stopping holds out {held} of X's {n} sample{'s' * (n != 1)} "
            f"(validation_fraction={fraction}), leaving none to train on"
        )
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return order[held:], order[:held]


def usable_device(device: torch.device) -> torch.device:
    """``device``, or where this machine lacks it (an estimator fitted on ``cuda:1`` and
    unpickled elsewhere) its current GPU, or the CPU without CUDA."""
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _expected_outliers(rows: int, contamination: float) -> int:
    """floor(rows * contamination) in exact arithmetic on the share as written (float64 makes
    100 * 0.29 28.999...)."""
    return math.floor(rows * fractions.Fraction(repr(float(contamination))))


def neg_reconstruction_error(estimator, X, y=None) -> float:
    """A scorer (``scoring=`` of GridSearchCV, cross_val_score) that compares fits whatever
    their scaling, loss or model: minus the mean over rows of the squared error of
    ``inverse_transform(transform(X))`` summed over features, in X's own units. Takes any
    fitted transformer with an inverse: fastae's, PCA, a Pipeline of such steps. (The
    transformers' own ``score`` is in their scaled space and ``loss_`` units: it compares
    fits that share ``scale``, ``loss`` and ``model``.) The codes pass between the two as
    arrays, whatever ``sklearn.set_config(transform_output=...)`` asks of transformers."""
    if not (hasattr(estimator, "transform") and hasattr(estimator, "inverse_transform")):
        raise TypeError(
            "neg_reconstruction_error scores a transformer with transform and "
            f"inverse_transform, got {type(estimator).__name__}"
        )
    with sklearn.config_context(transform_output="default"):
        reconstruction = estimator.inverse_transform(estimator.transform(X))
    truth = check_array(host_array("X", X), dtype=np.float64, input_name="X")
    error = np.square(truth - np.asarray(reconstruction, dtype=np.float64)).sum(axis=1)
    return -float(error.mean())


class CodeTransformerMixin(TransformerMixin):
    """``transform`` (the codes), ``inverse_transform`` (codes decoded, the scaling undone),
    ``score_samples`` (minus the per-sample reconstruction error, in the scaled space and
    ``loss_`` units; across scalings and losses :func:`neg_reconstruction_error` compares
    fits) and ``score`` (its mean) of an estimator whose ``module_`` encodes to
    ``code_width(module_)`` codes; ``_code_size`` names the parameter that sets their size."""

    _code_size = "n_components"

    def transform(self, X):
        """The codes of X's rows (n_samples, code width), in X's precision."""
        x = self._prepared(X)
        return _as_dtype(self._map_chunks(_encode, x), x)

    def inverse_transform(self, X):
        """Codes decoded to rows in X's original units (the scaling undone)."""
        check_is_fitted(self)
        codes = check_array(host_array("X", X), dtype=[np.float64, np.float32], input_name="X")
        width = code_width(self.module_)
        if codes.shape[1] != width:
            raise ValueError(
                f"X has {codes.shape[1]} features, but inverse_transform expects "
                f"{width} ({self._code_size})"
            )
        self._sync_device()
        h = torch.tensor(codes, dtype=_TORCH_DTYPES[codes.dtype], device=self.device_)
        recon = self._map_chunks(_decode, h)
        return _as_dtype(self._unscale(recon), h)

    def score_samples(self, X):
        """Minus the reconstruction error of each row, scaled as the outlier detector scores
        it (a row beyond the minmax training range is not clipped to it)."""
        return -self._anomaly_scores(self._validated(X))

    def score(self, X, y=None):
        """Mean of :meth:`score_samples` (higher is better)."""
        return float(np.mean(self.score_samples(X)))


class DeepLayerMixin:
    """``hidden_layer_sizes``: a non-empty one makes ``_layer`` a
    :class:`fastae.DeepAutoencoder` (``n_components`` its code size)."""

    def _hidden_layer_sizes(self) -> tuple[int, ...]:
        """The checked ``hidden_layer_sizes`` (those of the layers before the code); an int is
        one layer, as scikit-learn's MLP takes it."""
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, (bool, np.bool_)):
            sizes = (sizes,)
        sizes = _checks.widths("hidden_layer_sizes", sizes, empty=True, one=True)
        if sizes and self.contractive != 0:
            raise ValueError(
                "contractive needs hidden_layer_sizes=(): the exact penalty is one layer's "
                f"Jacobian, and hidden_layer_sizes={sizes} makes the encoder deeper"
            )
        return sizes

    def _layer(self, in_features: int, hidden: int, loss: str):
        sizes = self._hidden_layer_sizes()
        if not sizes:
            return super()._layer(in_features, hidden, loss)
        return DeepAutoencoder(
            in_features, (*sizes, hidden), activation=self._activation(),
            output="sigmoid" if loss == "bce" else "identity", loss=loss, tied=self.tied,
            noise=self.noise, sparsity=self.sparsity, check_targets=False, **_MADE,
        )  # fmt: skip


class ModelChoiceMixin:
    """``model``: "autoencoder" (``_layer`` as the classes after this one build it) or "vae"
    (a :class:`fastae.VAE` with ``hidden`` and ``beta``, its codes the posterior means);
    ``activation="auto"`` picks each one's default."""

    def _check_model(self) -> None:
        """``model`` and, for a VAE, ``hidden`` and ``beta``, and no autoencoder-only
        regularizer beside a VAE, nor a VAE-only setting beside an autoencoder."""
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "autoencoder":
            defaults = {"hidden": VAE_HIDDEN, "beta": 1.0}
            for name, default in defaults.items():
                value = getattr(self, name)
                is_default = (
                    isinstance(value, numbers.Real)
                    and not isinstance(value, (bool, np.bool_))
                    and value == default
                )
                if not is_default:
                    raise ValueError(
                        f"{name} applies to model='vae', not model='autoencoder' (got "
                        f"{name}={value!r}; its default is {default!r})"
                    )
            return
        hidden_widths(self.hidden)
        _checks.finite_number("beta", self.beta, low=0, float32=True)
        given = {
            "noise": self.noise is not None,
            "sparsity": self.sparsity is not None,
            "contractive": self.contractive != 0,
            "hidden_layer_sizes": bool(self._hidden_layer_sizes()),
        }
        for name, is_set in given.items():
            if is_set:
                raise ValueError(f"{name} applies to model='autoencoder', not model='vae'")

    def _learning_rate(self) -> float:
        """``lr="auto"``: Adam's rate for the model (a VAE's training diverges at the
        autoencoder's rate on standardized inputs)."""
        if isinstance(self.lr, str):
            if self.lr != "auto":
                raise ValueError(f'lr must be "auto" or a positive number, got {self.lr!r}')
            return VAE_LR if self.model == "vae" else AUTOENCODER_LR
        return super()._learning_rate()

    def _activation(self) -> str:
        if self.activation == "auto":
            return "relu" if self.model == "vae" else "sigmoid"
        if self.activation not in reference.ACTIVATIONS:
            options = ("auto", *reference.ACTIVATIONS)
            raise ValueError(f"activation must be one of {options}, got {self.activation!r}")
        return self.activation

    def _layer(self, in_features: int, hidden: int, loss: str):
        if self.model == "autoencoder":
            return super()._layer(in_features, hidden, loss)
        return VAE(
            in_features,
            self.hidden,
            hidden,
            activation=self._activation(),
            output="sigmoid" if loss == "bce" else "identity",
            loss=loss,
            beta=float(self.beta),
            check_targets=False,  # BCE inputs are clipped to [0, 1] by _tensor
            **_MADE,
        )

    def _vae_score(self) -> str:
        """The VAE's per-sample score: its negative ELBO."""
        return "elbo"

    def _reconstruction_error(self, x: torch.Tensor | ScaledRows) -> np.ndarray:
        """As the autoencoder's; a VAE's anomaly score (``_vae_score``) above its minimum."""
        if not isinstance(self.module_, VAE):
            return super()._reconstruction_error(x)
        kind = self._vae_score()
        if self.loss_ != "bce":
            return self._map_chunks(lambda module, chunk: module.anomaly_score(chunk, kind), x)
        return self._map_chunks(
            lambda module, chunk: module.anomaly_score(chunk, kind) - bernoulli_entropy(chunk),
            x,
        )


class _AutoencoderEstimator(
    ModelChoiceMixin, DeepLayerMixin, AutoencoderEstimatorMixin, BaseEstimator
):
    """One :class:`fastae.Autoencoder` (or, with ``hidden_layer_sizes``, a
    :class:`fastae.DeepAutoencoder`; with ``model="vae"``, a :class:`fastae.VAE`) trained on
    scaled inputs."""

    def __init__(
        self,
        n_components: int = 32,
        *,
        model: str = "autoencoder",
        hidden: int | Sequence[int] = VAE_HIDDEN,
        beta: float = 1.0,
        activation: str = "auto",
        scale: str | None = "standard",
        loss: str = "auto",
        tied: bool = True,
        noise=None,
        sparsity=None,
        contractive: float = 0.0,
        epochs: int = 50,
        batch_size: int = 64,
        lr: float | str = "auto",
        weight_decay: float = 0.0,
        device="auto",
        random_state=None,
        verbose: bool = False,
        cuda_graph: bool = False,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        hidden_layer_sizes=(),
        warm_start: bool = False,
    ):
        self.n_components = n_components
        self.model = model
        self.hidden = hidden
        self.beta = beta
        self.activation = activation
        self.scale = scale
        self.loss = loss
        self.tied = tied
        self.noise = noise
        self.sparsity = sparsity
        self.contractive = contractive
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.cuda_graph = cuda_graph
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.hidden_layer_sizes = hidden_layer_sizes
        self.warm_start = warm_start

    def _fit_autoencoder(self, X, partial: bool = False) -> np.ndarray:
        """Validate, scale, build and train ``module_``; returns the validated X. Under
        ``warm_start`` (or ``partial``: one epoch, Adam's state kept between calls) a fitted
        estimator trains on from its weights, with its scaler and loss."""
        self._check_model()
        device = self._check_common_params()
        n_components = _checks.positive_int("n_components", self.n_components)
        epochs = _checks.positive_int("epochs", self.epochs)
        early = self._early_stopping()
        if partial:  # early stopping serves fit alone
            early = {}
        warm_start = _checks.flag("warm_start", self.warm_start)
        self._hidden_layer_sizes()
        more = hasattr(self, "module_") and (partial or warm_start)
        X = self._check_X(X, reset=not more)
        if more:
            scaled = self._rescaled(X, "partial_fit" if partial else "warm_start=True")
        else:
            scaled = self._fit_scaling(X)
        data = self._tensor(scaled, device=device)
        seed = self._partial_seed() if partial else self._draw_seed()
        with _seeded(seed, device):
            layer = self._layer(X.shape[1], n_components, self.loss_)
            layer = layer.to(device=device, dtype=torch.float32)
            if more:
                self._continue_from(layer, "partial_fit" if partial else "warm_start=True")
            self.module_, self.device_ = layer, device
            if not partial:  # fit starts partial_fit's Adam and seeds afresh
                self._optimizer_state = None
                if not more:
                    self._partial_seeds = None
                history = self._train(layer, data, epochs, seed, early)
            else:
                optimizer = self._partial_optimizer(layer)
                history = self._train(layer, data, 1, seed, optimizer=optimizer)
                self._optimizer_state = optimizer.state_dict()
        self._record(history, early, more)
        return X

    def _partial_seed(self) -> int:
        """partial_fit's seed: the next draw of a stream seeded once from ``random_state``,
        so successive calls shuffle and corrupt differently, reproducibly."""
        if getattr(self, "_partial_seeds", None) is None:
            self._partial_seeds = np.random.RandomState(self._draw_seed())
        return int(self._partial_seeds.randint(_SEED_BOUND))

    def _partial_optimizer(self, layer) -> torch.optim.Optimizer:
        """Adam on ``layer`` with the moments of the last partial_fit (if any) and the
        settings of now: ``lr``, ``weight_decay``, and fused / capturable for the device and
        ``cuda_graph`` (which decide where the loaded step counts go)."""
        optimizer = default_optimizer(
            layer,
            self._learning_rate(),
            capturable=bool(self.cuda_graph),
            weight_decay=self._weight_decay(),
        )
        saved = getattr(self, "_optimizer_state", None)
        if saved is not None:
            settings = optimizer.state_dict()["param_groups"]
            groups = [
                {**now, "params": then["params"]}
                for now, then in zip(settings, saved["param_groups"], strict=True)
            ]
            # a copy: load_state_dict keeps tensors already on the device and dtype, and
            # Adam updates them in place (a call that then fails would change the saved ones)
            state = copy.deepcopy(saved["state"])
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        return optimizer

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class AutoencoderTransformer(
    ClassNamePrefixFeaturesOutMixin, CodeTransformerMixin, _AutoencoderEstimator
):
    """Regularized autoencoder as a scikit-learn transformer: ``transform`` gives the codes.

    A drop-in for ``PCA(n_components)`` in a ``Pipeline``: ``transform`` returns the
    ``n_components`` hidden activations, ``inverse_transform`` maps codes back to input space
    (undoing the scaling), ``score_samples`` is minus the per-sample reconstruction error
    (higher = better reconstructed, like PCA's log-likelihood) and ``score`` its mean.

    Parameters:
        n_components: hidden units H (the code size; with ``model="vae"``, the latent
            dimensions, whose posterior means are the codes).
        model: "autoencoder" (a :class:`fastae.Autoencoder` with the regularizers given, or a
            :class:`fastae.DeepAutoencoder` with ``hidden_layer_sizes``) or "vae" (a
            :class:`fastae.VAE`; takes no ``noise``, ``sparsity``, ``contractive`` or
            ``hidden_layer_sizes``; ``tied`` does not apply): ``transform`` gives its
            posterior means, ``inverse_transform`` decodes them, ``score_samples`` is minus
            its negative ELBO (above its minimum for BCE, as the reconstruction error).
        hidden: (model="vae") units of the VAE's encoder and decoder hidden layers: an int
            (one layer each side) or the encoder's widths, the decoder mirroring them (PyOD's
            VAE: ``(128, 64, 32)``).
        beta: (model="vae") weight of the KL term in the training objective. ``hidden`` and
            ``beta`` other than their defaults beside model="autoencoder" are an error, as
            ``noise``, ``sparsity``, ``contractive`` and ``hidden_layer_sizes`` beside a VAE:
            search over ``model`` with a list of grids, one per model.
        activation: "auto" ("sigmoid" for an autoencoder, "relu" for a VAE) or one of
            "sigmoid", "tanh", "relu", "softplus".
        scale: "standard" (StandardScaler), "minmax" (MinMaxScaler, clipped to [0, 1]) or None.
        loss: "bce" (sigmoid output; inputs must lie in [0, 1] after scaling, later inputs
            are clipped there), "mse" (identity output) or "auto": "bce" when the scaled
            training data lies in [0, 1] (minmax scaling, or unscaled data in [0, 1]), else
            "mse" (always after standard scaling). The choice is ``loss_``.
        tied: decoder weight is the encoder weight transposed (half the weights). Untied
            reconstructs closer to PCA: on standardized digits, 32 codes, 1.10x PCA's
            squared error against 1.75x tied (``bench/peers.py --parts streaming``).
        noise: a fastae GaussianNoise / MaskingNoise / SaltPepperNoise (denoising), or None;
            it corrupts the scaled inputs (after standardizing, sigma is in each feature's
            standard deviations and masking sets a feature to its mean).
        sparsity: fastae.KLSparsity (sigmoid activation) or fastae.L1Sparsity, or None.
        contractive: weight of the contractive penalty (mean squared Frobenius norm of the
            encoder Jacobian).
        epochs, batch_size, lr: Adam training through :func:`fastae.fit`; ``lr="auto"`` is
            1e-2 for an autoencoder, 3e-3 for a VAE (whose training diverges at 1e-2 on
            standardized inputs: ``bench/vae_learning_rate.py``).
        weight_decay: Adam's L2 penalty (``torch.optim.Adam``'s, on every weight and bias:
            scikit-learn's MLP ``alpha`` spares the biases; PyOD's AutoEncoder sets 1e-5);
            0 (default) for none.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        random_state: int, RandomState or None (numpy's global generator, as scikit-learn's:
            ``np.random.seed``, not ``torch.manual_seed``, repeats such fits); ``fit`` draws the
            torch seed from it (weights, shuffling and noise masks); torch's global
            generator's state is restored after.
        verbose: show a progress bar while training (a bool, or an int as scikit-learn's: above 0
            shows it).
        cuda_graph: replay each training step from a CUDA graph (:func:`fastae.fit` with
            ``cuda_graph=True``): at small batches a GPU step's host time (Python, autograd,
            launches) is most of it, and a replay has none. Needs a CUDA device.
        early_stopping: hold out ``validation_fraction`` of X's rows (round(fraction * n), at
            least one, drawn from ``random_state``), train on the others, stop once the
            validation loss has not fallen by more than ``tol`` for ``n_iter_no_change``
            epochs, and keep the weights of the best epoch (the last that lowered the
            validation loss by more than ``tol``). The validation loss is the training
            objective in eval mode: without the input corruption, regularizers included. The
            scaler is fitted on all of X. ``validation_fraction``, ``n_iter_no_change`` and
            ``tol`` serve early stopping alone; without it, training runs all ``epochs``.
        hidden_layer_sizes: widths of the encoder's layers before the code (PyOD's and
            scikit-learn's MLP's term; an int is one layer): non-empty, the model is a
            :class:`fastae.DeepAutoencoder` of sizes (*hidden_layer_sizes, n_components),
            every hidden layer taking ``activation``, the decoder mirroring the encoder (no
            ``contractive`` then); empty (the default), one :class:`fastae.Autoencoder` layer.
        warm_start: a later ``fit`` trains on from the fitted weights (``epochs`` more, with
            a fresh Adam), keeping the fitted ``scaler_`` and ``loss_`` (so ``scale`` must
            stay and ``loss`` be "auto" or ``loss_``), the weights' shapes and the
            activations they were trained through; ``loss_curve_``,
            ``n_iter_`` and ``train_seconds_`` grow across such fits. Other parameters (lr,
            noise, sparsity, ...) may change between them. Each fit draws its seed from
            ``random_state`` afresh, as scikit-learn's MLP: with an int, every such fit
            shuffles (and corrupts) as the first did; ``partial_fit`` draws anew each call.

    Attributes:
        module_ (fastae.Autoencoder, fastae.DeepAutoencoder or fastae.VAE), scaler_, loss_,
        output_, device_, n_iter_ (epochs run), loss_curve_ (per-epoch training loss),
        validation_loss_curve_ and best_validation_loss_ (with early_stopping, else None),
        train_seconds_, n_features_in_, feature_names_in_ (when X has string column names).
    """

    @all_or_nothing
    def fit(self, X, y=None):
        """Scale X, train the autoencoder on it (``epochs`` of Adam); y is ignored."""
        self._fit_autoencoder(X)
        self._n_features_out = code_width(self.module_)
        return self

    @all_or_nothing
    def partial_fit(self, X, y=None):
        """One epoch of Adam on X (in minibatches of ``batch_size``), from the fitted weights
        if any: out-of-core training, chunk by chunk, as ``IncrementalPCA.partial_fit``.
        Adam's moments carry from one call to the next (``fit`` starts afresh, with or
        without ``warm_start``). The first call (on an unfitted estimator) fits the scaler
        and resolves ``loss_`` on its X, which later calls keep: give it representative
        rows, or ``scale=None`` and data you scale yourself (a stream whose normal drifts from
        the first chunk's range; under ``scale="minmax"`` a chunk mostly outside it trains
        clipped to its bounds, and a UserWarning says so). ``n_iter_`` counts epochs. As
        for scikit-learn's MLP, ``early_stopping`` serves ``fit`` alone: partial_fit holds
        no rows out. With ``cuda_graph`` each call captures its graph afresh: worth it for
        chunks of many batches."""
        self._fit_autoencoder(X, partial=True)
        self._n_features_out = code_width(self.module_)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


class AutoencoderOutlierDetector(OutlierMixin, _AutoencoderEstimator):
    """Outlier detection by reconstruction error, with scikit-learn's conventions.

    Methods follow scikit-learn (as IsolationForest): ``score_samples`` is minus the anomaly
    score (higher = more normal); ``decision_function`` = ``score_samples - offset_``
    (negative = outlier); ``predict`` gives +1 (inlier) / -1 (outlier). ``contamination``
    (in (0, 0.5]) is the expected share of outliers in the training data and sets ``offset_``
    so that share of training samples falls below it (with ``partial_fit``, of the latest
    chunk's samples).

    The anomaly score is the per-sample reconstruction loss above its minimum: squared error,
    or for BCE the KL divergence sum_k KL(x_k || x^_k) = BCE - sum_k H(x_k) (a perfect
    reconstruction scores 0). Inputs are not clipped to the training range, so the score grows
    with values outside it: with squared error the scaled input is scored as it is; BCE scores
    the input clipped to [0, 1] and adds sum_k e_k^2, e_k the excess of scaled x_k beyond
    [0, 1]. With ``model="vae"`` a :class:`fastae.VAE` (``n_components`` latent dimensions,
    ``hidden`` units on each side) is trained instead, and the score is its negative ELBO
    (``anomaly_score="elbo"``, which the default None means for it: that reconstruction loss
    plus the posterior's KL to the prior) or its reconstruction loss alone (``"reconstruction"``),
    both decoded from the posterior mean: no random draw, so an input's score does not vary
    from call to call (beyond the rounding of the products, which may differ with the batch
    it is scored in).

    Fitted attributes with PyOD's meaning (higher = more abnormal):
        decision_scores_: anomaly score of each training sample (= -score_samples).
        labels_: 0 (inlier) / 1 (outlier) for the training data: 1 where decision_scores_
            lies above their (1 - contamination) percentile, as PyOD's.
        threshold_: halfway between the highest training score left in and the lowest
            flagged (where PyOD's is that percentile, which lies between them; = -offset_).
    and anomaly_score_: the score fitted ("elbo" or "reconstruction"), which predictions use
    until the next fit, whatever ``anomaly_score`` is set to meanwhile.
    ``predict_proba(X, method="linear")`` maps anomaly scores onto [0, 1] by them, and
    ``predict_confidence(X)`` says how sure each prediction is, as PyOD's;
    ``feature_scores(X)`` splits each score over the input features.

    Parameters beyond those of :class:`AutoencoderTransformer` (whose ``model``, ``hidden``
    and ``beta`` choose and shape a VAE here too):
        contamination: expected share of outliers, in (0, 0.5].
        anomaly_score: None (the model's own: "elbo" for a VAE, the reconstruction loss for an
            autoencoder), "elbo" (model="vae" only) or "reconstruction".

    The other attributes are those of :class:`AutoencoderTransformer`; ``module_`` is a
    :class:`fastae.VAE` with ``model="vae"``.
    """

    def __init__(
        self,
        n_components: int = 32,
        *,
        contamination: float = 0.1,
        model: str = "autoencoder",
        hidden: int | Sequence[int] = VAE_HIDDEN,
        beta: float = 1.0,
        anomaly_score: str | None = None,
        activation: str = "auto",
        scale: str | None = "standard",
        loss: str = "auto",
        tied: bool = True,
        noise=None,
        sparsity=None,
        contractive: float = 0.0,
        epochs: int = 50,
        batch_size: int = 64,
        lr: float | str = "auto",
        weight_decay: float = 0.0,
        device="auto",
        random_state=None,
        verbose: bool = False,
        cuda_graph: bool = False,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        hidden_layer_sizes=(),
        warm_start: bool = False,
    ):
        super().__init__(
            n_components,
            model=model,
            hidden=hidden,
            beta=beta,
            activation=activation,
            scale=scale,
            loss=loss,
            tied=tied,
            noise=noise,
            sparsity=sparsity,
            contractive=contractive,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            device=device,
            random_state=random_state,
            verbose=verbose,
            cuda_graph=cuda_graph,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change,
            tol=tol,
            hidden_layer_sizes=hidden_layer_sizes,
            warm_start=warm_start,
        )
        self.contamination = contamination
        self.anomaly_score = anomaly_score

    def _check_model_params(self) -> None:
        c = self.contamination
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise TypeError(
                f"contamination must be a float in (0, 0.5], got {c!r} (no 'auto': "
                "IsolationForest's sets an offset on its own score scale, which reconstruction "
                "errors lack)"
            )
        if not 0.0 < c <= 0.5:
            raise ValueError(f"contamination must be in (0, 0.5], got {c!r}")
        kind = self.anomaly_score
        if kind is not None and kind not in SCORES:
            raise ValueError(f"anomaly_score must be None or one of {SCORES}, got {kind!r}")
        if kind == "elbo" and self.model == "autoencoder":
            raise ValueError("anomaly_score='elbo' needs model='vae'")
        self.anomaly_score_ = kind or ("elbo" if self.model == "vae" else "reconstruction")

    def _vae_score(self) -> str:
        """The fitted score kind, whatever ``anomaly_score`` says now (until the next fit)."""
        return self.anomaly_score_

    @all_or_nothing
    def fit(self, X, y=None):
        """Scale X, train on it, and set ``threshold_``/``offset_`` from its rows' scores
        (``contamination``); y is ignored."""
        self._check_model_params()
        self._set_threshold(self._fit_autoencoder(X), "fit")
        return self

    @all_or_nothing
    def partial_fit(self, X, y=None):
        """One epoch of Adam on X from the fitted weights, as
        :meth:`AutoencoderTransformer.partial_fit` (Adam's moments carried between calls, the
        first call's scaler and ``loss_`` kept), then ``decision_scores_``, ``threshold_``
        (``offset_``) and ``labels_`` from X's rows, scored by the updated model: the
        threshold follows the latest chunk (the scaler stays the first chunk's: for a stream
        whose normal drifts, ``scale=None`` and chunks you scale yourself). A chunk of fewer
        than 1 / ``contamination`` rows cannot hold one outlier at that rate: its threshold is
        a tiny sample's (a UserWarning says so)."""
        self._check_model_params()
        self._set_threshold(self._fit_autoencoder(X, partial=True), "partial_fit")
        return self

    def _set_threshold(self, X: np.ndarray, caller: str | None = None) -> None:
        """PyOD's fitted attributes and ``offset_`` from the anomaly scores of validated X.
        ``labels_`` flags the scores above PyOD's threshold, the (1 - contamination) quantile;
        ``threshold_`` is set halfway between the highest score left in and the lowest flagged
        (the quantile lies between them: the labels are PyOD's), so that ``predict`` gives a
        training row its label even where its score comes out a rounding apart (another
        batching or precision); where those two scores are adjacent floats, the one left in.
        ``caller`` (fit, partial_fit) warns where X holds fewer than 1 / contamination rows."""
        if caller is not None and len(X) * self.contamination < 1:
            _checks.warn_caller(
                f"{caller} set threshold_ from X's {len(X)} row{'s' * (len(X) != 1)}, fewer "
                f"than 1 / contamination = {1 / self.contamination:.4g}: a quantile of so "
                "few scores may flag far more or fewer than that share of later rows; pass "
                f"{'larger chunks' if caller == 'partial_fit' else 'more rows'}"
            )
        scores = self.decision_scores_ = self._anomaly_scores(X)
        bad = int((~np.isfinite(scores)).sum())
        if bad:  # weights finite but large (a VAE's variance overflows): no threshold to set
            raise ValueError(
                f"training diverged: {bad} of the {len(X)} training rows score NaN or inf "
                f"after training; {self._advice()}"
            )
        c = self.contamination
        threshold = float(np.percentile(scores, 100.0 * (1.0 - c)))
        flagged = scores > threshold
        if flagged.any():  # else the top rows tie: none flagged, the quantile kept
            highest_in, lowest_flagged = scores[~flagged].max(), scores[flagged].min()
            halfway = float(highest_in + (lowest_flagged - highest_in) / 2)
            # two adjacent floats have no float between them: the one left in
            threshold = halfway if halfway < lowest_flagged else float(highest_in)
        self.threshold_ = threshold
        self.offset_ = -threshold
        self.labels_ = flagged.astype(int)
        self._expected_outliers = _expected_outliers(len(X), c)  # with its threshold

    def score_samples(self, X):
        """Minus the anomaly score: higher means more normal."""
        return -self._anomaly_scores(self._validated(X))

    def feature_scores(self, X):
        """Each feature's share of the anomaly score (n_samples, n_features_in_), higher = more
        abnormal: which inputs a sample's score comes from. For squared error (x_k - x^_k)^2
        of the scaled x; for BCE KL(x_k || x^_k) + e_k^2 (as the score: x clipped to [0, 1],
        e_k its excess beyond), from the decoder's logits. A row sums to the sample's score
        (``-score_samples``), but for a VAE scored by its negative ELBO, whose KL term belongs
        to the code, not to a feature: the row then sums to the reconstruction part alone."""
        X = self._validated(X)
        bce = self.loss_ == "bce"
        scores = self._map_chunks(
            lambda module, chunk: _feature_errors(module, chunk, bce),
            ScaledRows(self, X, clip=False),
        )
        if bce:
            scores = scores + _chunked(self._excess, X)
        return scores

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for outliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for inliers, -1 for outliers."""
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def predict_proba(self, X, method: str = "linear", return_confidence: bool = False):
        """PyOD's outlier probability: columns (inlier, outlier), each row summing to 1, the
        outlier column the anomaly score s = -score_samples(X) mapped onto [0, 1] by
        ``decision_scores_``. ``"linear"``: (s - min) / (max - min), clipped to [0, 1];
        ``"unify"``: erf((s - mean) / (std * sqrt(2))) clipped to [0, 1], the Gaussian scaling
        of Kriegel et al. (2011), with the population standard deviation. A zero spread of
        ``decision_scores_`` (max - min or std) counts as 1, as scikit-learn's scalers take it.
        ``return_confidence``: also :meth:`predict_confidence`'s values, as PyOD's."""
        if method not in PROBABILITY_METHODS:
            raise ValueError(f"method must be one of {PROBABILITY_METHODS}, got {method!r}")
        return_confidence = _checks.flag("return_confidence", return_confidence)
        scores = -self.score_samples(X)
        train = self.decision_scores_
        if method == "linear":
            low, spread = train.min(), np.ptp(train)
            outlier = (scores - low) / (spread if spread > 0 else 1.0)
        else:
            spread = train.std()
            outlier = erf((scores - train.mean()) / ((spread if spread > 0 else 1.0) * np.sqrt(2)))
        outlier = np.clip(outlier, 0.0, 1.0)
        probabilities = np.stack([1.0 - outlier, outlier], axis=1)
        if return_confidence:
            return probabilities, self._confidence(scores)
        return probabilities

    def predict_confidence(self, X):
        """PyOD's confidence in each prediction of :meth:`predict` (ExCeeD, Perini et al.,
        2020): the chance that the same detector fitted on another draw of n training rows
        predicts the same. With p = (1 + #{decision_scores_ <= s}) / (n + 2) for the anomaly
        score s, an outlier's is P(Binomial(n, p) > n - floor(n * contamination)), an
        inlier's its complement (contamination as fitted, floor exact: 29 of 100 rows at
        0.29, where PyOD's float product rounds down to 28)."""
        return self._confidence(-self.score_samples(X))

    def _confidence(self, scores: np.ndarray) -> np.ndarray:
        train = np.sort(self.decision_scores_)
        n = train.size
        p = (1.0 + np.searchsorted(train, scores, side="right")) / (n + 2.0)
        # a detector pickled before it kept the count: its contamination now
        expected = getattr(self, "_expected_outliers", None)
        if expected is None:
            expected = _expected_outliers(n, self.contamination)
        outlier = binom.sf(n - expected, n, p)
        return np.where(scores > self.threshold_, outlier, 1.0 - outlier)
