"""Input-corruption specs for denoising autoencoders.

Every random number is a pure function of ``(seed, row * d + col)`` through Philox, the
stream of Triton's ``tl.rand``/``tl.randn`` (see :mod:`fastae.philox`), so the kernels and the
reference produce the same corruption and backward regenerates masks instead of storing them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch

from . import _checks

SEED_BOUND = 2**63 - 1  # seeds are int64 scalars in the op schemas


def _finite(name: str, value: object) -> float:
    """``value`` as a float that is finite in float32 (where the corruption is computed)."""
    return _checks.finite_number(name, value, float32=True)


def _probability(name: str, value: object) -> float:
    """``value`` in [0, 1) as a float that stays below 1 in float32 (where the corruption is
    computed: 1 - 2^-26 would round to 1 there, and a rescaled mask divide by 0)."""
    value = _finite(name, value)
    if not (value >= 0.0 and torch.tensor(value, dtype=torch.float32, device="cpu").item() < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (below 1 in float32), got {value!r}")
    return value


def check_seed(seed: object) -> int | None:
    """``seed`` as an int in [0, 2**63 - 1], or None (draw one); else TypeError/ValueError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return int(seed)


def draw_seed() -> int:
    """A fresh seed from torch's (CPU) generator, so ``torch.manual_seed`` makes runs
    repeatable."""
    return int(torch.randint(0, 2**62, (), device="cpu").item())


class _Noise:
    """A corruption spec. ``seed``: None draws a fresh seed from torch's generator at each
    call (``torch.manual_seed`` makes runs repeatable); an int gives the same corruption at
    every call (``fastae.fit`` warns: each batch row would see one fixed mask)."""

    kind: str
    seed: int | None

    def with_seed(self, seed: int | None = None):
        """This spec with a concrete seed: ``seed`` if given, its own, or a fresh draw."""
        if seed is None:
            seed = self.seed if self.seed is not None else draw_seed()
        return replace(self, seed=check_seed(seed))

    def params(self) -> tuple[str, float, float, float]:
        """(kind, level, low, high) as the ops' schemas take them."""
        raise NotImplementedError


@dataclass(frozen=True)
class GaussianNoise(_Noise):
    """x~ = x + sigma * eps, eps ~ N(0, 1) (Box-Muller on Philox, as ``tl.randn``).
    ``seed``: see the base class (None: a fresh draw each call)."""

    sigma: float
    seed: int | None = None
    kind = "gaussian"

    def __post_init__(self):
        sigma = _finite("sigma", self.sigma)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "seed", check_seed(self.seed))

    def params(self):
        return "gaussian", self.sigma, 0.0, 0.0


@dataclass(frozen=True)
class MaskingNoise(_Noise):
    """x~ = x * m, m ~ Bernoulli(1 - p); with ``rescale`` x~ = x * m / (1 - p) (dropout).
    ``seed``: see the base class (None: a fresh draw each call)."""

    p: float
    rescale: bool = False
    seed: int | None = None
    kind = "masking"

    def __post_init__(self):
        p = _probability("p", self.p)
        object.__setattr__(self, "rescale", _checks.flag("rescale", self.rescale))
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "seed", check_seed(self.seed))

    def params(self):
        return ("masking_rescale" if self.rescale else "masking"), self.p, 0.0, 0.0


@dataclass(frozen=True)
class SaltPepperNoise(_Noise):
    """With probability p an entry becomes ``low`` or ``high`` (1/2 each), else stays.
    ``seed``: see the base class (None: a fresh draw each call)."""

    p: float
    low: float = 0.0
    high: float = 1.0
    seed: int | None = None
    kind = "salt_pepper"

    def __post_init__(self):
        p = _probability("p", self.p)
        low, high = _finite("low", self.low), _finite("high", self.high)
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "seed", check_seed(self.seed))

    def params(self):
        return "salt_pepper", self.p, self.low, self.high


Noise = GaussianNoise | MaskingNoise | SaltPepperNoise


def check_noise(noise: object, optional: bool = True) -> Noise | None:
    """``noise`` itself when it is one of the three specs, or None where ``optional``; else
    TypeError."""
    specs = (GaussianNoise, MaskingNoise, SaltPepperNoise)
    if isinstance(noise, specs) or (optional and noise is None):
        return noise
    allowed = "GaussianNoise, MaskingNoise or SaltPepperNoise"
    allowed = f"None, {allowed}" if optional else allowed
    raise TypeError(f"noise must be {allowed}, got {type(noise).__name__}")
