"""The backend the tests run hessmlp's ops on.

HESSMLP_TEST_BACKEND=emulated (set by .ci/cuda_emulated) runs the whole suite with the CPU
kernels of hessmlp's ops replaced by the emulated CUDA build's (hessmlp._C_emulated: the
kernels of csrc/cuda and their launchers, run on the CPU; see csrc/emulated): every test
that calls hessmlp on the CPU then checks the CUDA code's results through the public API.
HESSMLP_TEST_GRID_CAP (default 3 there) caps the launchers' grids, so that every
grid-stride loop goes round several times. Unset or 'native': hessmlp's own CPU kernels.
A test module with NATIVE_BACKEND = True keeps the native kernels (it compares the two).

The emulated build is loaded from HESSMLP_EMULATED_LIB (the path of the library, as
.ci/cuda_emulated sets it: its AddressSanitizer build stays out of the package, where the
README's test command would load it without the sanitizer's runtime), else from
hessmlp._C_emulated built in place.
"""
import contextlib
import os

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

BACKEND = os.environ.get("HESSMLP_TEST_BACKEND", "native")
if BACKEND not in ("native", "emulated"):
    raise ValueError(f"HESSMLP_TEST_BACKEND must be 'native' or 'emulated', got {BACKEND!r}")
GRID_CAP = int(os.environ.get("HESSMLP_TEST_GRID_CAP", "3"))
OPS = ("mlp_jet", "mlp_jet_backward", "stage_derivs", "graph_jet", "graph_jet_backward")

# Compiled code from the caches on disk is keyed by the traced graphs, not by the custom ops'
# schemas and autograd formulas: after a change of hessmlp's ops a cached backward graph
# would call them the old way. The tests compile afresh.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


def load_emulated() -> bool:
    """Loads the emulated build (its ops: torch.ops.hessmlp_emulated); False where there is none."""
    import hessmlp  # noqa: F401  (the schemas of hessmlp first)

    path = os.environ.get("HESSMLP_EMULATED_LIB")
    if path:
        torch.ops.load_library(path)
        return True
    try:
        import hessmlp._C_emulated  # noqa: F401
    except ImportError:
        return False
    return True


if BACKEND == "emulated" and not load_emulated():
    raise ImportError("HESSMLP_TEST_BACKEND=emulated needs the emulated build: bash .ci/cuda_emulated")


@contextlib.contextmanager
def emulated_kernels(grid_cap=0):
    """hessmlp's ops on the CPU run the emulated CUDA kernels while inside (the dispatcher
    takes the latest registration for a key and restores the previous one when it goes)."""
    import warnings

    import hessmlp  # noqa: F401

    lib = torch.library.Library("hessmlp", "IMPL")  # noqa: TOR901
    emulated = torch.ops.hessmlp_emulated
    previous = emulated.set_grid_cap(grid_cap)
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            for op in OPS:
                lib.impl(op, getattr(emulated, op).default, "CPU")
        yield
    finally:
        lib._destroy()
        emulated.set_grid_cap(previous)


@pytest.fixture(autouse=True)
def _backend(request):
    if BACKEND == "emulated" and not getattr(request.module, "NATIVE_BACKEND", False):
        with emulated_kernels(GRID_CAP):
            yield
    else:
        yield
