"""Applications of regularized autoencoders (the ``apps`` extra: scikit-learn).

- :class:`SemiSupervisedAutoencoder`: a softmax head on the code, trained on
  cross-entropy(y, y^) + reconstruction_weight * (autoencoder loss); samples labelled -1 are
  unlabelled and contribute only the autoencoder term (``sklearn.semi_supervised``'s
  convention).
- :class:`StackedAutoencoder`: greedy layer-wise pretraining (each layer a sparse / denoising /
  contractive autoencoder on the codes of the layer below), then the whole stack fine-tuned
  as one deep autoencoder.
- :func:`cluster_codes` (k-means on codes) and :class:`DECClustering` (k-means on codes, then
  refined with DEC's cluster-assignment loss, Xie et al. 2016).

Everything trains through :func:`fastae.fit`. Models whose loss needs more than the input
(labels, DEC targets) read them from extra columns appended to the training tensor, so the
same batching, shuffling and seeding apply.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .modules import AutoencoderOutput, StackModule
from .sklearn import (
    VAE_HIDDEN,
    AutoencoderEstimatorMixin,
    AutoencoderOutlierDetector,
    AutoencoderTransformer,
    CodeTransformerMixin,
    DeepLayerMixin,
    ModelChoiceMixin,
    ScaledRows,
    _as_dtype,
    _encode,
    _nonnegative_int,
    _positive_float,
    _seeded,
    _validate_data,
    all_or_nothing,
    code_width,
    hold_out,
    host_array,
    random_state_generator,
)
from .training import default_optimizer

try:
    from scipy.special import logsumexp
    from sklearn.base import (
        BaseEstimator,
        ClassifierMixin,
        ClassNamePrefixFeaturesOutMixin,
        ClusterMixin,
        TransformerMixin,
        clone,
    )
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score
    from sklearn.utils import check_array, check_consistent_length
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, column_or_1d
except ImportError as error:  # pragma: no cover - fastae.sklearn raises first
    raise ImportError(
        "fastae.applications needs scikit-learn: pip install 'fastae[apps]'"
    ) from error

__all__ = [
    "DECClustering",
    "SemiSupervisedAutoencoder",
    "StackedAutoencoder",
    "cluster_codes",
]

UNLABELED = -1


def _reconstruction_weight(weight) -> float:
    return _checks.finite_number("reconstruction_weight", weight, low=0, float32=True)


def _logits(module, x):
    return module.logits(x)


def _soft_assignments(module, x):
    return module.soft_assignments(x)


# ============================================================================ semi-supervised


@dataclass
class SemiSupervisedOutput:
    """loss = cross_entropy + reconstruction_weight * autoencoder.loss."""

    loss: Tensor
    cross_entropy: Tensor
    logits: Tensor
    autoencoder: AutoencoderOutput


torch.export.register_dataclass(
    SemiSupervisedOutput, serialized_type_name="fastae.SemiSupervisedOutput"
)  # a pytree node, as fastae.modules.AutoencoderOutput


class SemiSupervisedModule(nn.Module):
    """An autoencoder with a linear softmax head on its code.

    ``forward`` takes (B, d + 1): the d inputs, then the class index as a float (-1 when the
    sample is unlabelled). Cross-entropy is averaged over the labelled rows of the batch (zero
    when there are none); the autoencoder loss (reconstruction plus its penalties) over all.
    """

    def __init__(self, autoencoder: nn.Module, n_classes: int, reconstruction_weight: float):
        super().__init__()
        self.autoencoder = autoencoder
        like = next(autoencoder.parameters())
        self.head = nn.Linear(
            code_width(autoencoder), n_classes, device=like.device, dtype=like.dtype
        )
        self.reconstruction_weight = float(reconstruction_weight)

    def extra_repr(self) -> str:
        """The autoencoder's own description, the classes and the loss's weight: what names
        this module in messages (a warm start's that no longer fits)."""
        autoencoder = f"{type(self.autoencoder).__name__}({self.autoencoder.extra_repr()})"
        return (
            f"{autoencoder}, n_classes={self.head.out_features}, "
            f"reconstruction_weight={self.reconstruction_weight}"
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.autoencoder.encode(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.encode(x))

    def forward(self, batch: Tensor) -> SemiSupervisedOutput:
        d = self.autoencoder.in_features
        x = batch[:, :d].contiguous()
        y = batch[:, d].round().long()
        out = self.autoencoder(x)
        logits = self.head(out.code)
        labeled = (y >= 0).to(logits.dtype)
        per_sample = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
        cross_entropy = (per_sample * labeled).sum() / labeled.sum().clamp(min=1.0)
        loss = cross_entropy + self.reconstruction_weight * out.loss
        return SemiSupervisedOutput(loss, cross_entropy, logits, out)


def labelled_hold_out(
    classes: np.ndarray, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hold_out` stratified by ``classes`` (each row's class index, ``UNLABELED`` for
    an unlabelled row): of n rows, max(1, round(fraction * n)) are held out, shared among the
    groups in proportion to their sizes (largest remainders first), but a class keeps at
    least one row to train on (a hold-out of a class's only labels would leave the head never
    trained on it). The rows of each group are drawn at random (``seed``)."""
    rng = np.random.default_rng(seed)
    names = np.unique(classes)
    groups = [rng.permutation(np.flatnonzero(classes == name)) for name in names]
    sizes = np.array([len(group) for group in groups])
    spare = sizes - (names != UNLABELED)  # the rows a group can give
    total = min(max(1, round(fraction * len(classes))), int(spare.sum()))
    if not total:
        raise ValueError(
            f"early_stopping has none of X's {len(classes)} samples to hold out: each class "
            "has a single labelled sample and none is unlabelled (fit without it)"
        )
    shares = total * sizes / len(classes)
    counts = np.minimum(np.floor(shares).astype(int), spare)
    ties = rng.random(len(names))  # equal remainders: no group always first
    for group in np.lexsort((ties, counts - shares)):  # largest remainder first
        if counts.sum() == total:
            break
        counts[group] += counts[group] < spare[group]
    while counts.sum() < total:  # what capped groups could not take
        counts[np.argmax(spare - counts)] += 1
    held = np.concatenate([group[:k] for group, k in zip(groups, counts, strict=True)])
    train = np.concatenate([group[k:] for group, k in zip(groups, counts, strict=True)])
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(held))


class SemiSupervisedAutoencoder(
    ClassifierMixin, ModelChoiceMixin, DeepLayerMixin, AutoencoderEstimatorMixin, BaseEstimator
):
    """Classifier trained on labelled and unlabelled samples together.

    loss = cross-entropy(y, softmax(head(code))) + reconstruction_weight * autoencoder loss,
    where the autoencoder loss is the per-sample reconstruction error (summed over features,
    averaged over the batch) plus the sparsity / contractive penalties; with ``noise`` the
    code the head sees during training is that of the corrupted input. Samples with
    ``y == -1`` are unlabelled: they contribute only the autoencoder term.

    Parameters are those of :class:`fastae.sklearn.AutoencoderTransformer` (with
    ``hidden_layer_sizes`` the autoencoder is a :class:`fastae.DeepAutoencoder`; with
    ``model="vae"`` a :class:`fastae.VAE`, whose negative ELBO is the autoencoder loss and
    whose posterior mean the head reads, Kingma et al.'s M1 trained jointly) plus
    ``reconstruction_weight`` (lambda); with ``early_stopping`` the held-out rows are scored
    by that same loss: ``validation_fraction`` of the unlabelled rows and of each class's
    labelled ones, drawn at random, a class keeping at least one label to train on.
    Attributes: ``classes_`` (the labels seen, -1 excluded), ``module_`` (a
    :class:`SemiSupervisedModule`), ``n_labeled_``, ``scaler_``, ``loss_``, ``n_iter_``,
    ``loss_curve_``, ``validation_loss_curve_``, ``best_validation_loss_``. ``encode`` gives
    the codes.
    ``warm_start``: as the transformer's (a later ``fit`` trains on from the fitted weights,
    scaler and loss), with the same classes among the labelled samples.
    """

    def __init__(
        self,
        n_components: int = 32,
        *,
        reconstruction_weight: float = 0.1,
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
        self.reconstruction_weight = reconstruction_weight
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

    @all_or_nothing
    def fit(self, X, y):
        """Train on all of X's rows, the classifier on those whose y is not -1."""
        self._check_model()
        device = self._check_common_params()
        n_components = _checks.positive_int("n_components", self.n_components)
        epochs = _checks.positive_int("epochs", self.epochs)
        early = self._early_stopping()
        self._hidden_layer_sizes()
        weight = _reconstruction_weight(self.reconstruction_weight)
        more = _checks.flag("warm_start", self.warm_start) and hasattr(self, "module_")
        X, y = self._validate_xy(X, y, reset=not more)
        labeled = ~_unlabeled_mask(y)
        if not labeled.any():
            raise ValueError("y has no labelled sample: at least one label other than -1 needed")
        check_classification_targets(y[labeled])
        classes, codes = np.unique(y[labeled], return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                "y needs at least 2 classes among the labelled samples (those not labelled "
                f"-1, which marks a sample as unlabelled), got 1 class ({classes.tolist()[0]!r})"
            )
        if more and not np.array_equal(classes, self.classes_):
            raise ValueError(
                f"warm_start=True needs y's labelled samples to hold the fitted classes_ "
                f"{self.classes_.tolist()}, got {classes.tolist()}"
            )
        index = np.full(len(y), float(UNLABELED))
        index[labeled] = codes
        scaled = self._rescaled(X, "warm_start=True") if more else self._fit_scaling(X)
        labels = torch.tensor(index, dtype=torch.float32, device=device)[:, None]
        data = torch.cat([self._tensor(scaled, device=device), labels], dim=1)
        seed = self._draw_seed()
        with _seeded(seed, device):
            autoencoder = self._layer(X.shape[1], n_components, self.loss_)
            module = SemiSupervisedModule(autoencoder, len(classes), weight)
            module = module.to(device=device, dtype=torch.float32)
            if more:
                self._continue_from(module, "warm_start=True")
            self.module_, self.device_ = module, device
            self.classes_, self.n_labeled_ = classes, int(labeled.sum())
            rows = labelled_hold_out(index, early["fraction"], seed) if early else None
            history = self._train(module, data, epochs, seed, early, rows)
        self._record(history, early, more)
        return self

    def _validate_xy(self, X, y, reset: bool = True):
        if y is not None:
            _check_no_missing_labels(host_array("y", y))
        X, y = _validate_data(
            self, X, y, reset=reset, dtype=[np.float64, np.float32], y_numeric=False
        )
        return X, y

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against y's labels (scikit-learn's), y read as
        ``fit`` reads it (a torch tensor too): the samples labelled -1 are left out, so that
        a cross-validation on semi-supervised y scores its labelled samples."""
        y = column_or_1d(np.asarray(host_array("y", y)), warn=True)  # as fit reads it
        _check_no_missing_labels(y)
        labeled = ~_unlabeled_mask(y)
        if labeled.all():
            return super().score(X, y, sample_weight)
        if not labeled.any():
            raise ValueError("y has no labelled sample to score: all are -1 (unlabelled)")
        predicted = self.predict(X)
        check_consistent_length(predicted, y, sample_weight)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight)[labeled]
        return float(accuracy_score(y[labeled], predicted[labeled], sample_weight=sample_weight))

    def decision_function(self, X):
        """Logits (n_samples, n_classes), or the positive-class logit difference for 2."""
        logits = self._map_chunks(_logits, self._prepared(X))
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), columns in ``classes_`` order: the
        softmax of the logits taken in float64, so each row sums to 1 to float64's rounding
        whatever X's precision."""
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X):
        """The log of :meth:`predict_proba`, computed from the logits."""
        logits = self._map_chunks(_logits, self._prepared(X))
        return logits - logsumexp(logits, axis=1, keepdims=True)

    def predict(self, X):
        """The most probable class of each row."""
        logits = self._map_chunks(_logits, self._prepared(X))
        return self.classes_[np.argmax(logits, axis=1)]

    def encode(self, X):
        """Codes (n_samples, n_components)."""
        x = self._prepared(X)
        return _as_dtype(self._map_chunks(_encode, x), x)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def _check_no_missing_labels(y) -> None:
    """None or NaN among y's labels refused, the unlabelled marker named (where scikit-learn's
    checks would say an object y's NaN is in "Input", or call None's label type unknown)."""
    labels = np.asarray(y)
    if labels.dtype.kind == "f":
        missing = int(np.isnan(labels).sum())
    elif labels.dtype == object:
        missing = sum(_missing_label(v) for v in labels.flat)
    else:
        missing = 0
    if missing:
        raise ValueError(
            f"y holds None or NaN for {missing} samples: the unlabelled marker is the integer "
            f"{UNLABELED}, as scikit-learn's semi-supervised estimators take it (a pandas "
            f"Series with missing labels: y.astype(object).fillna({UNLABELED}))"
        )


def _missing_label(value) -> bool:
    """None, NaN (the one value unequal to itself) or pandas' NA (whose comparisons are NA,
    no bool)."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:
        return True


def _unlabeled_mask(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind in "US":
        marker = str(UNLABELED) if y.dtype.kind == "U" else str(UNLABELED).encode()
        if (y == marker).any():
            raise ValueError(
                f"y has a string dtype ({y.dtype}) and holds {marker!r}: numpy made the "
                f"unlabelled marker {UNLABELED} a string label; pass y with dtype=object "
                f"(string labels and the integer {UNLABELED} for unlabelled samples)"
            )
    if y.dtype == object:
        if any(isinstance(v, (str, bytes)) and v in ("-1", b"-1") for v in y):
            raise ValueError(
                f"y holds the string '{UNLABELED}': the unlabelled marker is the integer "
                f"{UNLABELED}; pass string labels with the integer {UNLABELED} for unlabelled "
                f"samples (a pandas Series of strings: y.astype(object).mask(y == "
                f"'{UNLABELED}', {UNLABELED}))"
            )
        return np.array(
            [isinstance(v, numbers.Real) and not isinstance(v, bool) and v == UNLABELED for v in y]
        )
    if y.dtype.kind in "iuf":
        return y == UNLABELED
    return np.zeros(len(y), dtype=bool)


# ============================================================================ stacked


class StackedAutoencoder(
    ClassNamePrefixFeaturesOutMixin, CodeTransformerMixin, AutoencoderEstimatorMixin, BaseEstimator
):
    """Stacked autoencoder: greedy layer-wise pretraining, then fine-tuning of the stack.

    Layer k (``sizes[k]`` units) is trained for ``pretrain_epochs`` as an autoencoder, with
    this estimator's ``noise`` / ``sparsity`` / ``contractive`` regularizers, on the clean codes
    of layer k-1 (layer 0 on the scaled inputs). The bottom layer uses ``loss_``; upper layers
    reconstruct codes with BCE for sigmoid units and MSE otherwise. Then the whole stack is
    fine-tuned for ``finetune_epochs`` as one deep autoencoder (:class:`StackModule`), the
    regularizers kept: the bottom layer's noise corrupts the input, and every layer's sparsity
    and contractive terms (each layer's Jacobian with respect to its own input, not the whole
    encoder's) join the loss.

    ``transform`` gives the top codes (``sizes[-1]`` columns), ``inverse_transform`` decodes
    them back to input space, ``score_samples`` is minus the stack's reconstruction error.
    The other parameters are those of :class:`fastae.sklearn.AutoencoderTransformer`, but
    ``activation`` (default "sigmoid") names one activation for every layer and ``lr``
    (default 1e-2) is a number: neither takes "auto". With
    ``early_stopping`` the same rows are held out of every layer's pretraining and of the
    fine-tuning, and each stage stops on their loss and keeps its best epoch's weights.
    Attributes: ``module_`` (:class:`StackModule`), ``pretrain_loss_`` (per layer, the
    training loss of the epoch whose weights it keeps: the last, or with ``early_stopping``
    the best), ``pretrain_validation_loss_`` (per layer, that epoch's held-out loss; None
    without early stopping), ``loss_curve_``, ``validation_loss_curve_`` and
    ``best_validation_loss_`` (fine-tuning; the last two None without early stopping or
    fine-tuning), ``scaler_``, ``loss_``, ``n_iter_`` (epochs run, all stages together).
    ``warm_start=True``: a later ``fit`` skips the pretraining and fine-tunes the fitted
    stack ``finetune_epochs`` more (a fresh Adam; ``scaler_``, ``loss_`` and
    ``pretrain_loss_`` kept, so ``scale`` must stay, ``loss`` be "auto" or ``loss_`` and
    ``sizes`` and ``tied`` unchanged; ``loss_curve_`` and ``n_iter_`` grow).
    """

    _code_size = "sizes[-1]"

    def __init__(
        self,
        sizes=(64, 32),
        *,
        activation: str = "sigmoid",
        scale: str | None = "standard",
        loss: str = "auto",
        tied: bool = True,
        noise=None,
        sparsity=None,
        contractive: float = 0.0,
        pretrain_epochs: int = 30,
        finetune_epochs: int = 30,
        batch_size: int = 64,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        device="auto",
        random_state=None,
        verbose: bool = False,
        cuda_graph: bool = False,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        warm_start: bool = False,
    ):
        self.sizes = sizes
        self.activation = activation
        self.scale = scale
        self.loss = loss
        self.tied = tied
        self.noise = noise
        self.sparsity = sparsity
        self.contractive = contractive
        self.pretrain_epochs = pretrain_epochs
        self.finetune_epochs = finetune_epochs
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
        self.warm_start = warm_start

    @all_or_nothing
    def fit(self, X, y=None):
        """Pretrain the layers greedily, each on the codes of the one below, then fine-tune
        the whole stack (``finetune_epochs``); y is ignored."""
        device = self._check_common_params()
        sizes = _checks.widths("sizes", self.sizes, empty=True)
        if not sizes:
            raise ValueError("sizes must name at least one layer")
        pretrain_epochs = _checks.positive_int("pretrain_epochs", self.pretrain_epochs)
        finetune_epochs = _nonnegative_int("finetune_epochs", self.finetune_epochs)
        early = self._early_stopping()
        if _checks.flag("warm_start", self.warm_start) and hasattr(self, "module_"):
            if not finetune_epochs:
                raise ValueError(
                    "warm_start=True fine-tunes the fitted stack: finetune_epochs must be "
                    "positive, got 0"
                )
            return self._fine_tune_more(X, sizes, finetune_epochs, early, device)
        X = self._check_X(X, reset=True)
        self.device_ = device
        scaled = self._fit_scaling(X)
        data = self._tensor(scaled)
        seed = self._draw_seed()
        # every stage holds out the same rows
        rows = hold_out(len(X), early["fraction"], seed) if early else None
        layers, self.pretrain_loss_, self.n_iter_ = [], [], 0
        self.pretrain_validation_loss_ = [] if early else None
        self.validation_loss_curve_ = self.best_validation_loss_ = None
        with _seeded(seed, device):
            codes = data
            for k, size in enumerate(sizes):
                loss = self.loss_ if k == 0 else self._upper_loss()
                layer = self._layer(codes.shape[1], size, loss)
                layer = layer.to(device=self.device_, dtype=torch.float32)
                history = self._train(layer, codes, pretrain_epochs, seed + k + 1, early, rows)
                kept = history.best_epoch if early else -1  # the epoch whose weights stay
                self.pretrain_loss_.append(history.loss[kept])
                if early:
                    self.pretrain_validation_loss_.append(history.val_loss[kept])
                self.n_iter_ += len(history.loss)
                with torch.no_grad():
                    codes = layer.encode(codes)
                layers.append(layer)
            self.module_ = StackModule(layers)
            self.loss_curve_ = []
            if finetune_epochs:
                history = self._train(self.module_, data, finetune_epochs, seed, early, rows)
                self.loss_curve_ = list(history.loss)
                self.n_iter_ += len(history.loss)
                if early:
                    self.validation_loss_curve_ = list(history.val_loss)
                    self.best_validation_loss_ = history.val_loss[history.best_epoch]
        self.module_.eval()
        self._n_features_out = sizes[-1]
        return self

    def _upper_loss(self) -> str:
        """The loss of the layers above the bottom one, which reconstruct codes."""
        return "bce" if self.activation == "sigmoid" else "mse"

    def _fine_tune_more(self, X, sizes: tuple, epochs: int, early: dict, device):
        """warm_start: the fitted stack fine-tuned ``epochs`` more on X, scaled as before."""
        X = self._check_X(X, reset=False)
        data = self._tensor(self._rescaled(X, "warm_start=True"), device=device)
        seed = self._draw_seed()
        rows = hold_out(len(X), early["fraction"], seed) if early else None
        with _seeded(seed, device):
            widths = (X.shape[1], *sizes)
            layers = [
                self._layer(widths[k], size, self.loss_ if k == 0 else self._upper_loss())
                for k, size in enumerate(sizes)
            ]
            stack = StackModule(layers).to(device=device, dtype=torch.float32)
            self._continue_from(stack, "warm_start=True", keep="sizes, tied and activation")
            self.module_, self.device_ = stack, device
            history = self._train(stack, data, epochs, seed, early, rows)
        self.loss_curve_ = self.loss_curve_ + list(history.loss)
        self.n_iter_ += len(history.loss)
        self.validation_loss_curve_ = list(history.val_loss) if early else None
        self.best_validation_loss_ = history.val_loss[history.best_epoch] if early else None
        self.module_.eval()
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


# ============================================================================ clustering


def cluster_codes(
    codes, n_clusters: int = 10, *, random_state=None, n_init: int | str = 10
) -> KMeans:
    """k-means (scikit-learn) on codes, e.g. ``cluster_codes(ae.transform(X), 10)``.

    ``random_state`` and ``n_init`` (restarts, or "auto") are ``KMeans``'s. Returns the
    fitted ``KMeans``: ``labels_``, ``cluster_centers_``, ``predict``.
    """
    n_clusters = _checks.positive_int("n_clusters", n_clusters)
    _check_n_init(n_init)
    random_state_generator(random_state)  # its checks (KMeans takes a bool for an int)
    codes = check_array(host_array("codes", codes), dtype=[np.float64, np.float32])
    return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=random_state).fit(codes)


def _check_n_init(n_init) -> None:
    if n_init != "auto" and (
        isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init < 1
    ):
        raise ValueError(f"n_init must be 'auto' or a positive int, got {n_init!r}")


def _assignment_logits(z: Tensor, centers: Tensor, alpha: float) -> Tensor:
    """log of the Student's t kernel, -((alpha + 1) / 2) log(1 + ||z_i - mu_j||^2 / alpha)."""
    # the direct differences: cdist's matrix-product form (taken above 25 rows) cancels
    # where codes lie far from the origin compared with their distances
    distance = torch.cdist(z, centers, compute_mode="donot_use_mm_for_euclid_dist").square()
    return -(alpha + 1.0) / 2.0 * torch.log1p(distance / alpha)


def soft_assignments(z: Tensor, centers: Tensor, alpha: float = 1.0) -> Tensor:
    """DEC's q_ij: Student's t kernel (1 + ||z_i - mu_j||^2 / alpha)^-((alpha + 1) / 2),
    normalised over clusters."""
    return _assignment_logits(z, centers, alpha).softmax(dim=1)


def target_distribution(q: Tensor) -> Tensor:
    """DEC's p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), f_j = sum_i q_ij."""
    weight = q.square() / q.sum(0)
    return weight / weight.sum(1, keepdim=True)


@dataclass
class DECOutput:
    loss: Tensor
    kl: Tensor
    autoencoder: AutoencoderOutput | None = None


torch.export.register_dataclass(DECOutput, serialized_type_name="fastae.DECOutput")


class DECModule(nn.Module):
    """Encoder plus cluster centres trained on KL(P || Q) (+ reconstruction_weight * AE loss).

    ``forward`` takes (B, d + K): the inputs, then the target distribution P of each row. With
    the reconstruction term, Q comes from the code the autoencoder's step computes (one
    encoder pass fewer), unless noise corrupts the step's input in training: then from a pass
    over clean x. The KL comes from log Q (``log_softmax``, no clamp: two ops).
    """

    def __init__(
        self, autoencoder: nn.Module, centers: Tensor, alpha: float, reconstruction_weight: float
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.centers = nn.Parameter(centers.clone())
        self.alpha = float(alpha)
        self.reconstruction_weight = float(reconstruction_weight)

    def soft_assignments(self, x: Tensor) -> Tensor:
        return soft_assignments(self.autoencoder.encode(x), self.centers, self.alpha)

    def forward(self, batch: Tensor) -> DECOutput:
        d = batch.shape[1] - self.centers.shape[0]
        x, p = batch[:, :d].contiguous(), batch[:, d:]
        out = self.autoencoder(x) if self.reconstruction_weight else None
        # the autoencoder's step computes the code too: of x itself, unless noise corrupts x
        corrupted = self.training and getattr(self.autoencoder, "noise", None) is not None
        code = self.autoencoder.encode(x) if out is None or corrupted else out.code
        # KL(P || Q) = (1/B) sum_ij p_ij (log p_ij - log q_ij), log q from log_softmax (no
        # clamp), p_ij log p_ij = 0 where p_ij = 0
        log_q = _assignment_logits(code, self.centers, self.alpha).log_softmax(dim=1)
        kl = F.kl_div(log_q, p, reduction="batchmean")
        if out is None:
            return DECOutput(kl, kl)
        return DECOutput(kl + self.reconstruction_weight * out.loss, kl, out)


# the estimators DECClustering can train (fit(X) alone) and encode through module_.encode
UNSUPERVISED = (AutoencoderTransformer, StackedAutoencoder, AutoencoderOutlierDetector)


class DECClustering(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """Clustering on autoencoder codes: k-means, optionally refined DEC-style.

    ``fit`` trains a clone of ``autoencoder`` (default ``AutoencoderTransformer()``; an
    unsupervised fastae estimator: :class:`fastae.AutoencoderTransformer`,
    :class:`StackedAutoencoder` or :class:`fastae.AutoencoderOutlierDetector`, whose VAE codes
    are its posterior means), runs k-means on the codes of its ``module_.encode`` (on the
    estimator's own scaling), and then, for ``refine_epochs`` > 0, fine-tunes encoder and
    centres on DEC's loss KL(P || Q) (Xie et al. 2016), with soft assignments Q from a
    Student's t kernel (``alpha``) and the sharpened target P recomputed every
    ``update_interval`` epochs.
    ``reconstruction_weight`` > 0 keeps the autoencoder loss in the objective (IDEC, Guo et al.
    2017) as KL + w * (the autoencoder's loss: summed over features, mean over rows); IDEC's
    code minimizes MSE + gamma KL with the squared error averaged over features too, so w is not
    its gamma (w = 1 / (gamma d) matches it for squared error over d features). Training stops
    early when fewer than ``tol`` (in [0, 1]) of the labels change between target updates.
    ``lr``: Adam's learning rate in the refinement (which decays no weight: the autoencoder's
    ``weight_decay`` is its pretraining's alone); ``n_init``: k-means restarts (or "auto");
    ``random_state`` seeds k-means, the refinement and the autoencoder clone when its own
    ``random_state`` is None. ``verbose`` shows the refinement's progress. Refinement trains as
    the autoencoder was trained: with its ``cuda_graph=True``, each step is replayed from a
    CUDA graph (captured anew after each target update). The refinement sharpens the clusters
    k-means found; it need not find better ones (on the 8x8 digits' contractive codes it leaves
    NMI where k-means put it, on a plain autoencoder's it loses up to 0.03, and it warns where
    it empties a cluster): compare ``kmeans_labels_`` with ``labels_``, or fit with
    ``refine_epochs=0``.

    Attributes: ``labels_``, ``kmeans_labels_`` (before refinement), ``cluster_centers_`` (in
    code space), ``alpha_`` (the kernel's alpha fitted with, which ``predict`` uses whatever
    ``alpha`` is set to after), ``autoencoder_`` (the fitted, refined clone; a detector's
    threshold and scores are the refined model's), ``n_iter_`` (refinement epochs run).
    ``predict`` gives new rows' clusters, ``predict_proba`` the soft assignments Q,
    ``transform`` the distances from the codes to the centres (as ``KMeans.transform``); the
    codes themselves, a transformer's or a stack's ``autoencoder_.transform``.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        autoencoder=None,
        refine_epochs: int = 20,
        update_interval: int = 1,
        alpha: float = 1.0,
        reconstruction_weight: float = 0.1,
        tol: float = 1e-3,
        lr: float = 1e-3,
        n_init: int | str = 10,
        random_state=None,
        verbose: bool = False,
    ):
        self.n_clusters = n_clusters
        self.autoencoder = autoencoder
        self.refine_epochs = refine_epochs
        self.update_interval = update_interval
        self.alpha = alpha
        self.reconstruction_weight = reconstruction_weight
        self.tol = tol
        self.lr = lr
        self.n_init = n_init
        self.random_state = random_state
        self.verbose = verbose

    @all_or_nothing
    def fit(self, X, y=None):
        """Train a clone of ``autoencoder``, run k-means on its codes, then refine by DEC
        (``refine_epochs``); sets ``labels_``; y is ignored."""
        n_clusters = _checks.positive_int("n_clusters", self.n_clusters)
        refine_epochs = _nonnegative_int("refine_epochs", self.refine_epochs)
        update_interval = _checks.positive_int("update_interval", self.update_interval)
        alpha = _positive_float("alpha", self.alpha)
        lr = _positive_float("lr", self.lr)
        weight = _reconstruction_weight(self.reconstruction_weight)
        if _checks.finite_number("tol", self.tol, low=0) > 1:
            raise ValueError(
                f"tol is a fraction of the labels, which must lie in [0, 1], got {self.tol}"
            )
        _checks.verbosity("verbose", self.verbose)
        _check_n_init(self.n_init)
        # DEC's own validation: its messages, n_features_in_ and feature_names_in_
        checked = _validate_data(self, X, dtype=[np.float64, np.float32])
        if n_clusters > checked.shape[0]:
            raise ValueError(
                f"n_clusters must be at most the number of samples: got n_clusters={n_clusters} "
                f"for n_samples={checked.shape[0]}"
            )
        base = self.autoencoder if self.autoencoder is not None else AutoencoderTransformer()
        if not isinstance(base, UNSUPERVISED):
            raise TypeError(
                "autoencoder must be None, fastae.AutoencoderTransformer, StackedAutoencoder or "
                f"AutoencoderOutlierDetector, got {type(base).__name__}"
            )
        random = random_state_generator(self.random_state)
        autoencoder = clone(base)
        if autoencoder.get_params().get("random_state", 0) is None:
            autoencoder.set_params(random_state=random.randint(np.iinfo(np.int32).max))
        self.autoencoder_ = autoencoder.fit(X)  # as given: it keeps any feature names
        X = checked
        x = self._prepared(X)
        codes = _as_dtype(self.autoencoder_._map_chunks(_encode, x), x)
        kmeans = cluster_codes(
            codes, n_clusters, random_state=random.randint(np.iinfo(np.int32).max),
            n_init=self.n_init,
        )  # fmt: skip
        self.alpha_ = alpha
        self.kmeans_labels_ = kmeans.labels_
        self.labels_ = kmeans.labels_.copy()
        self.n_iter_ = 0
        self.cluster_centers_ = kmeans.cluster_centers_.astype(np.float64)
        if refine_epochs:
            module = self._module(weight)
            x = self.autoencoder_._tensor(self.autoencoder_._scale(X))
            self._refine(module, x, refine_epochs, update_interval, lr, random)
            self.cluster_centers_ = module.centers.detach().double().cpu().numpy()
            # KMeans warns itself of clusters it found no sample for
            before = len(np.unique(self.kmeans_labels_))
            after = len(np.unique(self.labels_))
            if after < before:
                _checks.warn_caller(
                    f"DEC's refinement emptied {before - after} of the {before} clusters k-means "
                    "found: compare kmeans_labels_ with labels_, or refine for fewer epochs, at "
                    "a lower lr or with a larger reconstruction_weight",
                    ConvergenceWarning,
                )
            if isinstance(self.autoencoder_, AutoencoderOutlierDetector):
                # its encoder changed: its scores and threshold from the refined model
                self.autoencoder_._set_threshold(X)
        return self

    def _module(self, reconstruction_weight: float = 0.0) -> DECModule:
        """The fitted encoder with the current centres and the fitted kernel's alpha (the
        encoder is shared, not copied)."""
        ae = self.autoencoder_
        ae._sync_device()
        centers = torch.tensor(self.cluster_centers_, dtype=torch.float32, device=ae.device_)
        # a model pickled before alpha_ was kept: the alpha it was fitted with
        alpha = self.alpha_ if hasattr(self, "alpha_") else float(self.alpha)
        return DECModule(ae.module_, centers, alpha, reconstruction_weight)

    def _refine(self, module, x: Tensor, epochs: int, interval: int, lr: float, random) -> None:
        ae = self.autoencoder_
        seed = int(random.randint(np.iinfo(np.int32).max))
        # with the autoencoder's cuda_graph, its fit replays the refinement steps too
        optimizer = default_optimizer(module, lr, capturable=bool(ae.cuda_graph))
        previous = self.labels_
        with _seeded(seed, ae.device_):
            while self.n_iter_ < epochs:
                q = ae._map_chunks(_soft_assignments, x, module)
                labels = q.argmax(1)
                changed = float(np.mean(labels != previous))
                previous = labels
                if self.n_iter_ and changed < self.tol:
                    break
                p = target_distribution(torch.tensor(q, dtype=torch.float32, device=x.device))
                step = min(interval, epochs - self.n_iter_)
                ae._train(
                    module, torch.cat([x, p], dim=1), step, seed + self.n_iter_,
                    optimizer=optimizer, progress=_checks.verbosity("verbose", self.verbose),
                )  # fmt: skip
                self.n_iter_ += step
            q = ae._map_chunks(_soft_assignments, x, module)
        self.labels_ = q.argmax(1).astype(np.int32)  # as k-means' (and KMeans.predict's)

    def _prepared(self, checked: np.ndarray) -> ScaledRows:
        """X validated by DEC, scaled as the autoencoder scales it, in X's precision."""
        self.autoencoder_._sync_device()
        return ScaledRows(self.autoencoder_, checked)

    def _fitted_rows(self, X) -> ScaledRows:
        check_is_fitted(self)
        return self._prepared(_validate_data(self, X, reset=False, dtype=[np.float64, np.float32]))

    def predict(self, X):
        """Cluster of each sample: the largest soft assignment (nearest centre in code space)."""
        return self.predict_proba(X).argmax(1).astype(np.int32)

    def predict_proba(self, X):
        """DEC's soft assignments q (n_samples, n_clusters), each row summing to 1: Student's t
        kernel of the code's distance to each centre, in X's precision."""
        x = self._fitted_rows(X)
        return _as_dtype(self.autoencoder_._map_chunks(_soft_assignments, x, self._module()), x)

    def transform(self, X):
        """Distance of each sample's code to each cluster centre (n_samples, n_clusters), as
        ``KMeans.transform``; ``predict`` is the nearest. In X's precision."""
        x = self._fitted_rows(X)
        codes = torch.from_numpy(self.autoencoder_._map_chunks(_encode, x))
        centers = torch.from_numpy(self.cluster_centers_)
        distances = torch.cdist(codes, centers, compute_mode="donot_use_mm_for_euclid_dist")
        return _as_dtype(distances.numpy(), x)

    @property
    def _n_features_out(self) -> int:
        return self.cluster_centers_.shape[0]

    def fit_predict(self, X, y=None):
        return self.fit(X).labels_
