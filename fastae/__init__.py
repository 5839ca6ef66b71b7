"""fastae: fast regularized autoencoders (sparse, denoising, contractive) for PyTorch."""

from . import ops
from .backend import get_backend, set_backend, use_backend
from .graphs import GraphedStep
from .modules import Autoencoder, AutoencoderOutput, DeepAutoencoder, KLSparsity, L1Sparsity
from .noise import GaussianNoise, MaskingNoise, SaltPepperNoise
from .training import History, LossNotFinite, fit
from .vae import VAE, VAEOutput

__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "DeepAutoencoder",
    "GaussianNoise",
    "GraphedStep",
    "History",
    "KLSparsity",
    "L1Sparsity",
    "LossNotFinite",
    "MaskingNoise",
    "SaltPepperNoise",
    "VAE",
    "VAEOutput",
    "fit",
    "get_backend",
    "ops",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"

# Estimators that need scikit-learn (the ``apps`` extra) load on first use, so that
# ``import fastae`` needs only torch and numpy.
_LAZY = {
    "AutoencoderTransformer": "sklearn",
    "AutoencoderOutlierDetector": "sklearn",
    "SemiSupervisedAutoencoder": "applications",
    "StackedAutoencoder": "applications",
    "DECClustering": "applications",
    "cluster_codes": "applications",
    "neg_reconstruction_error": "sklearn",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names where scikit-learn is installed (without it, reading one raises the
    ImportError that names the extra: help(fastae) and inspect list only what loads)."""
    import importlib.util

    try:
        installed = importlib.util.find_spec("sklearn") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or None in sys.modules
        installed = False
    return sorted(set(globals()) | (set(_LAZY) if installed else set()))
