"""Argument checks shared by the ops and modules: errors name the argument."""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Mapping, Set

import numpy as np
import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


# warnings.catch_warnings swaps the process-wide list of filters (before Python 3.14): fastae's
# own uses take turns, else two threads would put back each other's lists and leave a filter
_FILTERS = threading.RLock()


@contextlib.contextmanager
def ignoring(message: str):
    """Warnings whose message starts with ``message`` ignored inside (a thread at a time)."""
    with _FILTERS, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message)
        yield


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """A warning (``category``) at the first line outside fastae (and scikit-learn, whose
    mixins call the estimators' fit: fit_transform) on the stack: the line of the user's call,
    however deep in the packages the warning is found."""
    packages = [_PACKAGE]
    if "sklearn" in sys.modules and sys.modules["sklearn"].__file__:
        packages.append(os.path.dirname(os.path.abspath(sys.modules["sklearn"].__file__)) + os.sep)
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        tuple(packages)
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def dense(name: str, value: torch.Tensor) -> None:
    if value.layout != torch.strided or value.is_nested:
        kind = "nested" if value.is_nested else str(value.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} one")


def unmasked(name: str, value: np.ndarray) -> np.ndarray:
    """A numpy masked array as its plain data where nothing is masked; one that masks values
    is refused (fastae reads no mask: it would train on, or score, what lies under it)."""
    if not isinstance(value, np.ma.MaskedArray):
        return value
    masked = int(np.ma.count_masked(value))
    if masked:
        raise ValueError(
            f"{name} is a masked array with {masked} masked values, and fastae reads no mask: "
            f"fill them ({name}.filled(value)) or leave out the rows that hold them"
        )
    return value.data


def tensor(name: str, value: object, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dense(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got dtype {value.dtype}"
        )
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def float_dtype(name: str, value: object, none: bool = False) -> torch.dtype | None:
    """A floating-point torch.dtype fastae computes in; with ``none``, None (torch's default)
    too (a module's ``dtype=``)."""
    if (value is None and not none) or (value is not None and value not in FLOAT_DTYPES):
        raise TypeError(
            f"{name} must be {'None or ' if none else ''}a floating-point torch.dtype "
            f"(torch.float16, torch.bfloat16, torch.float32, torch.float64), got {value!r}"
        )
    return value


def same_kind(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if value.dtype != like.dtype:
        raise TypeError(
            f"{name} must have the dtype of {like_name} ({like.dtype}), got {value.dtype}"
        )
    if value.device != like.device:
        raise ValueError(
            f"{name} must be on the device of {like_name} ({like.device}), got {value.device}"
        )


def size(name: str, value: torch.Tensor, dim: int, expected: int, why: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name} must have size {expected} in dim {dim} ({why}), got shape {tuple(value.shape)}"
        )


_AUTOCAST_KINDS = (torch.float16, torch.bfloat16, torch.float32)


def autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


# a constant of a compiled graph (what torch.compiler.assume_constant_result sets, without
# importing torch._dynamo here): Dynamo in torch 2.11 cannot trace
# torch.amp.is_autocast_available itself
autocast_available._dynamo_marked_constant = True


def autocast_together(
    value: torch.Tensor, like: torch.Tensor, device: torch.device | None = None
) -> bool:
    """Whether inside ``torch.autocast`` for their device the dtypes of ``value`` and ``like``
    pass together: float16, bfloat16 and float32, which the ops cast to the autocast dtype (a
    layer before the model under autocast hands it bfloat16 activations). ``device``: where
    ``value`` is going (a batch on the host, before its copy), where it is if None."""
    device = value.device if device is None else device
    return (
        value.dtype in _AUTOCAST_KINDS
        and like.dtype in _AUTOCAST_KINDS
        and device == like.device
        and autocast_available(device.type)
        and torch.is_autocast_enabled(device.type)
    )


def model_kind(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """:func:`same_kind`, but for dtypes that pass together under autocast
    (:func:`autocast_together`)."""
    if not autocast_together(value, like):
        same_kind(name, value, like_name, like)


def rows(name: str, value: torch.Tensor) -> None:
    if value.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(value.shape)}")


def model_input(x: object, weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """x (B, in_features), B >= 1, with the dtype (up to autocast: :func:`model_kind`) and
    device of the model's weight."""
    x = tensor("x", x, 2)
    model_kind("x", x, "the model's parameters", weight)
    size("x", x, 1, in_features, "the model's in_features")
    rows("x", x)
    return x


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def positive_int(name: str, value: object) -> int:
    """An integer >= 1 (Python or numpy, not bool) as a Python int; below 2**63, as torch's
    sizes and counts are."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value >= 2**63:
        raise ValueError(f"{name} must be below 2**63, got {value!r}")
    return int(value)


def widths(name: str, value: object, empty: bool = False, one: bool = False) -> tuple[int, ...]:
    """A sequence of layer widths (positive ints) as a tuple; ``empty``: () is allowed;
    ``one``: the message says a single int is allowed too (the caller took it)."""
    kind = "a sequence" if empty else "a non-empty sequence"
    kind = f"a positive int or {kind}" if one else kind
    if isinstance(value, (Set, Mapping)):  # no order to take the layers in
        raise TypeError(f"{name} must be {kind} (a tuple or list) of positive ints, got {value!r}")
    try:
        length = None if isinstance(value, (str, bytes)) else len(value)
    except TypeError:  # no __len__, or a 0-d tensor or array's
        length = None
    if length is None or not (empty or length):
        raise TypeError(f"{name} must be {kind} of positive ints, got {value!r}")
    return tuple(positive_int(f"{name}[{i}]", width) for i, width in enumerate(value))


def cpu_or_cuda(name: str, value: object, expected: str) -> torch.device:
    """``value`` as a torch.device of the CPU or CUDA; ``expected`` says what may be given."""
    try:
        device = torch.device(value)
    except (TypeError, RuntimeError, ValueError) as error:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return device


def generator(name: str, value: object) -> torch.Generator | None:
    """A torch.Generator or None."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def flag(name: str, value: object) -> bool:
    """A bool or numpy bool as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def verbosity(name: str, value: object) -> bool:
    """A verbosity as scikit-learn's estimators take it (a bool or an int >= 0) as a bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a bool or an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a bool or an int >= 0, got {value!r}")
    return value > 0


def finite_number(
    name: str, value: object, *, low=None, high=None, open_low=False, float32=False
) -> float:
    """A real number (Python or numpy, not bool) as a finite Python float; with ``float32``,
    also finite in float32 (a weight or rate of the training math, which runs there)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError as error:  # an int beyond float64
        bits = int(value).bit_length()
        raise ValueError(f"{name} must be finite, got an int of {bits} bits") from error
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if float32 and abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.6g}), got {value}"
        )
    if low is not None and (value <= low if open_low else value < low):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")
    return value


def steps_without_closure(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose ``step`` needs a closure (L-BFGS re-evaluates the loss),
    which a training loop that calls ``optimizer.step()`` cannot give."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: let the step say
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        name = type(optimizer).__name__
        raise TypeError(
            f"optimizer must step without a closure (optimizer.step()), but {name}.step "
            "needs one that recomputes the loss: write that loop yourself (the closure zeroes "
            "the gradients, computes model(x).loss and calls its backward)"
        )


def model_loss(output: object) -> torch.Tensor:
    """``output.loss`` of a model's forward, as ``fastae.fit`` and ``GraphedStep`` train it."""
    loss = getattr(output, "loss", None)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TypeError(
            "model's forward must return an object whose .loss is a scalar tensor, as fastae's "
            f"models do; got {type(output).__name__}"
        )
    return loss
