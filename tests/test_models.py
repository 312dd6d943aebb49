"""Which models are accepted (Sequential, torch.fx chains) and which are refused, by name."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessmlp
from hessmlp import UnsupportedModelError

from helpers import assert_rel_close, func_reference

f64 = torch.float64


class PinnMLP(nn.Module):
    """The common PINN code: a ModuleList of Linear layers and torch function activations."""

    def __init__(self, sizes, act="tanh"):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = act

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = layer(x)
            x = torch.tanh(x) if self.act == "tanh" else F.silu(x)
        return self.layers[-1](x)


class Siren(nn.Module):
    def __init__(self, d, width, m, w0=30.0):
        super().__init__()
        self.first = nn.Linear(d, width)
        self.hidden = nn.Linear(width, width)
        self.last = nn.Linear(width, m)
        self.w0 = w0

    def forward(self, x):
        h = torch.sin(self.w0 * self.first(x))
        h = torch.sin(self.w0 * self.hidden(h))
        return self.last(h)


class Mixed(nn.Module):
    """Method calls, F.* with keyword arguments, scalar arithmetic on both sides, input scaling."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 8, bias=False)
        self.c = nn.Linear(8, 2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = (x - 0.5) / 2.0
        h = self.a(2.0 * x).tanh()
        h = F.softplus(h, beta=2.0, threshold=5.0) + 1.0
        h = 1.5 - self.drop(self.b(h))
        h = F.leaky_relu(h, negative_slope=0.2)
        h = F.gelu(h, approximate="tanh") * 0.5
        h = F.elu(-h, alpha=0.5)
        h = F.linear(h, self.c.weight, self.c.bias)
        return torch.sigmoid(h)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 6), nn.SiLU(), nn.Sequential(nn.Linear(6, 6), nn.GELU()))
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("make, d", [
    (lambda: PinnMLP([2, 16, 16, 1]), 2),
    (lambda: PinnMLP([3, 8, 8, 8, 2], act="silu"), 3),
    (lambda: Siren(2, 16, 1), 2),
    (lambda: Mixed().eval(), 3),
    (lambda: Nested(), 2),
    (lambda: nn.Sequential(nn.Linear(3, 5), nn.Sequential(nn.Tanh(), nn.Linear(5, 5)), nn.Dropout(0.3),
                           nn.Softplus(), nn.Identity(), nn.Linear(5, 2)).eval(), 3),
    (lambda: nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False),
                           nn.Linear(4, 1, bias=False), nn.Sigmoid()), 3),
    (lambda: hessmlp.MLP(4, [10, 10], 3, activation="sine"), 4),
    (lambda: hessmlp.MLP(2, [], 1, activation="tanh", final_activation="tanh"), 2),
    (lambda: nn.Linear(3, 2), 3),
])
def test_accepted_models(make, d):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(6, d, dtype=f64)
    value, jac, hess = func_reference(model, x)
    for method in ("forward", "reverse"):
        r = hessmlp.jet(model, x, method=method)
        assert_rel_close(r.value, value, f64, "value")
        assert_rel_close(r.jacobian, jac, f64, "jacobian")
        assert_rel_close(r.hessian, hess, f64, "hessian")
    assert_rel_close(hessmlp.laplacian(model, x), hess.diagonal(dim1=-2, dim2=-1).sum(-1), f64)


def test_linear_model_gives_exact_zero_hessian():
    # The forum's "One of the differentiated Tensors appears to not have been used" trap.
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=f64)
    for method in ("forward", "reverse"):
        H = hessmlp.hessian(model, x, method=method)
        assert H.shape == (5, 2, 4, 4) and torch.equal(H, torch.zeros_like(H))
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    assert torch.equal(hessmlp.laplacian(relu, x), torch.zeros(5, 1, dtype=f64))


def test_forum_linear_squared_loss():
    # Hessian w.r.t. x of (w.x + b - t)^2 for a 4-input Linear: 2 w w^T.
    lin = nn.Linear(4, 1).double()

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return (self.lin(x) - 0.3) ** 2

    x = torch.randn(4, dtype=f64)
    H = hessmlp.hessian(Loss(), x, output=0)
    w = lin.weight.detach()[0]
    assert_rel_close(H, 2 * torch.outer(w, w), f64)
    assert_rel_close(H, torch.autograd.functional.hessian(lambda v: Loss()(v)[0], x), f64)


def test_forum_x_squared_times_arange():
    # f(x) = sum(x * x * arange(4)) as a chain: identity Linear, square, Linear(arange).
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Module(), nn.Linear(4, 1, bias=False)).double()

    class Square(nn.Module):
        def forward(self, h):
            return h * h

    model[1] = Square()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[2].weight.copy_(torch.arange(4.0).unsqueeze(0))
    x = torch.randn(4, dtype=f64)
    expected = torch.autograd.functional.hessian(lambda v: (v * v * torch.arange(4.0, dtype=f64)).sum(), x)
    H = hessmlp.hessian(model, x, output=0)
    assert torch.equal(H, torch.diag(2 * torch.arange(4.0, dtype=f64)))
    assert_rel_close(H, expected, f64)


def test_forum_784_classifier_class_2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10)).double()
    x = torch.randn(784, dtype=f64) * 0.1
    H = hessmlp.hessian(model, x, output=2)
    assert H.shape == (784, 784)
    expected = torch.autograd.functional.hessian(lambda v: model(v)[2], x)
    assert_rel_close(H, expected, f64)


# ------------------------------------------------------------------ refusals

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return x + torch.tanh(self.a(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x, t):
        return self.a(torch.cat([x, t], -1))


class Adaptive(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 4)
        self.slope = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.slope * self.a(x)))


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


class SinFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x):
        return self.a(torch.sin(x))


class Cubed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x):
        return self.a(x) ** 3


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), r"BatchNorm1d at model\[1\]"),
    (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)), r"LayerNorm at model\[1\]"),
    (nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Hardswish()), nn.Linear(4, 1)),
     r"Hardswish at model\[1\]\[1\]"),
    (nn.Sequential(nn.Conv1d(1, 1, 3)), r"Conv1d at model\[0\]"),
    (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).train(), r"Dropout.*training mode"),
    (nn.Sequential(nn.Tanh()), "no nn.Linear"),
    (nn.Sequential(), "no nn.Linear"),
    (TwoInputs(), "exactly one tensor input"),
    (ControlFlow(), "could not trace ControlFlow"),
    (Cubed(), r"power other than h \*\* 2"),
])
def test_refused_by_name(model, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        hessmlp.hessian(model, torch.randn(2, 3 if not isinstance(model, (TwoInputs, ControlFlow,
                                                                         Cubed)) else 2))
    msg = str(info.value)
    assert "README" in msg or "training mode" in msg or "no nn.Linear" in msg \
        or "before the first Linear" in msg
    assert len(msg) < 600, msg  # the cause and what to do, not a list of everything


@pytest.mark.parametrize("make, d", [(Residual, 3), (Adaptive, 2), (SinFirst, 2)],
                         ids=["residual", "learnable_slope", "sin_before_the_first_linear"])
def test_graph_networks_once_refused(make, d):
    """Read as graph networks now (docs/design.md §9): the Hessian against torch.func."""
    model = make().double()
    x = torch.randn(4, d, dtype=f64)
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    want = torch.func.vmap(torch.func.hessian(f))(x).detach()
    assert_rel_close(hessmlp.hessian(model, x), want, f64, make.__name__)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hessmlp.hessian(lambda x: x, torch.randn(2, 3))


def test_fx_cache_follows_parameter_updates_and_train_mode():
    model = PinnMLP([2, 8, 1]).double()
    x = torch.randn(3, 2, dtype=f64)
    h1 = hessmlp.hessian(model, x)
    with torch.no_grad():
        model.layers[0].weight.mul_(2.0)
    h2 = hessmlp.hessian(model, x)
    assert_rel_close(h2, func_reference(model, x)[2], f64)
    assert not torch.equal(h1, h2)


def test_structure_cache_follows_edits_and_train_mode():
    seq = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(3, 2, dtype=f64)
    hessmlp.hessian(seq, x)
    seq.append(nn.Tanh())  # a Sequential is read again on every eager call
    assert_rel_close(hessmlp.hessian(seq, x), func_reference(seq, x)[2], f64)

    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.drop = nn.Linear(2, 4), nn.Linear(4, 1), nn.Dropout(0.5)

        def forward(self, x):
            return self.b(self.drop(torch.tanh(self.a(x))))

    model = WithDropout().double().eval()
    assert_rel_close(hessmlp.hessian(model, x), func_reference(model, x)[2], f64)
    model.train()
    with pytest.raises(UnsupportedModelError, match="training mode"):
        hessmlp.hessian(model, x)
    model.eval()
    assert_rel_close(hessmlp.hessian(model, x), func_reference(model, x)[2], f64)


def test_mlp_builder():
    net = hessmlp.MLP(3, hidden=[8, 8], out_features=2, activation="gelu_tanh")
    assert isinstance(net, nn.Sequential) and len(net) == 5
    assert isinstance(net[1], nn.GELU) and net[1].approximate == "tanh"
    with pytest.raises(ValueError, match="activation must be one of"):
        hessmlp.MLP(3, [4], 1, activation="swishy")
    with pytest.raises(ValueError, match=r"hidden\[1\]"):
        hessmlp.MLP(3, [4, 0], 1)
    net = hessmlp.MLP(3, [4], 1, activation=nn.Softplus(beta=3.0))
    assert net[1].beta == 3.0


def test_affine_runs_are_merged_and_long_stages_refused():
    class ManyAffine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = self.a(x)
            for _ in range(12):
                h = h * 1.1 + 0.1
            return self.b(torch.tanh(h))

    model = ManyAffine().double()
    net = hessmlp.network_of(model)
    assert [a.name for a in net.stages[0]] == ["affine", "tanh"]
    x = torch.randn(3, 2, dtype=f64)
    assert_rel_close(hessmlp.hessian(model, x), func_reference(model, x)[2], f64)

    # More functions between two Linear layers than a chain's stage holds: a graph network of
    # consecutive stages (network_of describes chains only).
    deep = nn.Sequential(nn.Linear(2, 3), *[nn.Tanh() for _ in range(9)], nn.Linear(3, 1)).double()
    with pytest.raises(UnsupportedModelError, match=r"is not a chain of Linear layers with at most 8"):
        hessmlp.network_of(deep)
    assert_rel_close(hessmlp.hessian(deep, x), func_reference(deep, x)[2], f64)
