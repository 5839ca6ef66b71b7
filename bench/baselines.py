"""The eager PyTorch baselines of the benchmarks: they live in :mod:`fastae.baselines` (so that
``python -m fastae bench`` runs from an installed package) and are re-exported here."""

from fastae.baselines import *  # noqa: F403
from fastae.baselines import __all__  # noqa: F401
