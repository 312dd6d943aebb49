"""Reading users' graph networks (hessmlp/_graph_reader.py): each architecture of the graph
issue, written the way its library writes it (our own code, after the published formulas),
read into a graph whose graph_jet matches torch.func on the model itself, in every mode,
with the gradients w.r.t. every parameter."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessmlp
from hessmlp._graph import graph_jet
from hessmlp._graph_reader import graph_of
from hessmlp._spec import UnsupportedModelError

from helpers import assert_rel_close

f64 = torch.float64


class ResidualPINN(nn.Module):
    """h = h + tanh(block(h)), and the weighted form alpha h + (1 - alpha) f(h)."""

    def __init__(self, d=3, w=16, blocks=2, alpha=None):
        super().__init__()
        self.inp = nn.Linear(d, w)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w))
                                    for _ in range(blocks))
        self.out = nn.Linear(w, 1)
        self.alpha = alpha

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            f = torch.tanh(block(h))
            h = h + f if self.alpha is None else self.alpha * h + (1 - self.alpha) * f
        return self.out(h)


class SkipSDF(nn.Module):
    """IGR / NeuS / VolSDF: positional encoding, softplus(beta=100), the encoded input
    concatenated again at a middle layer, divided by sqrt(2)."""

    def __init__(self, d=3, w=32, freqs=3):
        super().__init__()
        self.freqs = freqs
        e = d * (1 + 2 * freqs)
        self.lin0, self.lin1 = nn.Linear(e, w), nn.Linear(w, w - e)
        self.lin2, self.lin3 = nn.Linear(w, w), nn.Linear(w, 1)
        self.act = nn.Softplus(beta=100)

    def forward(self, x):
        enc = [x]
        for k in range(self.freqs):
            enc += [torch.sin(2.0 ** k * x), torch.cos(2.0 ** k * x)]
        e = torch.cat(enc, dim=-1)
        h = self.act(self.lin1(self.act(self.lin0(e))))
        h = torch.cat([h, e], dim=-1) / math.sqrt(2)
        return self.lin3(self.act(self.lin2(h)))


class FourierPINN(nn.Module):
    """Random Fourier features [sin(2 pi x B), cos(2 pi x B)], B a buffer."""

    def __init__(self, d=2, k=8, w=16):
        super().__init__()
        self.register_buffer("B", torch.randn(d, k) * 2)
        self.net = nn.Sequential(nn.Linear(2 * k, w), nn.Tanh(), nn.Linear(w, 1))

    def forward(self, x):
        p = 2 * math.pi * x @ self.B
        return self.net(torch.cat([torch.sin(p), torch.cos(p)], -1))


class HardConstraint(nn.Module):
    """u = x0 (1 - x0) net(x): the boundary condition built into the output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        x0 = x[:, 0:1]
        return x0 * (1 - x0) * self.net(x)


class ModifiedMLP(nn.Module):
    """Wang, Teng & Perdikaris: two encoders U, V and gates h = (1 - z) U + z V."""

    def __init__(self, d=2, w=16, depth=3):
        super().__init__()
        self.U, self.V = nn.Linear(d, w), nn.Linear(d, w)
        self.hidden = nn.ModuleList([nn.Linear(d, w)] + [nn.Linear(w, w) for _ in range(depth - 1)])
        self.out = nn.Linear(w, 1)

    def forward(self, x):
        u, v = torch.tanh(self.U(x)), torch.tanh(self.V(x))
        h = x
        for layer in self.hidden:
            z = torch.tanh(layer(h))
            h = (1 - z) * u + z * v
        return self.out(h)


class AdaptivePINN(nn.Module):
    """Jagtap's adaptive activations tanh(n a z): a learnable scalar (L-LAAF) and a learnable
    slope per neuron (N-LAAF); Raissi's input scaling 2 (x - lb) / (ub - lb) - 1 with buffers."""

    def __init__(self, d=2, w=16, n=10.0):
        super().__init__()
        self.register_buffer("lb", -torch.ones(d))
        self.register_buffer("ub", torch.tensor([2.0, 3.0]))
        self.l1, self.l2, self.l3 = nn.Linear(d, w), nn.Linear(w, w), nn.Linear(w, 1)
        self.a = nn.Parameter(torch.tensor(0.1))
        self.b = nn.Parameter(torch.full((w,), 0.1))
        self.n = n

    def forward(self, x):
        h = 2.0 * (x - self.lb) / (self.ub - self.lb) - 1.0
        h = torch.tanh(self.n * self.a * self.l1(h))
        h = torch.tanh(self.n * self.b * self.l2(h))
        return self.l3(h)


class WeightNormLinear(nn.Module):
    """Weight normalisation computed in forward (as PhysicsNeMo's): W = g v / |v|."""

    def __init__(self, i, o):
        super().__init__()
        self.v = nn.Parameter(torch.randn(o, i))
        self.g = nn.Parameter(torch.rand(o) + 0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        return F.linear(x, self.g.unsqueeze(1) * self.v / self.v.norm(dim=1, keepdim=True), self.bias)


class FactorizedLinear(nn.Module):
    """Random weight factorisation: W = exp(s) v, row scales s learnable."""

    def __init__(self, i, o):
        super().__init__()
        self.s = nn.Parameter(torch.randn(o, 1) * 0.1)
        self.v = nn.Parameter(torch.randn(o, i) / i ** 0.5)

    def forward(self, x):
        return x @ (torch.exp(self.s) * self.v).T


class ComputedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = WeightNormLinear(2, 16), FactorizedLinear(16, 16), nn.Linear(16, 1)
        self.beta = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        h = self.l1(x)
        h = h * torch.sigmoid(self.beta * h)  # a composite activation with a learnable beta
        return self.l3(torch.sin(self.l2(h)))


class PFNN(nn.Module):
    """DeepXDE's parallel network: one sub-network per output, concatenated; plus slicing,
    index_select of features and optional arguments and metadata reads."""

    def __init__(self, d=3, w=12, m=2):
        super().__init__()
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Linear(w, 1))
                                  for _ in range(m))
        self.register_buffer("order", torch.tensor([2, 0, 1]))

    def forward(self, x, scale=None):
        x = x.to(x.dtype)
        x = torch.index_select(x, 1, self.order)
        x = x.view(x.shape[0], -1)
        y = torch.cat([net(x) for net in self.nets] + [x[:, 1:2] * 0.5], dim=1)
        return y if scale is None else y * scale


ARCHITECTURES = [
    ("residual", lambda: ResidualPINN(), 3),
    ("residual_alpha", lambda: ResidualPINN(alpha=0.3), 3),
    ("skip_sdf", lambda: SkipSDF(), 3),
    ("fourier", lambda: FourierPINN(), 2),
    ("hard_constraint", lambda: HardConstraint(), 2),
    ("modified_mlp", lambda: ModifiedMLP(), 2),
    ("adaptive", lambda: AdaptivePINN(), 2),
    ("computed_weights", lambda: ComputedWeights(), 2),
    ("pfnn", lambda: PFNN(), 3),
]


@pytest.mark.parametrize("name, make, d", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_architecture_read_as_graph(name, make, d):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, d, dtype=f64)
    graph = graph_of(model, d)
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    with torch.no_grad():
        value = model(x)
    jac = torch.func.vmap(torch.func.jacrev(f))(x).detach()
    hess = torch.func.vmap(torch.func.hessian(f))(x).detach()
    diag = hess.diagonal(dim1=-2, dim2=-1)
    for mode, want in (("full", hess), ("diag", diag), ("trace", diag.sum(-1)), ("none", None)):
        with torch.no_grad():
            v, j, h = graph_jet(graph, x, mode)
        assert_rel_close(v, value, f64, f"{name} value {mode}")
        assert_rel_close(j, jac, f64, f"{name} jacobian {mode}")
        if want is not None:
            assert_rel_close(h, want, f64, f"{name} {mode}")


@pytest.mark.parametrize("name, make, d", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_architecture_parameter_gradients(name, make, d):
    """A Laplacian loss's gradients w.r.t. every parameter (learnable slopes, g and v of a
    weight computed in forward), against torch.func on the model."""
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(4, d, dtype=f64)
    params = dict(model.named_parameters())

    def loss(p):
        f = lambda xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]  # noqa: E731
        lap = torch.func.vmap(torch.func.hessian(f))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
        return (lap ** 2).sum()

    want = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    graph = graph_of(model, d)
    (graph_jet(graph, x, "trace")[2] ** 2).sum().backward()
    for k, p in params.items():
        assert p.grad is not None, f"{name}: no gradient for {k}"
        scale = max(want[k].abs().max().item(), 1.0)
        err = (p.grad - want[k]).abs().max().item()
        assert err <= 1e-9 * scale, f"{name} grad {k}: {err:.3e}"


def test_chains_read_as_graphs():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), hessmlp.Sine(2.0), nn.Linear(8, 2))
    graph = graph_of(model.double(), 3)
    assert [n.kind for n in graph.nodes] == ["input", "linear", "stage", "linear", "stage", "linear"]


@pytest.mark.parametrize("forward, match", [
    (lambda self, x: x / self.l(x), "division by a computed tensor"),
    (lambda self, x: self.l(x)[:, 0], "integer index drops the feature dimension"),
    (lambda self, x: torch.cat([x, self.l(x)], dim=0), "along the features"),
    (lambda self, x: self.l(x) @ self.l(x), "matrix product of two tensors computed"),
])
def test_refusals_name_the_cause(forward, match):
    cls = type("Net", (nn.Module,), {"forward": forward})
    model = cls()
    model.l = nn.Linear(3, 3)
    with pytest.raises(UnsupportedModelError, match=match):
        graph_of(model.double(), 3)


# ---- through the public functions -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_public_functions_on_a_graph_network(dtype):
    torch.manual_seed(1)
    model = PFNN().to(dtype)  # 3 outputs
    x = torch.randn(6, 3, dtype=dtype)
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    hess = torch.func.vmap(torch.func.hessian(f))(x).detach()
    jac = torch.func.vmap(torch.func.jacrev(f))(x).detach()
    diag = hess.diagonal(dim1=-2, dim2=-1)
    assert_rel_close(hessmlp.hessian(model, x), hess, dtype, "hessian")
    assert_rel_close(hessmlp.hessian_diag(model, x), diag, dtype, "diag")
    assert_rel_close(hessmlp.laplacian(model, x), diag.sum(-1), dtype, "laplacian")
    assert_rel_close(hessmlp.jacobian(model, x), jac, dtype, "jacobian")
    assert_rel_close(hessmlp.hessian(model, x, output=-1), hess[:, 2], dtype, "output=-1")
    assert_rel_close(hessmlp.hessian(model, x[0]), hess[0], dtype, "unbatched")
    r = hessmlp.jet(model, x, hessian=None, output=1)
    assert r.hessian is None and r.value.shape == (6,)
    with hessmlp.memory_budget(200_000):  # in chunks of samples
        assert_rel_close(hessmlp.hessian(model, torch.cat([x] * 40)), torch.cat([hess] * 40), dtype,
                         "chunks")


def test_graph_network_refusals_through_the_public_functions():
    model = ResidualPINN().double()
    x = torch.randn(3, 3, dtype=f64)
    with pytest.raises(ValueError, match="method='reverse' serves chains"):
        hessmlp.hessian(model, x, method="reverse")
    with pytest.raises(TypeError, match="x is torch.float32 but a tensor of"):
        hessmlp.hessian(model, x.float())
    with pytest.raises(ValueError, match="out of range"):
        hessmlp.hessian(model, x, output=1)
    compiled = torch.compile(lambda x: hessmlp.laplacian(model, x), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="outside torch.compile"):
        compiled(x)


def test_graph_structure_is_cached_and_follows_changes():
    residual = ResidualPINN(alpha=0.5).double()
    hessmlp.hessian(residual, torch.randn(3, 3, dtype=f64))
    assert "_hessmlp_graph" in residual.__dict__  # (read once, while the model stays as it is)
    residual.alpha = 0.25  # a plain attribute: part of the fingerprint
    x3 = torch.randn(3, 3, dtype=f64)
    f = lambda xi: residual(xi.unsqueeze(0))[0]  # noqa: E731
    assert_rel_close(hessmlp.hessian(residual, x3), torch.func.vmap(torch.func.hessian(f))(x3).detach(),
                     f64, "alpha changed")

    model = AdaptivePINN().double()  # (ub - lb is computed by fx while tracing: read every call)
    x = torch.randn(3, 2, dtype=f64)
    h1 = hessmlp.hessian(model, x)
    assert "_hessmlp_graph" not in model.__dict__
    with torch.no_grad():
        model.a.mul_(2.0)  # a learnable slope: a tensor of the op, read every call
        model.lb.add_(0.5)  # a buffer (in place: its version changes the fingerprint)
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    want = torch.func.vmap(torch.func.hessian(f))(x).detach()
    h2 = hessmlp.hessian(model, x)
    assert not torch.allclose(h1, h2)
    assert_rel_close(h2, want, f64, "after changes")


# ---- hessmlp.nn's graph modules ---------------------------------------------------------------

@pytest.mark.parametrize("make, d", [
    (lambda: hessmlp.ResidualMLP(3, width=12, blocks=2), 3),
    (lambda: hessmlp.ResidualMLP(2, width=8, blocks=1, out_features=2, activation="silu"), 2),
    (lambda: nn.Sequential(hessmlp.FourierFeatures(2, features=6, sigma=2.0),
                           hessmlp.MLP(12, [16], 1)), 2),
    (lambda: nn.Sequential(hessmlp.FourierFeatures(3, "positional", frequencies=3, include_input=True),
                           hessmlp.MLP(21, [16, 16], 1, activation=nn.Softplus(beta=100))), 3),
    (lambda: hessmlp.ModifiedMLP(2, width=10, depth=3), 2),
    (lambda: hessmlp.MLP(2, [16, 16], 1, adaptive="layer"), 2),
    (lambda: hessmlp.MLP(2, [16, 16], 1, adaptive="neuron", activation="sin"), 2),
], ids=["residual", "residual_silu_m2", "fourier", "positional_sdf", "modified", "adaptive_layer",
        "adaptive_neuron"])
def test_hessmlp_nn_graph_modules(make, d):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, d, dtype=f64)
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    hess = torch.func.vmap(torch.func.hessian(f))(x).detach()
    assert_rel_close(hessmlp.hessian(model, x), hess, f64, "hessian")
    params = dict(model.named_parameters())

    def loss(p):
        g = lambda xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]  # noqa: E731
        return (torch.func.vmap(torch.func.hessian(g))(x).diagonal(dim1=-2, dim2=-1).sum(-1) ** 2).sum()

    want = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    (hessmlp.laplacian(model, x) ** 2).sum().backward()
    for k, p in params.items():
        assert_rel_close(p.grad, want[k], f64, f"grad {k}")


def test_hessmlp_nn_arguments_are_checked():
    with pytest.raises(ValueError, match="width must be a positive int"):
        hessmlp.ResidualMLP(3, width=0)
    with pytest.raises(ValueError, match="kind must be 'random' or 'positional'"):
        hessmlp.FourierFeatures(2, kind="gaussian")
    with pytest.raises(ValueError, match="per must be 'layer' or 'neuron'"):
        hessmlp.MLP(2, [4], 1, adaptive="global")
    assert hessmlp.FourierFeatures(3, "positional", frequencies=2, include_input=True).out_features == 15


class SpaceTime(nn.Module):
    """forward(self, x, t): the two inputs concatenated, and t again in a hard constraint."""

    def __init__(self):
        super().__init__()
        self.net = hessmlp.MLP(3, [16, 16], 1)

    def forward(self, x, t):
        return t * self.net(torch.cat([x, t], dim=1)) + torch.sin(x[:, :1])


def test_several_inputs():
    torch.manual_seed(0)
    model = SpaceTime().double()
    x, t = torch.randn(5, 2, dtype=f64), torch.rand(5, 1, dtype=f64)
    f = lambda z: model(z[:2].unsqueeze(0), z[2:].unsqueeze(0))[0]  # noqa: E731
    z = torch.cat([x, t], 1)
    hess = torch.func.vmap(torch.func.hessian(f))(z).detach()
    assert_rel_close(hessmlp.hessian(model, (x, t)), hess, f64, "(x, t)")
    assert_rel_close(hessmlp.laplacian(model, (x[0], t[0])), hess[0].diagonal(dim1=-2, dim2=-1).sum(-1),
                     f64, "unbatched")
    with pytest.raises(ValueError, match="one B"):
        hessmlp.hessian(model, (x, t[:2]))
    with pytest.raises(UnsupportedModelError, match="takes 2 tensor inputs"):
        hessmlp.hessian(model, (x[:, :1], x[:, 1:], t))
