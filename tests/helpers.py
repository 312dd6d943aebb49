"""Shared test helpers: devices x dtypes, tolerances, random networks, torch.func references."""
import random

import pytest
import torch
from torch import nn

import hessmlp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]
# Relative to the largest entry of the reference: tight enough to catch any wrong formula.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-4}

# (name, module factory) for every supported activation, with non-default parameters too.
ACTIVATIONS = [
    ("tanh", nn.Tanh),
    ("sigmoid", nn.Sigmoid),
    ("softplus", nn.Softplus),
    ("softplus_b2_t1", lambda: nn.Softplus(beta=2.0, threshold=1.0)),
    ("silu", nn.SiLU),
    ("gelu", nn.GELU),
    ("gelu_tanh", lambda: nn.GELU(approximate="tanh")),
    ("relu", nn.ReLU),
    ("leaky_relu", lambda: nn.LeakyReLU(0.2)),
    ("elu", lambda: nn.ELU(alpha=0.7)),
    ("identity", nn.Identity),
    ("sine", lambda: hessmlp.Sine(1.7)),
]


def assert_rel_close(actual, expected, dtype, what=""):
    """max|a - e| <= rtol * max(max|e|, 1): relative to the result's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    expected = expected.to(actual.device)
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= RTOL[dtype] * scale, f"{what}: max error {err:.3e} > {RTOL[dtype]:.1e} * {scale:.3e}"
    return err / scale


def random_mlp(d, widths, m, act_factory, bias=True, dtype=torch.float64, device="cpu", seed=0,
               final_act=False):
    torch.manual_seed(seed)
    sizes = [d] + list(widths) + [m]
    layers = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
        with torch.no_grad():  # weights large enough to reach the curved parts
            lin.weight.normal_(0.0, 1.2 / sizes[i] ** 0.5)
            if bias:
                lin.bias.normal_(0.0, 0.5)
        layers.append(lin)
        if i < len(sizes) - 2 or final_act:
            layers.append(act_factory())
    return nn.Sequential(*layers).to(dtype=dtype, device=device)


def func_reference(model, x):
    """value (B, m), jacobian (B, m, d), hessian (B, m, d, d) by torch.func."""
    f = lambda xi: model(xi)  # noqa: E731
    with torch.no_grad():
        value = model(x)
    jac = torch.func.vmap(torch.func.jacrev(f))(x).detach()
    hess = torch.func.vmap(torch.func.hessian(f))(x).detach()
    return value.detach(), jac, hess


def func_jet(model, params, x, mode):
    """[value, jacobian, second-order part for mode] by torch.func, differentiable w.r.t.
    ``params`` (a dict name -> tensor of the model's parameters) and ``x``."""
    def f(p, xi):
        return torch.func.functional_call(model, p, (xi,))

    value = torch.func.vmap(f, in_dims=(None, 0))(params, x)
    jac = torch.func.vmap(torch.func.jacrev(f, argnums=1), in_dims=(None, 0))(params, x)
    out = [value, jac]
    if mode is not None:
        hess = torch.func.vmap(torch.func.hessian(f, argnums=1), in_dims=(None, 0))(params, x)
        diag = hess.diagonal(dim1=-2, dim2=-1)
        out.append({"full": hess, "diag": diag, "trace": diag.sum(-1)}[mode])
    return out


def random_configs(seed, depths, d_max, widths, m_max, per_depth=2):
    """Random (d, widths, m, bias, final_act) network shapes, per_depth for each depth."""
    rng = random.Random(seed)
    out = []
    for depth in depths:
        for _ in range(per_depth):
            d = rng.randint(1, d_max)
            hidden = [rng.choice(widths) for _ in range(depth - 1)]
            out.append((d, hidden, rng.randint(1, m_max), rng.random() < 0.7, rng.random() < 0.3))
    return out
