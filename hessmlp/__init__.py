"""hessmlp: exact closed-form input Hessians of fully-connected networks."""
import warnings

with warnings.catch_warnings():
    # torch warns on import when NumPy is not installed; hessmlp does not use NumPy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401
from . import _ops  # noqa: F401
from ._spec import UnsupportedModelError, network_of
from .api import (Jet, hessian, hessian_diag, hvp, jacobian, jet, laplacian, memory_budget,
                  set_memory_budget)
from .nn import MLP, AdaptiveScale, FourierFeatures, ModifiedMLP, ResidualMLP, Sine

__version__ = "0.1.0"

__all__ = ["hessian", "hessian_diag", "laplacian", "jacobian", "hvp", "jet", "Jet", "MLP", "Sine",
           "ResidualMLP", "FourierFeatures", "ModifiedMLP", "AdaptiveScale",
           "UnsupportedModelError", "network_of", "set_memory_budget", "memory_budget"]
