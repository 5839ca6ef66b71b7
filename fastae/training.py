"""``fastae.fit``: a small, repeatable training loop for autoencoders."""

from __future__ import annotations

import contextlib
import copy
import fractions
import functools
import inspect
import math
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parameter import is_lazy
from torch.nn.utils import clip_grad_norm_
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
    default_collate,
)

from . import _checks
from .graphs import GraphedStep
from .noise import Noise, check_seed, draw_seed
from .ops import MODEL_BCE_ADVICE, check_unit_interval


@dataclass
class History:
    """Per-epoch mean training loss (over the epoch's rows, each batch's loss weighted by its
    rows, as the model computed it while training: in training mode, corrupted, its weights
    changing from step to step), validation loss (if given: over its rows, after the epoch)
    and learning rate (the first parameter group's, as the epoch trained with it), what
    stopped the run and, with ``cuda_graph``, how many steps replayed the captured graph;
    ``seconds``: the wall time of training (validation and callbacks included; inside a
    callback, so far). ``best_epoch``
    indexes ``loss`` and ``val_loss`` (0-based: epoch ``best_epoch + 1`` as callbacks count;
    -1 before the first epoch)."""

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    seconds: float = 0.0
    graphed_steps: int = 0


# a checkpoint that holds a History (saved by a callback) loads with torch.load's default,
# weights_only=True: a History holds lists of floats and numbers alone
torch.serialization.add_safe_globals([History])


def _as_tensor(name: str, data, like: torch.Tensor, own_model: bool) -> torch.Tensor:
    """Array data in the model's dtype (one conversion), tensor data as given; either
    detached: fit reads the data, it trains the model. A read-only array in the model's
    dtype (``np.load(..., mmap_mode="r")``, a pandas frame's values) is shared with one of
    fastae's models (``own_model``), which never write to their input; another model, which
    might, gets a copy."""
    if isinstance(data, np.ndarray):
        data = _checks.unmasked(name, data)
        if data.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} must hold real numbers, got an array of dtype {data.dtype}"
                + (
                    ": convert it first (a DataFrame with nullable or mixed columns reads as "
                    "one: df.to_numpy(dtype='float32'))"
                    if data.dtype == object
                    else ""
                )
            )
        if any(stride < 0 for stride in data.strides):  # torch takes no negative strides
            data = np.ascontiguousarray(data)
        if not data.dtype.isnative or data.dtype.itemsize > 8:  # nor these (longdouble)
            data = data.astype(np.float64)  # the widest dtype a model computes in
        if not (data.flags.writeable or own_model):
            data = np.array(data)
        with _checks.ignoring("The given NumPy array is not writable"):
            return torch.as_tensor(data, dtype=like.dtype, device="cpu")  # moved by _resident
    if not isinstance(data, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor, numpy array, Dataset, DataLoader or iterable of batches, "
            f"got {type(data).__name__}"
        )
    _checks.dense(name, data)
    if data.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no values to train on")
    return data.detach()


def recording_autograd() -> contextlib.ExitStack:
    """Autograd recording whatever the caller's grad mode: training called inside
    ``torch.no_grad()`` or ``torch.inference_mode()`` (on embeddings computed there) trains as
    anywhere else."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _with_autograd(function):
    """``function`` run under :func:`recording_autograd`."""

    @functools.wraps(function)
    def with_grad(*args, **kwargs):
        with recording_autograd():
            return function(*args, **kwargs)

    return with_grad


# held while torch's process-wide generators are seeded for a run (fit's seed, an estimator's
# random_state): seeded runs from several threads take turns (another's draws would interleave
# with theirs and reseed the generators under them); other torch draws do not wait
SEEDED_RUNS = threading.RLock()


def _one_seeded_run_at_a_time(function):
    """``function`` (``fit``) run holding :data:`SEEDED_RUNS` where it is given a seed."""

    @functools.wraps(function)
    def seeded_alone(*args, **kwargs):
        held = SEEDED_RUNS if kwargs.get("seed") is not None else contextlib.nullcontext()
        with held:
            return function(*args, **kwargs)

    return seeded_alone


# Keras's Model.fit arguments that fit takes otherwise: what to write instead
KERAS_ARGUMENTS = {
    "y": "fit(model, data) takes no target: the model reconstructs data",
    "x": "the data is fit's second argument, data",
    "verbose": "use progress=True or False",
    "callbacks": "pass one function as callback=, called as callback(epoch, history)",
    "learning_rate": "use lr=",
    "initial_epoch": "a second fit starts at epoch 1; pass the same optimizer= to continue it",
    "validation_freq": "fit validates after every epoch",
    "steps_per_epoch": "an epoch is one pass over data: pass fewer rows or a DataLoader",
    "sample_weight": "fit weighs every row alike",
    "class_weight": "fit weighs every row alike",
}


def _keras_hints(function):
    """``function`` (``fit``) whose argument errors name what to write instead of Keras's
    ``Model.fit`` arguments (a target, ``verbose``, ``callbacks``, ...)."""
    parameters = inspect.signature(function).parameters

    @functools.wraps(function)
    def hinted(*args, **kwargs):
        if len(args) > 2:
            raise TypeError(
                f"fit takes 2 positional arguments (model, data), got {len(args)}: "
                f"{KERAS_ARGUMENTS['y']} (Keras's fit(x, x) is fit(model, x))"
            )
        for name in kwargs:
            if name in KERAS_ARGUMENTS and name not in parameters:
                raise TypeError(f"fit got Keras's argument {name!r}: {KERAS_ARGUMENTS[name]}")
        return function(*args, **kwargs)

    return hinted


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, else the model."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _data_parallel(model: nn.Module) -> bool:
    """Whether fit trains ``model`` data-parallel, running collectives that every process must
    join: a DistributedDataParallel model under an initialized process group. Any other model
    trains on this process's data alone (fit called on one process of a group, say)."""
    return isinstance(model, DistributedDataParallel) and _distributed()


class TensorBatches:
    """Row batches of one tensor, gathered with one indexing op each (a DataLoader over a
    TensorDataset would collate them sample by sample: a gather per row). With ``shuffle``,
    every pass follows a fresh permutation drawn from a CPU generator seeded with ``seed``;
    with a ``sampler`` (this process's shard: a DistributedSampler, or any sized iterable of
    row indices), the rows and order it gives (a DistributedSampler's for the epoch its
    ``set_epoch`` set), batched as a DataLoader would; ``drop_last``: without the last batch
    where it is shorter than ``batch_size``."""

    def __init__(
        self,
        tensor: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int,
        sampler=None,
        drop_last: bool = False,
    ):
        self.tensor, self.batch_size, self.shuffle = tensor, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler, self.drop_last = sampler, drop_last

    def _rows(self) -> int:
        return self.tensor.shape[0] if self.sampler is None else len(self.sampler)

    def edges(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The whole tensor's rows, first row and last row."""
        return self.tensor.shape[0], self.tensor[0], self.tensor[-1]

    def __len__(self) -> int:
        round_ = math.floor if self.drop_last else math.ceil
        return round_(self._rows() / self.batch_size)

    def __iter__(self):
        ends = range(self.batch_size, len(self) * self.batch_size + 1, self.batch_size)
        if self.sampler is not None:
            order = torch.tensor(list(self.sampler), dtype=torch.int64, device="cpu")
        elif self.shuffle:
            order = torch.randperm(self._rows(), generator=self.generator, device="cpu")
        else:
            for end in ends:
                yield self.tensor[end - self.batch_size : end]
            return
        order = order.to(self.tensor.device)
        for end in ends:
            yield self.tensor[order[end - self.batch_size : end]]


def _batches(
    name: str,
    data,
    model: nn.Module,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
):
    """Batches of a tensor or a map-style dataset (for a data-parallel model, each process's
    shard: through a DistributedSampler for training, every row once for validation); any
    other re-iterable of batches is used as it is. A tensor must have at least one row and the
    model's dtype and width (its ``in_features``)."""
    if isinstance(data, (str, bytes, Mapping)):
        raise TypeError(
            f"{name} must be a tensor, numpy array, Dataset, DataLoader or iterable of batches, "
            f"got {type(data).__name__}"
        )
    if _map_style(data):
        return _dataset_batches(name, data, model, batch_size, shuffle, seed, drop_last)
    if isinstance(data, tuple):
        raise TypeError(
            f"{name} must not be a tuple: pass the inputs alone (Keras's (x, x) is x here: an "
            "autoencoder's target is its input), and batches in a list or a DataLoader"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"{name} must be re-iterable (a tensor, array, DataLoader or list of batches): "
            f"a one-shot {type(data).__name__} would be used up after the first epoch"
        )
    if isinstance(data, list) and not all(isinstance(_first(b), torch.Tensor) for b in data):
        raise TypeError(
            f"{name} as a list must hold batch tensors (or tuples whose first item is one)"
            + (
                _MAPPING_HINT
                if any(isinstance(_first(b), Mapping) for b in data)
                else "; for rows of numbers pass a tensor or array (torch.tensor(rows))"
            )
        )
    if isinstance(data, (DataLoader, Iterable)) and not isinstance(
        data, (torch.Tensor, np.ndarray)
    ):
        return data
    like = next(model.parameters())
    tensor = _as_tensor(name, data, like, _own_model(model))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got {tuple(tensor.shape)}")
    _checks.rows(name, tensor)
    if tensor.dtype != like.dtype:
        raise TypeError(
            f"{name} must have the dtype of the model's parameters ({like.dtype}), "
            f"got {tensor.dtype}" + _conversion_hint(tensor.dtype)
        )
    in_features = getattr(_unwrap(model), "in_features", None)
    if isinstance(in_features, int) and tensor.shape[1] != in_features:
        raise ValueError(
            f"{name} must have {in_features} columns (the model's in_features), "
            f"got shape {tuple(tensor.shape)}"
        )
    sampler = _shard_sampler(name, tensor.shape[0], model, shuffle, seed)
    tensor = _resident(tensor, like.device)
    return TensorBatches(tensor, batch_size, shuffle, seed, sampler, drop_last)


_MAPPING_HINT = (
    ": its batches are dicts; pass each one's input tensor (batch['x']), or give a DataLoader "
    "a collate_fn that returns it"
)


def _map_style(data) -> bool:
    """A torch Dataset read by index (not an IterableDataset, which yields batches itself)."""
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset)


def _dataset_batches(
    name: str, dataset, model: nn.Module, batch_size: int, shuffle: bool, seed: int, drop_last
) -> DatasetBatches:
    """Batches of a map-style dataset, in the order fit gives tensor data of as many rows."""
    try:
        rows = len(dataset)
    except TypeError:
        raise TypeError(
            f"{name} is a {type(dataset).__name__}, a Dataset without __len__: define it, or "
            "pass a DataLoader over it"
        ) from None
    if rows == 0:
        raise ValueError(f"{name} must have at least one row, got an empty dataset")
    sampler = _shard_sampler(name, rows, model, shuffle, seed)
    order = TensorBatches(torch.arange(rows), batch_size, shuffle, seed, sampler, drop_last)
    return DatasetBatches(dataset, order)


class DatasetBatches:
    """Batches of a map-style dataset: its items at the indices ``order`` (a
    :class:`TensorBatches` of row numbers) gives, collated as a DataLoader collates them (row
    by row: a TensorDataset's tensor, batched whole, is faster)."""

    def __init__(self, dataset, order: TensorBatches):
        self.dataset, self.order, self.sampler = dataset, order, order.sampler

    def _rows(self) -> int:
        return self.order._rows()

    def edges(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The whole dataset's items, and its first and last inputs (empty where an item holds
        no tensor input: its count alone is compared)."""

        def input_of(index: int) -> torch.Tensor:
            x = _first(default_collate([self.dataset[index]]))
            return x[0] if isinstance(x, torch.Tensor) else torch.empty(0)

        rows = len(self.dataset)
        return rows, input_of(0), input_of(rows - 1)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for indices in self.order:
            yield default_collate([self.dataset[i] for i in indices.tolist()])


def _shard_sampler(name: str, rows: int, model: nn.Module, shuffle: bool, seed: int):
    """For a data-parallel model, the rows of this process's shard (of training data, equal
    shards, padded: a DistributedSampler; of validation data every row once), else None."""
    if not _data_parallel(model):
        return None
    if name == "validation_data":
        # no padding: evaluation runs no collective per batch, so the shards may differ in
        # length, and the mean over the set is exact
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return range(rank, rows, world)
    return DistributedSampler(range(rows), shuffle=shuffle, seed=seed)


# Data that takes at most this share of a CUDA device's free memory moves there once, and each
# batch is gathered there; larger data stays, and each batch is gathered and copied over.
RESIDENT_SHARE = 0.25


def _resident(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on the CUDA ``device`` if it has room for it (see above), else ``tensor``.
    Per-batch copies from pageable host memory cost about as much as a small step's GPU
    work, and each waits for the GPU to reach it, so the host cannot run ahead."""
    if tensor.device == device or device.type != "cuda":
        return tensor
    free, _ = torch.cuda.mem_get_info(device)
    if tensor.numel() * tensor.element_size() > RESIDENT_SHARE * free:
        return tensor
    return tensor.to(device)


def _first(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _warn_unread_target(batch) -> None:
    """Warns where a batch is (input, target) with a float target of the input's shape, as
    Keras's ``fit(noisy, clean)``: fit reconstructs the input, and the target goes unread."""
    if not (isinstance(batch, (tuple, list)) and len(batch) > 1):
        return
    x, target = batch[0], batch[1]
    if (
        isinstance(x, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and target.is_floating_point()
        and target.shape == x.shape
    ):
        _checks.warn_caller(
            "data yields (input, target) pairs of one shape: fit trains the model to "
            "reconstruct the input, a batch's first item, and does not read the second; for "
            "fixed (noisy, clean) pairs write the loop with fastae.ops.decode_loss(..., "
            "target=clean) (README: Coming from Keras)"
        )


class _Progress:
    """tqdm when installed, else one line per epoch on stderr."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=True)
            except ImportError:
                pass

    def update(self, epoch: int, stats: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()})
            self.bar.update(1)
        elif self.enabled:
            text = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
            print(f"epoch {epoch + 1}: {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _own_model(model: nn.Module) -> bool:
    """Whether the model is one of fastae's own classes, whose forward never writes to its
    input and takes batches of its dtype and width; a subclass of one, whose forward may
    differ, is checked as any other model."""
    return type(_unwrap(model)).__module__.split(".")[0] == __name__.split(".")[0]


def _batch_form(model: nn.Module) -> tuple[torch.Tensor, int] | None:
    """A parameter of one of fastae's models (whose dtype its batches take, but for those that
    pass together under autocast) and its width, ``in_features``: checked as a DataLoader
    yields the batches, where the model's own check would name its ``x``. None for another
    model, which may take other batches."""
    in_features = getattr(_unwrap(model), "in_features", None)
    if not _own_model(model) or not isinstance(in_features, int):
        return None
    return next(model.parameters()), in_features


def _unchecked_form(model: nn.Module, batches):
    """:func:`_batch_form` for batches that come unchecked; None for a tensor's, whose dtype,
    width and values fit checked whole."""
    return None if isinstance(batches, TensorBatches) else _batch_form(model)


def _check_finite_data(model: nn.Module, sources: dict) -> None:
    """Tensor data (and validation data) for one of fastae's models free of NaN and inf,
    which would make its loss NaN an epoch later: their extremes in one pass, one sync. A
    model of another package's (or the caller's) may read NaN as a missing value; batches a
    DataLoader yields on the host are checked as they arrive (:func:`_check_batch_values`;
    for NaN not under data-parallel training), not ahead."""
    if not _own_model(model):
        return
    for name, tensor in sources.items():
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue
        lo, hi = torch.aminmax(tensor.detach())
        bounds = torch.stack([lo.double(), hi.double()]).tolist()  # (as check_unit_interval)
        if not all(math.isfinite(bound) for bound in bounds):
            raise ValueError(
                f"{name} holds NaN or inf (as {tensor.dtype}, the model's dtype): training on "
                "it makes the loss NaN; drop or impute those values first"
            )


@dataclass
class _TargetCheck:
    """Whether fit paused a BCE model's per-step target check, the data sources it checks
    batch by batch instead (``per_batch``: "data", "validation_data"), and the
    ``check_targets`` the caller set (a callback may change it): the model's again when fit
    ends."""

    paused: bool = False
    per_batch: tuple[str, ...] = ()
    setting: bool = True

    def of_batches(self, name: str) -> bool:
        """Whether each batch of ``name`` is checked as it arrives (:func:`_on_device`)."""
        return name in self.per_batch and self.setting


@contextlib.contextmanager
def _targets_checked_by_fit(model: nn.Module, sources: dict):
    """For one of fastae's BCE models (a subclass's forward may change its input first),
    the model's per-step check (a device sync each step) paused: tensor sources (``data``,
    ``validation_data``) checked whole, once; batched ones (a DataLoader, a list) batch by
    batch where each arrives, before its copy to the device (on the host, without a sync, for
    the batches a DataLoader yields there)."""
    module = _unwrap(model)
    bce = getattr(module, "check_targets", False) and getattr(module, "loss_name", "") == "bce"
    if not (bce and _own_model(model)):
        yield _TargetCheck()
        return
    per_batch = []
    for name, source in sources.items():
        if isinstance(source, torch.Tensor):
            check_unit_interval(name, source, MODEL_BCE_ADVICE)
        else:
            per_batch.append(name)
    check = _TargetCheck(paused=True, per_batch=tuple(per_batch))
    module.check_targets = False
    try:
        yield check
    finally:
        module.check_targets = check.setting


@contextlib.contextmanager
def _targets_resumed(model: nn.Module, check: _TargetCheck):
    """The target check :func:`_targets_checked_by_fit` paused, as the caller set it for a
    while: the callback sees (and may save, copy or change) the model as the caller would."""
    module = _unwrap(model)
    module.check_targets = check.setting
    try:
        yield
    finally:
        check.setting = module.check_targets
        module.check_targets = False


def _on_device(
    batch,
    device: torch.device,
    name: str = "data",
    form=None,
    in_unit_interval: bool = False,
    finite: bool = True,
) -> torch.Tensor:
    """The batch's input on ``device``; copied to a GPU asynchronously where it is in pinned
    memory (``DataLoader(pin_memory=True)``). A copy to the host stays blocking: an
    asynchronous one could be read before it lands. A batch made under inference mode is
    copied (autograd cannot save it for backward). With ``form`` (:func:`_batch_form`), its
    dtype and width are checked, the error naming ``name``, and on the host (no device sync)
    that its values are finite (with ``finite``: not under data-parallel training, where one
    process raising alone would leave the others waiting in a collective; the loss, averaged
    over them, shows NaN to all) and with ``in_unit_interval`` that they lie in [0, 1] (a BCE
    model's targets; on a GPU too)."""
    x = _first(batch)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must yield tensors (or tuples whose first item is one), got a batch of "
            f"{type(x).__name__}" + (_MAPPING_HINT if isinstance(x, Mapping) else "")
        )
    if x.dim() < 2:
        raise ValueError(
            f"{name} must yield batches of rows (2-D), got a batch of shape {tuple(x.shape)}: "
            "a dataset of single rows is batched by DataLoader(dataset, batch_size=...)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} yielded an empty batch, of shape {tuple(x.shape)}")
    if form is not None:
        like, in_features = form
        # (checked where the batch arrives: under autocast on the model's device, a host
        # batch of another autocast dtype passes too)
        if x.dtype != like.dtype and not _checks.autocast_together(x, like, like.device):
            raise TypeError(
                f"{name} must yield batches of the dtype of the model's parameters "
                f"({like.dtype}), got a batch of {x.dtype}{_conversion_hint(x.dtype)}"
            )
        if x.shape[1:] != (in_features,):
            raise ValueError(
                f"{name} must yield batches of {in_features} columns (the model's "
                f"in_features), got a batch of shape {tuple(x.shape)}"
            )
        if x.device.type == "cpu":
            _check_batch_values(name, x, in_unit_interval, finite)
        elif in_unit_interval:
            check_unit_interval(name, x, MODEL_BCE_ADVICE)
    x = x.detach().to(device, non_blocking=torch.device(device).type == "cuda")
    return x.clone() if x.is_inference() else x


def _conversion_hint(dtype: torch.dtype) -> str:
    """How to convert batches of an integer or bool ``dtype`` (images of 8-bit pixels)."""
    if dtype.is_floating_point or dtype.is_complex:
        return ""
    return " (convert it, and rescale 8-bit pixels: x.float() / 255)"


def _check_batch_values(
    name: str, x: torch.Tensor, in_unit_interval: bool, finite: bool = True
) -> None:
    """A host batch for one of fastae's models free of NaN and inf (with ``finite``: they
    would make the epoch's loss NaN, each later step training on NaN weights) and, for a BCE
    model's, in [0, 1]: the extremes in one pass, no device sync."""
    if not (finite or in_unit_interval):
        return
    lo, hi = torch.aminmax(x.detach())
    bounds = torch.stack([lo.double(), hi.double()]).tolist()
    if finite and not all(math.isfinite(bound) for bound in bounds):
        raise ValueError(
            f"{name} yielded a batch holding NaN or inf: training on it makes the loss NaN; "
            "drop or impute those values first"
        )
    if in_unit_interval and not (bounds[0] >= 0 and bounds[1] <= 1):
        check_unit_interval(name, x, MODEL_BCE_ADVICE)  # raises, saying so


def _global_mean(name: str, total: torch.Tensor, count: int, parallel: bool) -> float:
    """``total / count``, the sums over this process's rows; ``parallel`` (data-parallel
    training) over every process's (one all-reduce), so that all processes record the same
    losses and stop, keep and restore weights alike (a process that stopped alone would leave
    the others waiting in their next gradient all-reduce; a shard may be empty, the whole not:
    ``name``, the data, yielded no rows)."""
    if parallel:
        rows = torch.full((), count, dtype=torch.float64, device=total.device)
        sums = torch.stack((total.to(torch.float64), rows))
        torch.distributed.all_reduce(sums)
        loss_sum, count = sums.tolist()  # the pass's one sync
    elif count:
        loss_sum = float(total)
    if not count:
        raise ValueError(
            f"{name} yielded no rows: an empty list or dataset, or a DataLoader with "
            "drop_last=True and fewer rows than its batch_size (whose one batch it drops)"
        )
    return loss_sum / count


def _used_up(name: str, count: int, epoch: int, parallel: bool) -> None:
    """An iterable that yielded rows in the first epoch and none in a later one: a one-shot
    iterable (an iterator is refused up front; an IterableDataset over a stream is not)."""
    if epoch and not count and not parallel:
        raise ValueError(
            f"{name} yielded no rows in epoch {epoch + 1}, though it did in epoch 1: it must be "
            "re-iterable (a DataLoader, a list of batches), not one the first epoch used up"
        )


def _mean_loss(
    model: nn.Module, batches, device, epoch: int = 0, in_unit_interval: bool = False
) -> float:
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    form = _unchecked_form(model, batches)
    parallel = _data_parallel(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x = _on_device(batch, device, "validation_data", form, in_unit_interval, not parallel)
            total.add_(_checks.model_loss(model(x)), alpha=x.shape[0])
            count += x.shape[0]
    model.train(was_training)
    _used_up("validation_data", count, epoch, parallel)
    return _global_mean("validation_data", total, count, parallel)


class LossNotFinite(FloatingPointError):
    """:func:`fit`'s error for an epoch whose training or validation loss is NaN or inf:
    ``which`` loss ("training" or "validation"), the ``epoch`` (from 1), the ``loss``, the
    ``history`` so far (that loss included) and ``restored_epoch``: the epoch whose weights
    ``restore_best`` put back (from 1), or None where the model keeps its last step's. Also
    for a last step that left a weight NaN or inf (each epoch's loss is taken before its
    steps, so no loss shows it): ``which`` "parameters", ``loss`` NaN, ``epoch`` the last."""

    def __init__(self, which, epoch, loss, history=None, restored_epoch=None):
        self.which, self.epoch, self.loss = which, epoch, loss
        self.history, self.restored_epoch = history, restored_epoch
        kept = (
            "the model keeps the weights of its last step"
            if restored_epoch is None
            else f"the model is back at the weights of epoch {restored_epoch}, the best before"
        )
        data = "" if which == "parameters" else " or the data holds NaN or inf"
        super().__init__(
            f"{self.what()}: training diverged (try a lower lr or max_grad_norm){data}; {kept}"
        )

    def what(self) -> str:
        """What was not finite, and when."""
        if self.which == "parameters":
            return f"the parameters hold NaN or inf after the last step of epoch {self.epoch}"
        return f"the {self.which} loss is {self.loss} in epoch {self.epoch}"

    def __reduce__(self):  # pickles (from a worker process) with all its fields
        return type(self), (self.which, self.epoch, self.loss, self.history, self.restored_epoch)


def _asked_to_stop(answer, device: torch.device, parallel: bool) -> bool:
    """Whether a callback's ``answer`` stops training; data-parallel, whether any process's
    does (one all-reduce), so that all stop at the same epoch."""
    if isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1:
        answer = bool(answer)  # a comparison of tensor losses
    if answer is not None and not isinstance(answer, (bool, np.bool_)):
        _checks.warn_caller(
            f"callback returned {answer!r} ({type(answer).__name__}), not True, False or None: "
            "training goes on (return True to stop it)"
        )
        answer = False
    stop = bool(answer)
    if not parallel:
        return stop
    flag = torch.full((), int(stop), dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _fingerprint(row: torch.Tensor) -> torch.Tensor:
    """sum_k (k + 1) byte_k of a row's bytes, in int64: exact (below 2^63 for rows under
    10^8 bytes), so equal rows give equal digests on any device."""
    data = row.detach().contiguous().view(torch.uint8).to(torch.int64)
    weights = torch.arange(1, data.numel() + 1, dtype=torch.int64, device=data.device)
    return (data * weights).sum()


def _check_whole_on_every_process(name: str, batches, device) -> None:
    """Tensor or Dataset data under data-parallel training is the same whole data on every
    process (fit shards it): rows, columns and a digest of the first and last rows compared
    in one all-reduce. Data split per process beforehand would be split again, and differing
    row counts desynchronize the processes' collectives."""
    rows, first, last = batches.edges()
    summary = torch.stack(
        [
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor(first.numel(), dtype=torch.int64),
            _fingerprint(first).cpu(),
            _fingerprint(last).cpu(),
        ]
    ).to(device)
    extremes = torch.cat([summary, -summary])  # the maxima and minus the minima, one collective
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(extremes[:4], -extremes[4:]):
        raise ValueError(
            f"{name} differs between the processes ({rows} rows of {first.numel()} here): "
            "under data-parallel training pass the whole data on every process, which fit "
            "shards (or each process's own batches, in a DataLoader)"
        )


def _from_process_zero(value: int, device: torch.device, parallel: bool) -> int:
    """Process 0's ``value`` in data-parallel training (a broadcast), else ``value``: the
    DistributedSampler's shuffling seed must be the same on every process, or the shards
    overlap."""
    if not parallel:
        return value
    shared = torch.full((), value, dtype=torch.int64, device=device)  # a seed: < 2^63
    torch.distributed.broadcast(shared, src=0)
    return int(shared)


DEFAULT_LR = 1e-3  # fit's default Adam's, Keras's and PyTorch's


@_keras_hints
@_one_seeded_run_at_a_time
@_with_autograd
def fit(
    model: nn.Module,
    data,
    *,
    epochs: int = 20,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    validation_data=None,
    validation_split: float | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    seed: int | None = None,
    shuffle: bool | None = None,
    progress: bool = True,
    restore_best: bool = True,
    cuda_graph: bool = False,
    scheduler=None,
    callback=None,
    max_grad_norm: float | None = None,
    drop_last: bool = False,
) -> History:
    """Train ``model`` (whose forward returns an object with ``.loss``) on ``data`` for at most
    ``epochs`` passes, stepping ``optimizer`` (by default Adam at ``lr``) once a minibatch
    (of tensor, array or Dataset data, ``batch_size`` rows, 128 where None; an epoch's last
    batch holds the rest, or is dropped with ``drop_last``, where it is shorter: a BatchNorm
    layer cannot train on a batch of one row; validation reads every row).

    ``data`` and ``validation_data`` are (N, d) tensors or arrays (or array-likes, as a pandas
    DataFrame, read as the array ``np.asarray`` makes; batched here; the training
    rows reshuffled every epoch, by a generator seeded from ``seed``, unless ``shuffle`` is
    False), a map-style ``torch.utils.data.Dataset`` (batched and shuffled alike, its items
    collated row by row as a DataLoader collates them; a ``TensorDataset``'s first tensor is
    batched as tensor data is, whole) or any iterable of batches but a tuple (a DataLoader,
    an IterableDataset or a list; a batch may be a tensor or a tuple whose first item is the
    input, the model reconstructing it: its other items, labels or targets, are not read. A
    tuple of tensors as ``data`` is refused, as it would be Keras's (x, x), whose x alone is
    passed here; batches of the caller's come as they are: ``batch_size``, ``shuffle`` and
    ``drop_last`` given for them alone are an error, not dropped). Batches move to the
    model's device:
    tensor or array data on the host moves to a CUDA model's GPU once, if it takes at most a
    quarter of the free GPU memory (batches are then gathered there), else batch by batch.
    Numpy arrays take the model's dtype (converted once, not rescaled: divide 8-bit pixels by
    255 first; a masked array must mask nothing, a
    read-only one is shared with fastae's models, which never write to their input, and
    copied for others), tensors must already have it; both
    are read detached (a tensor that requires grad gets none; the training batches of data
    made under ``torch.inference_mode()`` are copied, as autograd cannot save them).
    Training records autograd whatever the caller's grad mode (inside ``torch.no_grad()`` too).
    The validation loss is the model's loss in eval mode: without corruption, and for a VAE at
    z = mu (its beta-weighted KL term included), not a sampled ELBO, so it may lie below the
    training loss. Epochs are compared by the loss as the model computed it then: where a
    callback changes the loss's weights (a VAE's beta annealed), they are not comparable, so
    pass ``restore_best=False`` and no ``patience`` (or anneal in one fit, select in the next).
    With ``patience``, training stops after that many epochs without a ``min_delta`` improvement
    of the validation loss (training loss if no validation data). ``restore_best``: with
    validation data, the model is left with the weights of the best epoch
    (``History.best_epoch``: the last that lowered the best validation loss by more than
    ``min_delta``; with the default 0, the lowest), whether or not training stopped early, and
    when it is interrupted (Ctrl-C, a callback's error); without, those of the best
    training-loss epoch when ``patience`` stopped the run. An ``optimizer`` passed in keeps its
    state from every step, a diverged one's too (Adam's moments may then hold NaN): build a
    fresh one to train on after :class:`LossNotFinite`. ``seed`` seeds the torch generators
    the run draws from (the CPU's, and the model's CUDA device's: as ``torch.manual_seed``
    there, left seeded after fit; other devices' are left alone), so noise seeds and shuffling
    repeat exactly (the initial weights, drawn when the model was built, are the caller's);
    a seeded fit holds :data:`SEEDED_RUNS` while it trains (as the estimators' fits do), so
    seeded fits from several threads take turns, each drawing alone from the seeded generator
    (a callback that waits on another thread's seeded fit would wait forever). The model is
    left in eval mode (its forward then corrupts nothing and a VAE takes z = mu),
    however fit ends: call ``model.train()`` before training it further in a loop of your own.
    ``validation_split``: the share of the rows of tensor or array ``data`` held out as
    validation data instead of ``validation_data``, as Keras's: the last rows, taken before any
    shuffling (shuffle rows sorted by class or time first).

    ``progress``: a progress bar of the epochs and their losses (tqdm where installed, else a
    line an epoch on stderr; under data-parallel training on process 0 alone).
    ``optimizer``: by default :func:`default_optimizer`'s Adam at ``lr`` (1e-3 where None;
    PyTorch's fused Adam on CUDA and on the CPU); an optimizer passed in holds its own rate,
    and ``lr`` must then be None.
    ``weight_decay``: the default Adam's L2 penalty (``torch.optim.Adam``'s: each step adds
    ``weight_decay * p`` to every parameter's gradient, the gradient of
    ``weight_decay / 2 * ||p||^2``, biases included); 0 (default) for none. With
    ``optimizer`` given it must be 0: set it on the optimizer.
    ``scheduler``: a learning-rate scheduler stepped once an epoch, after its losses (a
    ``ReduceLROnPlateau`` with the loss ``patience`` watches: validation if given, else
    training): one built on ``optimizer``, or a callable that builds one from the optimizer
    fit trains with (``lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)``; for
    the default Adam, which only fit sees). ``History.lr`` records each epoch's rate.
    ``max_grad_norm``: clip the gradients of each step to this total 2-norm (over the
    parameters that require gradients, as :func:`torch.nn.utils.clip_grad_norm_`; read at
    each epoch's start, so a layer a callback thaws is clipped too; DistributedDataParallel
    fixes the parameters it synchronizes when it wraps the model: thaw none under it) before
    the optimizer's update, as Keras's ``global_clipnorm``; None (default) leaves them as they
    are.
    ``callback``: called after each epoch as ``callback(epoch, history)`` (epoch from 1, the
    history so far, the model in training mode): to log, checkpoint or plot; returning True
    stops training there (``History.stopped_early``; the weights stay the last epoch's where
    no validation data is given; under data-parallel training a stop asked by any process
    stops all; a one-element bool tensor, a comparison of tensor losses, answers as its value);
    a return other than these, False or None is warned about and does not stop it.

    ``cuda_graph``: replay each training step from a CUDA graph (:class:`fastae.GraphedStep`:
    one launch a step instead of a dozen, for batches whose GPU work is shorter than the
    host's); needs a CUDA model that draws no random numbers on the CPU (fastae's noise and
    VAE draw theirs on the GPU) and a ``capturable`` optimizer (the default Adam is made so).
    An epoch's shorter last batch runs eagerly. A graph replays the learning rate it
    captured unless that is a tensor the scheduler updates in place: with ``scheduler`` the
    default Adam's is one, and a given optimizer's must be (``lr=torch.tensor(1e-3,
    device="cuda")``).

    Under ``torchrun`` (an initialized process group) a DistributedDataParallel model (over
    the default group) trains data-parallel, and every process must call fit with the same
    whole tensor or Dataset data (checked; or its own batches in a DataLoader; a batch holding
    NaN ends an MSE model's run on every process through the mean loss, where a BCE model's
    target check refuses it on that process alone, the others waiting): tensor
    or Dataset data is sharded across processes with a DistributedSampler (shuffled alike on
    all: process 0's seed, given or drawn; it pads the training rows to a multiple of the
    processes with repeated rows, which are trained on and counted; validation data in
    unpadded shards, each row once), the losses in the history are means over every
    process's rows (one all-reduce an epoch), so all processes stop early, keep
    and restore the same epoch's weights, and ``seed`` seeds process r's generator with
    ``seed + r``, so that their noise differs (without ``seed``, seed each process's generator
    differently yourself). Any other model trains on the calling process's data alone, with
    no collective.

    Raises :class:`fastae.LossNotFinite` (a ``FloatingPointError``) when an epoch's training or
    validation loss is not finite (the model goes back to the best epoch's weights where
    ``restore_best`` kept them, else keeps its last step's; in eval mode either way) or when
    training ends with a parameter the optimizer steps NaN or inf (the last step's update,
    which no epoch's loss shows: ``which="parameters"``; after ``restore_best``'s weights are
    put back, so only where those are not finite either), and ``ValueError`` for a model with
    float16 parameters and no ``optimizer``: Adam's moment estimates would be float16 too.
    """
    epochs = _checks.positive_int("epochs", epochs)
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    if patience is not None:
        patience = _checks.positive_int("patience", patience)
    if lr is not None and optimizer is not None:
        raise ValueError(
            "lr sets the rate of fit's default Adam: with optimizer given, leave lr None and "
            "set the rate on the optimizer"
        )
    lr = DEFAULT_LR if lr is None else lr
    lr = _checks.finite_number("lr", lr, low=0, open_low=True, float32=True)
    weight_decay = _checks.finite_number("weight_decay", weight_decay, low=0, float32=True)
    if weight_decay and optimizer is not None:
        raise ValueError(
            "weight_decay sets the L2 penalty of fit's default Adam: with optimizer given, "
            "leave it 0 and set weight_decay on the optimizer"
        )
    min_delta = _checks.finite_number("min_delta", min_delta, low=0)
    seed = check_seed(seed)
    if shuffle is not None:
        shuffle = _checks.flag("shuffle", shuffle)
    progress = _checks.flag("progress", progress)
    restore_best = _checks.flag("restore_best", restore_best)
    if max_grad_norm is not None:
        max_grad_norm = _checks.finite_number("max_grad_norm", max_grad_norm, low=0, open_low=True)
    if callback is not None:
        _check_callback(callback)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if optimizer is not None:
        _checks.steps_without_closure(optimizer)
    like = next(model.parameters(), None)
    if like is None:
        raise TypeError(f"model must have parameters to train, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "model has parameters on the meta device, which hold no values to train: "
            "materialize them first (model.to_empty(device=...) and initialize them, or "
            "load_state_dict(..., assign=True))"
        )
    # .data: a lazy parameter's too, which its first batch would fill in place
    if any(t.data.is_inference() for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            "model's parameters or buffers were made under torch.inference_mode(), which "
            "allows no update of them outside it: build the model outside inference mode to "
            "train it"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no parameter that requires a gradient: nothing to train (call "
            "requires_grad_() on those to train)"
        )
    noise = getattr(_unwrap(model), "noise", None)
    if isinstance(noise, Noise) and noise.seed is not None:
        _checks.warn_caller(
            f"the noise spec {noise!r} has a seed: every training step corrupts a batch's "
            "rows with the same noise; leave its seed None to draw fresh noise each step "
            "(fit's seed, or an estimator's random_state, makes the run repeatable)"
        )
    parallel = _data_parallel(model)
    if parallel and model.process_group is not torch.distributed.group.WORLD:
        raise ValueError(
            "model is DistributedDataParallel over a process group other than the default one, "
            "over which fit shards the data and averages the losses: wrap it over the default "
            "group (or train it in a loop of your own)"
        )
    rank = torch.distributed.get_rank() if parallel else 0
    if seed is not None:
        # data-parallel, one stream per process: with one seed, the noise (and a VAE's eps)
        # of row i of every process's batch would be the same
        seed_torch((seed + rank) % 2**64, like.device)
    data = _plain_array("data", data)
    validation_data = _plain_array("validation_data", validation_data)
    drop_last = _checks.flag("drop_last", drop_last)
    batch_size, shuffle = _batching(data, validation_data, batch_size, shuffle, drop_last)
    # the shuffling seed, drawn only where fit shuffles the data (an unused draw would
    # shift the noise drawn after it, and a run resumed from a checkpoint with it), and
    # process 0's on every process: a DistributedSampler's shards are disjoint only where all
    # processes shuffle alike
    shuffle_seed = 0 if seed is None else seed
    if shuffle and _batched_here(data):
        shuffle_seed = _from_process_zero(
            draw_seed() if seed is None else seed, like.device, parallel
        )
    if validation_split is not None:
        data, validation_data = _split_off(data, validation_data, validation_split)
    train = _batches("data", data, model, batch_size, shuffle, shuffle_seed, drop_last)
    if drop_last and len(train) == 0:
        rows = train._rows()
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} leaves no batch of data's {rows} rows"
            + (" (this process's shard)" if parallel else "")
            + " to train on: lower batch_size"
        )
    val = None
    if validation_data is not None:
        val = _batches("validation_data", validation_data, model, batch_size, False, 0)
    if parallel:
        for name, batches in (("data", train), ("validation_data", val)):
            if isinstance(batches, (TensorBatches, DatasetBatches)):
                _check_whole_on_every_process(name, batches, like.device)
    cuda_graph = _checks.flag("cuda_graph", cuda_graph)
    if optimizer is None:
        _check_adam_dtype(model)
        # a graph replays an lr it reads from memory: a tensor the scheduler fills
        lr_on_device = cuda_graph and scheduler is not None
        optimizer = default_optimizer(
            model, lr, capturable=cuda_graph, lr_tensor=lr_on_device, weight_decay=weight_decay
        )
    # every step through the graphed step: it runs eagerly until it captures
    step = None
    if cuda_graph:
        try:
            step = GraphedStep(model, optimizer, max_grad_norm=max_grad_norm)
        except ValueError as error:  # said of cuda_graph, the argument that asked for it
            raise ValueError(f"cuda_graph=True: {error}") from None
    trained = [p for p in model.parameters() if p.requires_grad]
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in stepped for p in trained):
        raise ValueError(
            "optimizer steps none of model's trainable parameters: build it on model.parameters()"
        )
    scheduler = _scheduler(scheduler, optimizer, cuda_graph, like.device)

    history = History()
    form = _unchecked_form(model, train)
    best, best_state, waited, patience_stopped = math.inf, None, 0, False

    def check_finite(loss: float, which: str, epoch: int) -> None:
        if math.isfinite(loss):
            return
        restored = None
        if best_state is not None:  # restore_best with validation data or patience
            model.load_state_dict(best_state)
            restored = history.best_epoch + 1
        model.eval()
        history.seconds = time.perf_counter() - start
        raise LossNotFinite(which, epoch + 1, loss, history, restored)

    start = time.perf_counter()
    # the tensors batched (converted once), for the data's checks, else the batches
    sources = {
        name: batches.tensor if isinstance(batches, TensorBatches) else batches
        for name, batches in (("data", train), ("validation_data", val))
        if batches is not None
    }
    with contextlib.ExitStack() as stack:
        stack.callback(model.eval)  # however fit ends: an interrupt, a callback's error
        _check_finite_data(model, sources)
        target_check = stack.enter_context(_targets_checked_by_fit(model, sources))
        # after the data's checks: data refused shows no progress bar
        bar = _Progress(epochs, progress and rank == 0, type(_unwrap(model)).__name__)
        stack.callback(bar.close)

        def restore_best_if_interrupted(kind, error, traceback) -> bool:
            # Ctrl-C or a callback's error: the best epoch's weights, as at a normal end
            # (LossNotFinite put them back itself)
            interrupted = kind is not None and not issubclass(kind, LossNotFinite)
            if interrupted and best_state is not None and val is not None:
                model.load_state_dict(best_state)
            return False  # the exception goes on

        stack.push(restore_best_if_interrupted)
        for epoch in range(epochs):
            model.train()
            if epoch:  # a callback may have frozen or thawed layers
                trained = [p for p in model.parameters() if p.requires_grad]
            if isinstance(getattr(train, "sampler", None), DistributedSampler):
                train.sampler.set_epoch(epoch)
            # one sync per epoch; a float64 sum keeps a float64 model's loss exact
            total, count = torch.zeros((), dtype=torch.float64, device=like.device), 0
            history.lr.append(float(optimizer.param_groups[0]["lr"]))
            for batch in train:
                if epoch == 0 and count == 0:
                    _warn_unread_target(batch)
                x = _on_device(
                    batch, like.device, "data", form, target_check.of_batches("data"), not parallel
                )
                if step is not None:
                    loss = step(x)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = _checks.model_loss(model(x))
                    loss.backward()
                    if max_grad_norm is not None:
                        clip_grad_norm_(trained, max_grad_norm)
                    optimizer.step()
                total.add_(loss.detach(), alpha=x.shape[0])  # one kernel
                count += x.shape[0]
            _used_up("data", count, epoch, parallel)
            history.loss.append(_global_mean("data", total, count, parallel))
            check_finite(history.loss[-1], "training", epoch)
            stats = {"loss": history.loss[-1]}
            monitored = history.loss[-1]
            if val is not None:
                history.val_loss.append(
                    _mean_loss(
                        model, val, like.device, epoch, target_check.of_batches("validation_data")
                    )
                )
                check_finite(history.val_loss[-1], "validation", epoch)
                stats["val_loss"] = monitored = history.val_loss[-1]
            bar.update(epoch, stats)
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(monitored)
            elif scheduler is not None:
                scheduler.step()
            stop = False
            if monitored < best - min_delta:
                best, waited, history.best_epoch = monitored, 0, epoch
                if restore_best and (val is not None or patience is not None):
                    best_state = copy.deepcopy(model.state_dict())
            elif patience is not None:
                waited += 1
                stop = patience_stopped = waited >= patience
            if callback is not None:
                history.seconds = time.perf_counter() - start
                resumed = (
                    _targets_resumed(model, target_check)
                    if target_check.paused
                    else contextlib.nullcontext()
                )
                with resumed:
                    answer = callback(epoch + 1, history)
                stop = _asked_to_stop(answer, like.device, parallel) or stop
            if stop:
                history.stopped_early = True
                break
    restored = None
    if best_state is not None and (val is not None or patience_stopped):
        model.load_state_dict(best_state)
        restored = history.best_epoch + 1
    model.eval()
    history.seconds = time.perf_counter() - start
    history.graphed_steps = step.replays if step is not None else 0
    # the last step's update shows in no loss: a model that diverged there is not returned
    # as trained (the parameters the optimizer steps, on whichever devices they live)
    # (those a callback added with add_param_group too; one it froze before the last epoch
    # would have made that epoch's loss non-finite)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    updated = [p for p in trained if id(p) in stepped and not is_lazy(p)]
    finite = [p.detach().isfinite().all() for p in updated]  # launched, then read: one wait
    if not all(bool(flag) for flag in finite):
        raise LossNotFinite("parameters", len(history.loss), math.nan, history, restored)
    return history


DEFAULT_BATCH_SIZE = 128


def _batched_here(data) -> bool:
    """Whether fit batches ``data``: a tensor, an array or a map-style Dataset."""
    return isinstance(data, (torch.Tensor, np.ndarray)) or _map_style(data)


def _batching(data, validation_data, batch_size, shuffle, drop_last) -> tuple[int, bool]:
    """``batch_size`` (128 where None) and ``shuffle`` (True where None), which apply to the
    tensor, array or Dataset data fit batches, as ``drop_last`` does: given for batches of the
    caller's alone (a DataLoader batches and shuffles as it was built), any would be dropped,
    so it is an error."""
    for option, given in (("shuffle", shuffle is not None), ("drop_last", drop_last)):
        if given and not _batched_here(data):
            raise ValueError(
                f"{option} applies to tensor, array or Dataset data, which fit batches; "
                f"{type(data).__name__} data is taken as it comes (a DataLoader batches and "
                f"shuffles as built: {option}=True there)"
            )
    if batch_size is not None and not (_batched_here(data) or _batched_here(validation_data)):
        raise ValueError(
            f"batch_size applies to tensor, array or Dataset data, which fit batches; "
            f"{type(data).__name__} data is taken as it comes (a DataLoader batches as built)"
        )
    return (
        DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
        True if shuffle is None else shuffle,
    )


def _check_callback(callback) -> None:
    """A callable that takes (epoch, history), checked before the first epoch's training."""
    if not callable(callback):
        hint = (
            ": one function, not a list of Keras callbacks"
            if isinstance(callback, list | tuple)
            else ""
        )
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}{hint}")
    try:  # the signature of what fit calls (a functools.wraps wrapper's own)
        signature = inspect.signature(callback, follow_wrapped=False)
    except (TypeError, ValueError, NameError):  # none to read (some builtins, annotations)
        return
    try:
        signature.bind(1, History())
    except TypeError:
        raise TypeError(
            f"callback must take two arguments, (epoch, history), got one with signature "
            f"{signature}"
        ) from None


def _plain_array(name: str, data):
    """An array-like that is not a tensor, array or DataLoader (a pandas or polars DataFrame,
    whose iteration yields its column names) as the numpy array it holds, a TensorDataset as
    its first tensor (the input: the labels beside it are not read; batched whole, not
    collated row by row); anything else as given."""
    if type(data) is TensorDataset:
        if not data.tensors:  # whose len() raises IndexError
            raise ValueError(f"{name} is a TensorDataset of no tensors: it holds no rows")
        _warn_unread_target(data.tensors)  # as its batches would warn
        return data.tensors[0]
    if hasattr(data, "__array__") and not isinstance(data, (torch.Tensor, np.ndarray, DataLoader)):
        return np.asarray(data)
    return data


def _split_off(data, validation_data, share):
    """``data``'s first rows and its last ``share`` of rows (at least one each)."""
    written = share
    share = _checks.finite_number("validation_split", share, low=0, high=1, open_low=True)
    if validation_data is not None:
        raise ValueError("validation_split must be None where validation_data is given")
    if not isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(
            "validation_split holds out the last rows of tensor or array data; for "
            f"{type(data).__name__} data pass validation_data instead"
        )
    rows = data.shape[0] if data.ndim else 0
    # the training rows rounded down, as Keras's, in exact arithmetic on the share as written
    # (0.9 of 10 rows holds out 9, where float64 makes 10 * (1 - 0.9) 0.99999...); a numpy
    # scalar as its own precision writes it (np.float32(0.1) is 0.1, not 0.10000000149)
    exact = isinstance(written, (np.floating, fractions.Fraction))
    split = math.floor(rows * (1 - fractions.Fraction(str(written) if exact else repr(share))))
    if not 0 < split < rows:
        raise ValueError(
            f"validation_split={written} of {rows} rows leaves {split} to train on and "
            f"{rows - split} to validate: both need at least one"
        )
    return data[:split], data[split:]


def _check_adam_dtype(model: nn.Module) -> None:
    """Adam keeps its moment estimates in the parameters' dtype. In float16, 1e-3 g^2 (the
    update of v) rounds to 0 for |g| below about 5e-3 (2^-25 is half the smallest subnormal),
    and so does eps = 1e-8: m / (sqrt(v) + eps) divides by zero at the first step."""
    if any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        raise ValueError(
            "model has float16 parameters, which fit's default Adam cannot train: its moment "
            "estimates would be float16, where 1e-3 g^2 is 0 for gradients below about 5e-3 "
            "and eps = 1e-8 is 0, so its steps divide by zero; train float32 parameters "
            "(under torch.autocast for float16 compute) or bfloat16 ones, or pass an optimizer"
        )


def seed_torch(seed: int, device: torch.device | None = None) -> None:
    """The generators a run on ``device`` draws from seeded with ``seed``: the CPU's, and
    ``device``'s own where it is a CUDA device; other devices' are left as they were, and a
    run on the CPU does not start CUDA. ``device`` None (or another accelerator): every
    generator, as ``torch.manual_seed(seed)`` (on a machine without accelerators, the CPU's
    alone, which is all it seeds there, without its stack trace kept to seed CUDA lazily:
    about 0.1 ms a call)."""
    if device is not None and device.type in ("cpu", "cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.init()
            torch.cuda.default_generators[cuda_index(device)].manual_seed(seed)
    elif torch.accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def cuda_index(device: torch.device) -> int:
    """The index of CUDA device ``device`` (``cuda`` alone: the current device)."""
    return torch.cuda.current_device() if device.index is None else device.index


def default_optimizer(
    model: nn.Module,
    lr: float,
    capturable: bool = False,
    lr_tensor: bool = False,
    weight_decay: float = 0.0,
):
    """``fit``'s Adam: fused where every parameter is on a CUDA device (by PyTorch's design
    the update of all of them in one kernel, plus one for the step counters, where the default
    multi-tensor Adam launches several) or every one on the CPU (one
    vectorized loop a parameter: several times faster than the default single-tensor Adam
    there, ``bench/optimizer_time.py``),
    else PyTorch's default. ``lr_tensor``: the learning rate is a tensor on the parameters'
    device (a CUDA graph reads it from memory at each replay, so a scheduler's updates take
    effect); ``weight_decay``: Adam's L2 penalty on every parameter."""
    devices = {p.device.type for p in model.parameters()}
    fused = devices in ({"cuda"}, {"cpu"})
    if lr_tensor:
        lr = torch.tensor(lr, dtype=torch.float32, device=next(model.parameters()).device)
    return torch.optim.Adam(
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        capturable=capturable,
        fused=fused or None,
    )


_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, ReduceLROnPlateau)


def _scheduler(scheduler, optimizer: torch.optim.Optimizer, cuda_graph: bool, device: torch.device):
    """``fit``'s scheduler, checked: ``scheduler`` or what it builds from ``optimizer``."""
    if scheduler is None:
        return None
    if not isinstance(scheduler, _SCHEDULERS):
        if not callable(scheduler):
            raise TypeError(
                "scheduler must be a torch.optim.lr_scheduler scheduler, a callable that builds "
                f"one from the optimizer, or None; got {type(scheduler).__name__}"
            )
        if isinstance(scheduler, type):
            try:
                inspect.signature(scheduler).bind(optimizer)
            except TypeError as error:
                name = scheduler.__name__
                raise TypeError(
                    f"scheduler={name} (a class) cannot be built from the optimizer alone "
                    f"({error}): pass a scheduler, or a callable such as "
                    f"lambda opt: {name}(opt, ...)"
                ) from error
        built = scheduler(optimizer)
        if not isinstance(built, _SCHEDULERS):
            raise TypeError(
                "scheduler(optimizer) must return a torch.optim.lr_scheduler scheduler, got "
                f"{type(built).__name__}"
            )
        scheduler = built
    if scheduler.optimizer is not optimizer:
        raise ValueError(
            "scheduler steps another optimizer than the one fit trains with: build it on the "
            "optimizer passed to fit, or pass a callable (optimizer -> scheduler)"
        )
    if cuda_graph and not all(
        isinstance(g["lr"], torch.Tensor) and g["lr"].device == device
        for g in optimizer.param_groups
    ):
        raise ValueError(
            "cuda_graph=True with a scheduler needs the optimizer's lr as a tensor on the "
            "model's device (lr=torch.tensor(1e-3, device='cuda')): a CUDA graph replays a "
            "float lr as it was captured, whatever the scheduler sets"
        )
    return scheduler
