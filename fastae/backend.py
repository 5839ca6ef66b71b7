"""Backend selection: ``triton`` kernels or the plain-torch ``reference``.

``auto`` picks ``triton`` for CUDA tensors when Triton imports (and for CPU tensors when
``TRITON_INTERPRET=1`` runs the kernels in Triton's interpreter), else ``reference``.
Asking for ``triton`` where it cannot run raises; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")
_ENV_VAR = "FASTAE_BACKEND"
_override: list[str] = []  # stack of set_backend / use_backend choices


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (the kernels exist only then)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def get_backend() -> str:
    """The requested backend: the innermost ``use_backend``/``set_backend``, else the env var."""
    if _override:
        return _override[-1]
    name = os.environ.get(_ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{_ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the backend for the rest of the process (``auto``, ``triton`` or ``reference``)."""
    _check_name(name)
    _override.clear()
    _override.append(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ``with fastae.use_backend("reference"): ...``."""
    _override.append(_check_name(name))
    try:
        yield
    finally:
        _override.pop()


def _triton_can_run(device: torch.device) -> tuple[bool, str]:
    if not triton_available():
        return False, "Triton is not installed (pip install 'fastae[triton]')"
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
    if name == "reference":
        return "reference"
    ok, why = _triton_can_run(device)
    if not supported:
        ok, why = False, f"no Triton kernel implements {op} for this configuration yet"
    if name == "triton":
        if not ok:
            raise RuntimeError(f"backend 'triton' was requested for {op}, but {why}")
        return "triton"
    return "triton" if ok and device.type == "cuda" else "reference"
