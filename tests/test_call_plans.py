"""The plans of eager calls (api._ChainCall, _graph_reader's fixed tensors): a planned call
must follow every change of the model that a fresh read would see, never a stale answer."""
import pytest
import torch
from torch import nn

import hessmlp
from hessmlp import api

from helpers import assert_rel_close


def _mlp(act=nn.Tanh, dtype=torch.float64, m=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, m)).to(dtype)


def _ref(model, x):
    return torch.func.vmap(torch.func.hessian(model))(x)


def _check(model, x, output=None):
    H = _ref(model, x)
    if output is not None:
        H = H[:, output]
    assert_rel_close(hessmlp.hessian(model, x, output=output), H, x.dtype, "hessian")
    assert_rel_close(hessmlp.laplacian(model, x, output=output),
                     H.diagonal(dim1=-2, dim2=-1).sum(-1), x.dtype, "laplacian")


def _planned(model):
    return bool(api._CALLS.get(model))


@pytest.mark.parametrize("output", [None, 1])
def test_plans_follow_the_model(output):
    model = _mlp()
    x = torch.randn(9, 3, dtype=torch.float64)
    _check(model, x, output)
    assert _planned(model)
    # a parameter replaced by another of the same shape
    model[0].weight = nn.Parameter(torch.randn(16, 3, dtype=torch.float64))
    _check(model, x, output)
    # .data swapped (same Parameter object, new storage)
    model[4].weight.data = torch.randn(2, 16, dtype=torch.float64)
    model[4].bias.data = torch.randn(2, dtype=torch.float64)
    _check(model, x, output)
    # an optimizer's step (in place)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hessmlp.laplacian(model, x).sum().backward()
    opt.step()
    _check(model, x, output)
    # an activation replaced, a hyperparameter changed
    model[1] = nn.Softplus(beta=2.0)
    _check(model, x, output)
    model[1].beta = 0.5
    _check(model, x, output)
    # a bias removed, then a Linear of another width
    model[2].bias = None
    _check(model, x, output)
    model[2] = nn.Linear(16, 16, dtype=torch.float64)
    _check(model, x, output)
    # requires_grad switched off: the parameter may now be read as a constant
    for p in model.parameters():
        p.requires_grad_(False)
    _check(model, x, output)


def test_plans_follow_dtype_device_and_shape_changes():
    model = _mlp(dtype=torch.float32)
    x32 = torch.randn(7, 3)
    _check(model, x32)
    model.double()  # (.data replaced in place: the same Parameters)
    x = x32.double()
    _check(model, x)
    with pytest.raises(TypeError, match="float32"):
        hessmlp.laplacian(model, x32)
    # a weight's data of another shape (width of the hidden layer changed through .data)
    model[2].weight.data = torch.randn(16, 16, dtype=torch.float64)
    _check(model, x)
    model[0].weight.data = torch.randn(16, 3, dtype=torch.float64)
    _check(model, x)


def test_plans_per_batch_size_gradient_and_budget():
    model = _mlp()
    for B in (1, 5, 40):
        x = torch.randn(B, 3, dtype=torch.float64)
        _check(model, x)
    x = torch.randn(40, 3, dtype=torch.float64)
    ref = hessmlp.laplacian(model, x)
    # gradients through a planned call, w.r.t. x and the parameters
    xg = x.clone().requires_grad_(True)
    params = list(model.parameters())
    g = torch.autograd.grad(hessmlp.laplacian(model, xg).square().sum(), [xg] + params,
                            allow_unused=True, materialize_grads=True)

    def loss(xx, *ps):
        names = [n for n, _ in model.named_parameters()]
        f = lambda v: torch.func.functional_call(model, dict(zip(names, ps)), (v,))  # noqa: E731
        H = torch.func.vmap(torch.func.hessian(f))(xx)
        return H.diagonal(dim1=-2, dim2=-1).sum(-1).square().sum()

    ref_g = torch.autograd.grad(loss(xg, *params), [xg] + params, allow_unused=True,
                                materialize_grads=True)
    for a, b in zip(g, ref_g):
        assert_rel_close(a, b, torch.float64, "gradient")
    # a memory budget set after the plan: the call is computed in chunks, or refused
    with hessmlp.memory_budget(20_000):
        assert_rel_close(hessmlp.laplacian(model, x), ref, torch.float64, "chunks")
    with hessmlp.memory_budget(10):
        with pytest.raises(MemoryError):
            hessmlp.laplacian(model, x)
    assert_rel_close(hessmlp.laplacian(model, x), ref, torch.float64, "after")


def test_derived_tensors_are_read_every_call():
    """Weight norm computes its weight from g and v: never a fixed tensor."""
    torch.manual_seed(1)
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(3, 8))
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    _check(model, x)
    with torch.no_grad():
        lin.parametrizations.weight.original0.mul_(3.0)
    _check(model, x)


def test_a_bad_output_is_refused_every_time():
    model = _mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    hessmlp.laplacian(model, x, output=1)
    for _ in range(2):
        with pytest.raises(ValueError, match="out of range"):
            hessmlp.laplacian(model, x, output=5)


def test_the_c_fingerprint_is_the_python_one_and_sees_every_change():
    """hessmlp._C's walk builds the same key as the Python walk, and its comparison with a
    kept key sees each kind of change the key holds."""
    from hessmlp import _spec

    class Siren(nn.Module):
        w0 = 30.0

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.c = None

    inner = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(beta=float("nan")))
    inner[0].weight.requires_grad_(False)
    inner.register_buffer("buf", torch.zeros(3))
    inner.extra = [1, 2.5, torch.zeros(2)]
    hook = inner[1].register_forward_hook(lambda *a: None)
    model = nn.Sequential(Siren(), inner)
    key = _spec._fingerprint(model)
    assert key == _spec._fingerprint_py(model)
    assert _spec._fingerprint_matches(model, key)
    changes = [
        lambda: setattr(inner[3], "beta", 2.0),
        lambda: inner[0].weight.requires_grad_(True),
        lambda: inner[0].weight.requires_grad_(False),  # (version 0 again: still a change)
        lambda: inner.buf.add_(1),
        hook.remove,
        lambda: setattr(Siren, "w0", 31.0),
        lambda: model.train(False),
        lambda: setattr(inner, "extra", [1, 2.5]),
        lambda: inner.register_buffer("b2", None),
        lambda: setattr(inner[2], "weight", nn.Parameter(torch.zeros(8, 8))),
        lambda: inner.add_module("more", nn.Tanh()),
        lambda: delattr(inner, "more"),
    ]
    for i, change in enumerate(changes):
        change()
        assert not _spec._fingerprint_matches(model, key), f"change {i} not seen"
        key = _spec._fingerprint(model)
        assert key == _spec._fingerprint_py(model), f"change {i}: the walks differ"
        assert _spec._fingerprint_matches(model, key)
    # a TorchScript module: the C walk steps aside, the Python one names it
    with pytest.raises(hessmlp.UnsupportedModelError, match="TorchScript"):
        _spec._fingerprint(nn.Sequential(torch.jit.script(nn.Linear(2, 2))))
