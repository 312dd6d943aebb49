"""Python-side registrations of the hessmlp ops: fake (meta) kernels."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)


@torch.library.register_fake("hessmlp::mlp_jet")
def _mlp_jet_fake(x, weights, biases, stage_sizes, act_codes, act_params, mode, method):
    torch._check(x.dim() == 2, lambda: f"hessmlp: x must have shape [B, d], got {tuple(x.shape)}")
    torch._check(len(weights) >= 1, lambda: "hessmlp: weights must hold at least one Linear weight")
    B, d = x.shape
    m = weights[-1].shape[0]
    value = x.new_empty((B, m))
    jac = x.new_empty((B, m, d))
    if mode == "full":
        shape = (B, m, d, d)
    elif mode == "diag":
        shape = (B, m, d)
    elif mode == "trace":
        shape = (B, m)
    elif mode == "none":
        shape = (B, m, 0)
    else:
        raise ValueError(f"hessmlp: mode must be one of 'full', 'diag', 'trace', 'none', got {mode!r}")
    return value, jac, x.new_empty(shape)


@torch.library.register_fake("hessmlp::stage_derivs")
def _stage_derivs_fake(z, act_codes, act_params):
    return z.new_empty((4, *z.shape))


def _no_backward(ctx, *grads):
    raise NotImplementedError(
        "hessmlp: differentiating through hessmlp's results (backward w.r.t. x or the model's "
        "parameters) is not implemented in this version. Compute them under torch.no_grad() or on "
        "detached inputs, or use torch.func for training losses until the backward lands.")


# Until the exact backward is registered, a backward call must fail loudly instead of
# PyTorch's fallback, which silently treats the op as constant.
torch.library.register_autograd("hessmlp::mlp_jet", _no_backward)
torch.library.register_autograd("hessmlp::stage_derivs", _no_backward)
