"""Small data sets that ship with scikit-learn (no download), scaled for autoencoders."""

from __future__ import annotations

import torch

from fastae import _checks


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digits (1797 x 64) scaled to [0, 1] in ``dtype`` (float16, bfloat16, float32 or
    float64), and their labels. Needs scikit-learn."""
    _checks.float_dtype("dtype", dtype)
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as error:
        raise ImportError("load_digits needs scikit-learn: pip install 'fastae[apps]'") from error
    bunch = _load()
    x = torch.as_tensor(bunch.data / 16.0, dtype=dtype)
    return x, torch.as_tensor(bunch.target)
