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
    with pytest.raises(TypeError, match=r"x is torch.float32 but the weight of Linear \(ResidualPINN.inp\)"):
        hessmlp.hessian(model, x.float())
    with pytest.raises(ValueError, match="out of range"):
        hessmlp.hessian(model, x, output=1)


# ---- under torch.compile ----------------------------------------------------------------------

def _laplacian_loss(model, x):
    return (hessmlp.laplacian(model, x) ** 2).mean()


@pytest.mark.parametrize("name, make, d", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_compiled_graph_networks(name, make, d):
    """Each architecture's Laplacian loss compiled with fullgraph=True (forward and backward
    graphs through the fake kernels), its backward outside: the eager loss and gradients; a
    compiled full Hessian with output=0."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(6, d, dtype=f64)
    params = list(model.parameters())
    want_loss = _laplacian_loss(model, x)
    want = torch.autograd.grad(want_loss, params)
    loss = torch.compile(_laplacian_loss, fullgraph=True, backend="aot_eager")(model, x)
    assert_rel_close(loss.detach(), want_loss.detach(), f64, f"{name} loss")
    for p, g, w in zip(params, torch.autograd.grad(loss, params), want):
        assert_rel_close(g, w, f64, f"{name} compiled gradient")
    hess = torch.compile(lambda x: hessmlp.hessian(model, x, output=0), fullgraph=True,
                         backend="aot_eager")(x)
    assert_rel_close(hess, hessmlp.hessian(model, x, output=0), f64, f"{name} compiled hessian")


def test_compiled_residual_pinn_training_step():
    """The residual PINN's whole step (Laplacian loss and backward) in one inductor graph, over
    a few optimizer steps: the eager losses and parameters; then a model change recompiles."""
    torch._dynamo.reset()

    def train(compiled):
        torch.manual_seed(0)
        model = hessmlp.ResidualMLP(3, width=16, blocks=2).double()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        x = torch.rand(32, 3, dtype=f64)

        def step(x):
            loss = (hessmlp.laplacian(model, x)[:, 0] + 1.0).pow(2).mean()
            loss.backward()
            return loss.detach()

        if compiled:
            step = torch.compile(step, fullgraph=True)
        losses = []
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for _ in range(3):
                opt.zero_grad()
                losses.append(step(x))
                opt.step()
        return model, losses

    eager_model, eager_losses = train(False)
    model, losses = train(True)
    for a, b in zip(losses, eager_losses):
        assert_rel_close(a, b, f64, "loss")
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert_rel_close(p.detach(), q.detach(), f64, "parameters after 3 steps")


class PlainAttributeFourier(nn.Module):
    """Fourier features whose matrix is a plain tensor attribute (neither a parameter nor a
    buffer): fx records the tensor itself."""

    def __init__(self):
        super().__init__()
        self.B = torch.randn(2, 4, dtype=f64)
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        z = x @ self.B
        return self.l2(torch.tanh(self.l1(torch.cat([torch.sin(z), torch.cos(z)], dim=-1))))


class IteratedFrequencies(nn.Module):
    """A positional encoding that iterates over a buffer of frequencies: fx makes each entry a
    tensor of its own while tracing."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.tensor([1.0, 2.0]))
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x):
        enc = [x]
        for f in self.freqs:
            enc.append(torch.sin(f * x))
        return self.l2(torch.tanh(self.l1(torch.cat(enc, dim=-1))))


def test_tensors_the_forward_takes_outside_parameters_and_buffers():
    torch._dynamo.reset()
    torch.manual_seed(0)
    for model in (PlainAttributeFourier().double(), IteratedFrequencies().double()):
        x = torch.randn(3, 2, dtype=f64)
        f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
        want = lambda: torch.func.vmap(torch.func.hessian(f))(x).detach()  # noqa: E731
        assert_rel_close(hessmlp.hessian(model, x), want(), f64, "eager")
        with torch.no_grad():
            (model.B if hasattr(model, "B") else model.freqs).mul_(1.5)
        assert_rel_close(hessmlp.hessian(model, x), want(), f64, "eager, after a change")
    # The plain attribute is read by its name (compiled code follows it); the iterated buffer's
    # entries cannot be followed by compiled code: refused, with what to do.
    compiled = torch.compile(lambda x: hessmlp.hessian(model, x), fullgraph=True, backend="eager")
    plain = PlainAttributeFourier().double()
    x = torch.randn(3, 2, dtype=f64)
    got = torch.compile(lambda x: hessmlp.hessian(plain, x), fullgraph=True, backend="eager")(x)
    assert_rel_close(got, hessmlp.hessian(plain, x), f64, "plain attribute, compiled")
    with pytest.raises(Exception, match=r"neither a parameter nor a buffer of the model"):
        compiled(x)


def test_compiled_graph_follows_changes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResidualPINN(alpha=0.5).double()
    x = torch.randn(4, 3, dtype=f64)
    lap = torch.compile(lambda x: hessmlp.laplacian(model, x), fullgraph=True, backend="aot_eager")
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    ref = lambda: torch.func.vmap(torch.func.hessian(f))(x).diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    assert_rel_close(lap(x), ref().detach(), f64, "alpha=0.5")
    model.alpha = 0.25  # (a plain attribute: dynamo guards on it and compiles again)
    assert_rel_close(lap(x), ref().detach(), f64, "alpha=0.25, compiled")
    with torch.no_grad():
        model.out.weight.mul_(2.0)  # (a parameter: a tensor of the op, read every call)
    assert_rel_close(lap(x), ref().detach(), f64, "weights changed in place")

    space_time = SpaceTime().double()  # several inputs
    xs, t = torch.randn(4, 2, dtype=f64), torch.rand(4, 1, dtype=f64)
    got = torch.compile(lambda x, t: hessmlp.hessian(space_time, (x, t)), fullgraph=True,
                        backend="aot_eager")(xs, t)
    assert_rel_close(got, hessmlp.hessian(space_time, (xs, t)), f64, "(x, t) compiled")


def test_graph_structure_is_cached_and_follows_changes():
    residual = ResidualPINN(alpha=0.5).double()
    hessmlp.hessian(residual, torch.randn(3, 3, dtype=f64))
    assert "_hessmlp_structure" in residual.__dict__  # (read once, while the model stays as it is)
    residual.alpha = 0.25  # a plain attribute: part of the fingerprint
    x3 = torch.randn(3, 3, dtype=f64)
    f = lambda xi: residual(xi.unsqueeze(0))[0]  # noqa: E731
    assert_rel_close(hessmlp.hessian(residual, x3), torch.func.vmap(torch.func.hessian(f))(x3).detach(),
                     f64, "alpha changed")

    model = AdaptivePINN().double()  # (ub - lb: a computation of buffers, replayed every call)
    x = torch.randn(3, 2, dtype=f64)
    h1 = hessmlp.hessian(model, x)
    assert "_hessmlp_structure" in model.__dict__
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


# ---- wrappers and TorchScript -----------------------------------------------------------------

@torch.jit.script
def scripted_swish(x):
    return x * torch.sigmoid(x)


class ScriptedActivationNet(nn.Module):
    """A residual network whose activation is a TorchScript function (as in some PINN codes)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = scripted_swish(self.l1(x))
        h = h + scripted_swish(self.l2(h))
        return self.l3(h)


def _hessian_ref(model, x):
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    return torch.func.vmap(torch.func.hessian(f))(x).detach()


def test_scripted_functions_are_read(monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScriptedActivationNet().double()
    x = torch.randn(4, 2, dtype=f64)
    # The reference through the Python function: torch.func's hessian through the TorchScript
    # function differs from it (by 1e-2 here, torch 2.13).
    with monkeypatch.context() as m:
        m.setitem(globals(), "scripted_swish", scripted_swish._torchdynamo_inline)
        want = _hessian_ref(model, x)
    assert_rel_close(hessmlp.hessian(model, x), want, f64, "eager")
    assert isinstance(scripted_swish, torch.jit.ScriptFunction)  # (restored after the trace)
    got = torch.compile(lambda x: hessmlp.hessian(model, x), fullgraph=True, backend="aot_eager")(x)
    assert_rel_close(got, want, f64, "compiled")


def test_scripted_modules_are_refused_by_name():
    class Act(nn.Module):
        def forward(self, x):
            return x * torch.tanh(x)

    seq = nn.Sequential(nn.Linear(2, 8), torch.jit.script(Act()), nn.Linear(8, 1)).double()
    x = torch.randn(3, 2, dtype=f64)
    with pytest.raises(UnsupportedModelError, match=r"model\.1 is a TorchScript module .* Pass the "
                                                    "Python module it was made from"):
        hessmlp.laplacian(seq, x)
    whole = torch.jit.script(hessmlp.MLP(2, [8], 1).double())
    with pytest.raises(UnsupportedModelError, match="the model is a TorchScript module"):
        hessmlp.laplacian(whole, x)


def test_data_parallel_wrappers_are_unwrapped(tmp_path):
    import torch.distributed as dist

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResidualPINN().double()
    x = torch.randn(4, 3, dtype=f64)
    want = _hessian_ref(model, x)
    dp = nn.DataParallel(model)
    assert_rel_close(hessmlp.hessian(dp, x), want, f64, "DataParallel")
    got = torch.compile(lambda x: hessmlp.hessian(dp, x), fullgraph=True, backend="aot_eager")(x)
    assert_rel_close(got, want, f64, "DataParallel, compiled")
    assert_rel_close(hessmlp.hessian(torch.compile(dp), x), want, f64, "compile(DataParallel)")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert_rel_close(hessmlp.hessian(ddp, x), want, f64, "DistributedDataParallel")
        (hessmlp.laplacian(ddp, x) ** 2).sum().backward()  # gradients reach the module's parameters
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


# ---- one reader: chains are graphs, the plan kept per model ------------------------------------

def test_chains_run_through_mlp_jet_and_graphs_through_graph_jet(monkeypatch):
    from hessmlp import _graph_reader

    chain = hessmlp.MLP(2, [8, 8], 1).double()
    sdf = SkipSDF().double()
    from hessmlp import _ops

    calls = []
    # (eager chain calls reach the op through _ops.mlp_jet, graphs through the op itself)
    for where, op in ((_ops, "mlp_jet"), (torch.ops.hessmlp, "graph_jet")):
        real = getattr(where, op)
        monkeypatch.setattr(where, op, lambda *a, _r=real, _n=op: calls.append(_n) or _r(*a))
    hessmlp.laplacian(chain, torch.randn(3, 2, dtype=f64))
    hessmlp.laplacian(sdf, torch.randn(3, 3, dtype=f64))
    assert calls == ["mlp_jet", "graph_jet"]
    assert _graph_reader.network_of(chain).stage_sizes == [1, 1, 0]
    with pytest.raises(UnsupportedModelError, match="network_of describes chains only"):
        _graph_reader.network_of(sdf)


def test_functions_before_the_first_linear_layer():
    """An elementwise function of x before the first Linear: a graph (the chains' op folds only
    scalar affine maps there)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 1)).double()
    x = torch.randn(4, 2, dtype=f64)
    assert_rel_close(hessmlp.hessian(model, x), _hessian_ref(model, x), f64, "tanh first")
    scaled = nn.Sequential(hessmlp.nn.Sine(2.0), nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    assert_rel_close(hessmlp.hessian(scaled, x), _hessian_ref(scaled, x), f64, "sine first")


def test_the_plan_follows_replaced_parameters():
    """Parameters are read every call; one replaced by a tensor of another shape builds the
    graph again (with its checks)."""
    torch.manual_seed(0)
    for model in (hessmlp.MLP(2, [8, 8], 1).double(), ResidualPINN(d=2, w=8).double()):
        x = torch.randn(3, 2, dtype=f64)
        hessmlp.laplacian(model, x)
        first = model[0] if isinstance(model, nn.Sequential) else model.inp
        with torch.no_grad():
            first.weight = nn.Parameter(torch.randn_like(first.weight))  # same shape
        assert_rel_close(hessmlp.hessian(model, x), _hessian_ref(model, x), f64, "same shape")
        first.weight = nn.Parameter(torch.randn(first.weight.shape[0], 3, dtype=f64))  # d = 3 now
        x3 = torch.randn(3, 3, dtype=f64)
        assert_rel_close(hessmlp.hessian(model, x3), _hessian_ref(model, x3), f64, "d = 3")
        with pytest.raises(ValueError, match="x has 2 features but .* expects in_features=3"):
            hessmlp.hessian(model, x)


class _Unsupported(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.l, self.o = nn.Linear(3, 8), nn.Linear(8, 1)
        self.norm = nn.LayerNorm(8) if kind == "layernorm" else nn.BatchNorm1d(8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.l(x)
        if self.kind in ("layernorm", "batchnorm"):
            h = self.norm(h)
        elif self.kind == "attention":
            h = self.att(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1))[0][:, 0]
        elif self.kind == "softmax":
            h = torch.softmax(h, dim=-1)
        elif self.kind == "branch":
            if h.sum() > 0:
                h = torch.tanh(h)
        return self.o(h)


@pytest.mark.parametrize("kind, match", [
    ("layernorm", r"LayerNorm at LayerNorm \(_Unsupported\.norm\), test_graph_reader\.py:\d+: "
                  r"h = self\.norm\(h\) is not supported\. hessmlp reads no normalisation layers"),
    ("batchnorm", r"BatchNorm1d at BatchNorm1d \(_Unsupported\.norm\), test_graph_reader\.py:\d+: .*"
                  r"leave the layer out"),
    ("attention", r"Tensor\.unsqueeze at _Unsupported\.forward, test_graph_reader\.py:\d+: "
                  r"h = self\.att\(.* is not supported\. Build this part from what hessmlp reads"),
    ("softmax", r"function torch\.softmax at _Unsupported\.forward, test_graph_reader\.py:\d+"),
    ("branch", r"could not trace _Unsupported\.forward .* test_graph_reader\.py:\d+: if h\.sum\(\) > 0.*"
               r"branches on the values of its input"),
])
def test_refusals_name_the_module_and_line(kind, match):
    with pytest.raises(UnsupportedModelError, match=match):
        hessmlp.laplacian(_Unsupported(kind), torch.randn(4, 3))
