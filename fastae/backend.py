"""Backend selection: ``triton`` kernels or the plain-torch ``reference``.

``auto`` picks ``triton`` for CUDA tensors when Triton 3.6 or newer is installed
(:data:`MIN_TRITON`), else ``reference`` (CPU tensors included, even under
``TRITON_INTERPRET=1``: the interpreted kernels run on the CPU only when ``triton`` is asked
for by name). Asking for ``triton`` where it cannot run raises; it never falls back silently.

The requested backend is, first to last: the innermost ``use_backend`` of the calling thread
(a per-thread, per-asyncio-task override), the process-wide default of ``set_backend``, the
``FASTAE_BACKEND`` environment variable, ``auto``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

BACKENDS = ("auto", "triton", "reference")
_ENV_VAR = "FASTAE_BACKEND"
# set_backend's process-wide default: empty, or one name. (tests/conftest.py saves, clears
# and restores this list around each test.)
_override: list[str] = []
# use_backend's override: per thread (a new thread starts without one) and per asyncio task.
_context: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastae_backend", default=None
)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


# The oldest Triton the kernels are tested with (they use triton.knobs, new in 3.4, and
# launch options of 3.6); with an older one ``auto`` takes the reference backend.
MIN_TRITON = (3, 6)


@functools.cache
def triton_missing() -> str:
    """Why fastae's kernels cannot load here ('' when they can): Triton absent, or older than
    :data:`MIN_TRITON`. Read from the installed distribution, without importing Triton."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'fastae[triton]')"
    for distribution in ("triton", "pytorch-triton"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
        if numbers < MIN_TRITON:
            oldest = ".".join(map(str, MIN_TRITON))
            return f"Triton {version} is installed; fastae's kernels need {oldest} or newer"
        break
    return ""


def triton_available() -> bool:
    """True when a Triton that fastae's kernels run on is installed."""
    return not triton_missing()


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read as
    Triton reads it (``true``, ``on``, ``yes`` count; ``false`` does not)."""
    if triton_missing():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def get_backend() -> str:
    """The requested backend: this thread's innermost ``use_backend``, else the ``set_backend``
    default, else ``FASTAE_BACKEND``, else ``auto``."""
    name = _context.get()
    if name is not None:
        return name
    if _override:
        return _override[-1]
    name = os.environ.get(_ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{_ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``auto``, ``triton`` or ``reference``).

    It holds in every thread, over ``FASTAE_BACKEND``, except inside a ``use_backend`` block,
    which wins in its own thread while it lasts; leaving the block does not undo this call.
    """
    _override[:] = [_check_name(name)]


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ``with fastae.use_backend("reference"): ...``.

    The choice holds in the calling thread only (and in the asyncio task that entered it);
    blocks nest, and leaving one restores the choice that held where it was entered.
    """
    token = _context.set(_check_name(name))
    try:
        yield
    finally:
        _context.reset(token)


def _triton_can_run(device: torch.device) -> tuple[bool, str]:
    missing = triton_missing()
    if missing and device.type != "cuda":
        return False, (
            f"{missing}, and its kernels run on CUDA tensors (on the CPU only in Triton's "
            f"interpreter, TRITON_INTERPRET=1, for tests); got a tensor on {device}"
        )
    if missing:
        return False, missing
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreting():
        return True, ""
    return False, (
        f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
        f"got a tensor on {device}"
    )


def resolve(op: str, device: torch.device, supported: bool = True) -> str:
    """The concrete backend (``triton`` or ``reference``) for ``op`` on ``device``.

    ``supported`` says whether a Triton kernel exists for this op and configuration.
    """
    name = get_backend()
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return "reference"
    ok, why = _triton_can_run(device)
    if not supported:
        ok, why = False, f"no Triton kernel implements {op} for this configuration yet"
    if name == "triton":
        if not ok:
            raise RuntimeError(f"backend 'triton' was requested for {op}, but {why}")
        return "triton"
    return "triton" if ok else "reference"  # auto on a CUDA device
