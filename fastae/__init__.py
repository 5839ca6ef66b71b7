"""fastae: fast regularized autoencoders (sparse, denoising, contractive) for PyTorch."""

from . import ops
from .backend import get_backend, set_backend, use_backend
from .modules import Autoencoder, AutoencoderOutput, KLSparsity, L1Sparsity
from .noise import GaussianNoise, MaskingNoise, SaltPepperNoise
from .training import History, fit

__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "GaussianNoise",
    "History",
    "KLSparsity",
    "L1Sparsity",
    "MaskingNoise",
    "SaltPepperNoise",
    "fit",
    "get_backend",
    "ops",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"
