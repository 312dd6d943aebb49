"""Derivatives w.r.t. some inputs (wrt=), weighted Laplacians (weights=) and tr(A H) (matrix=):
against torch.func in float64 on chains and graph networks, with output=, unbatched x, several
inputs, every method; gradients w.r.t. the parameters, c and A; bad arguments."""
import pytest
import torch
from torch import nn

import hessmlp
from hessmlp._spec import UnsupportedModelError  # noqa: F401

from helpers import DTYPES, assert_rel_close

f64 = torch.float64


class SpaceTime(nn.Module):
    """u(x, y, t) with two inputs: forward(self, xy, t)."""

    def __init__(self):
        super().__init__()
        self.net = hessmlp.MLP(3, [16, 16], 2)

    def forward(self, xy, t):
        return t * self.net(torch.cat([xy, t], dim=1)) + torch.sin(xy[:, :1])


def models():
    torch.manual_seed(0)
    return [
        ("chain", hessmlp.MLP(4, [16, 16], 2, activation="tanh").double()),
        ("residual", hessmlp.ResidualMLP(4, width=8, blocks=2, out_features=2).double()),
        ("modified", hessmlp.ModifiedMLP(4, width=8, depth=2, out_features=2).double()),
    ]


def reference(model, x):
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    return (torch.func.vmap(torch.func.jacrev(f))(x).detach(),
            torch.func.vmap(torch.func.hessian(f))(x).detach())


def block(H, idx):
    idx = torch.as_tensor(idx)
    return H.index_select(-1, idx).index_select(-2, idx)


WRTS = [[2, 0], [3], [1, 2, 3], [0, 1, 2, 3], [-1, 0]]


@pytest.mark.parametrize("name, model", models(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("wrt", WRTS, ids=str)
def test_wrt_every_function(name, model, wrt):
    x = torch.randn(6, 4, dtype=f64)
    J, H = reference(model, x)
    idx = [i % 4 for i in wrt]
    Hw = block(H, idx)
    diag = Hw.diagonal(dim1=-2, dim2=-1)
    assert_rel_close(hessmlp.hessian(model, x, wrt=wrt), Hw, f64, "hessian")
    assert_rel_close(hessmlp.hessian_diag(model, x, wrt=wrt), diag, f64, "diag")
    assert_rel_close(hessmlp.laplacian(model, x, wrt=wrt), diag.sum(-1), f64, "laplacian")
    assert_rel_close(hessmlp.jacobian(model, x, wrt=wrt), J[..., idx], f64, "jacobian")
    r = hessmlp.jet(model, x, hessian="trace", wrt=wrt)
    assert_rel_close(r.jacobian, J[..., idx], f64, "jet jacobian")
    assert_rel_close(r.hessian, diag.sum(-1), f64, "jet trace")
    assert_rel_close(hessmlp.hessian(model, x, wrt=wrt, output=1), Hw[:, 1], f64, "output=1")
    assert_rel_close(hessmlp.laplacian(model, x[2], wrt=wrt), diag[2].sum(-1), f64, "unbatched")
    for method in ("forward", "reverse"):
        if name != "chain" and method == "reverse":
            with pytest.raises(ValueError, match="method='reverse' serves chains"):
                hessmlp.hessian(model, x, wrt=wrt, method=method)
            continue
        assert_rel_close(hessmlp.hessian(model, x, wrt=wrt, method=method), Hw, f64, method)
        assert_rel_close(hessmlp.laplacian(model, x, wrt=wrt, method=method), diag.sum(-1), f64, method)
        assert_rel_close(hessmlp.jacobian(model, x, wrt=wrt, method=method), J[..., idx], f64, method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrt_with_several_inputs_and_chunks(dtype):
    torch.manual_seed(1)
    model = SpaceTime().to(dtype)
    xy, t = torch.randn(40, 2, dtype=dtype), torch.rand(40, 1, dtype=dtype)
    f = lambda z: model(z[:2].unsqueeze(0), z[2:].unsqueeze(0))[0]  # noqa: E731
    z = torch.cat([xy, t], 1).double()
    m64 = SpaceTime().double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    f = lambda zi: m64(zi[:2].unsqueeze(0), zi[2:].unsqueeze(0))[0]  # noqa: E731
    H = torch.func.vmap(torch.func.hessian(f))(z).detach()
    J = torch.func.vmap(torch.func.jacrev(f))(z).detach()
    spatial = H[..., [0, 1], [0, 1]].sum(-1)
    assert_rel_close(hessmlp.laplacian(model, (xy, t), wrt=[0, 1]), spatial.to(dtype), dtype, "u_xx + u_yy")
    assert_rel_close(hessmlp.jacobian(model, (xy, t), wrt=[2]), J[..., [2]].to(dtype), dtype, "u_t")
    with hessmlp.memory_budget(60_000):  # several op calls of a few samples
        assert_rel_close(hessmlp.hessian(model, (xy, t), wrt=[2, 0]), block(H, [2, 0]).to(dtype), dtype,
                         "chunks")
        c = torch.rand(40, 2, dtype=dtype)
        want = (H[..., [0, 1], [0, 1]] * c[:, None]).sum(-1)
        assert_rel_close(hessmlp.laplacian(model, (xy, t), wrt=[0, 1], weights=c), want.to(dtype), dtype,
                         "per-sample weights in chunks")


@pytest.mark.parametrize("name, model", models(), ids=lambda v: v if isinstance(v, str) else "")
def test_weights(name, model):
    x = torch.randn(6, 4, dtype=f64)
    _, H = reference(model, x)
    for wrt in (None, [3, 1]):
        idx = list(range(4)) if wrt is None else wrt
        diag = block(H, idx).diagonal(dim1=-2, dim2=-1)
        k = len(idx)
        cases = {
            "positive": torch.rand(k, dtype=f64) + 0.1,
            "with zeros": torch.tensor([0.0] * (k - 1) + [2.0], dtype=f64),
            "signed": torch.randn(k, dtype=f64),
            "per-sample positive": torch.rand(6, k, dtype=f64),
            "per-sample signed": torch.randn(6, k, dtype=f64),
        }
        for what, c in cases.items():
            want = (diag * (c[:, None] if c.dim() == 2 else c)).sum(-1)
            assert_rel_close(hessmlp.laplacian(model, x, wrt=wrt, weights=c), want, f64, f"{what} wrt={wrt}")
            want1 = (diag[:, 0] * c).sum(-1)
            assert_rel_close(hessmlp.laplacian(model, x, wrt=wrt, weights=c, output=0), want1, f64,
                             f"{what} output=0")
        c = torch.rand(k, dtype=f64)
        assert_rel_close(hessmlp.laplacian(model, x[1], wrt=wrt, weights=c), (diag[1] * c).sum(-1), f64,
                         "unbatched")


def _sym(A):
    return (A + A.mT) / 2


@pytest.mark.parametrize("name, model", models(), ids=lambda v: v if isinstance(v, str) else "")
def test_matrix(name, model):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, dtype=f64, generator=gen)
    _, H = reference(model, x)
    L = torch.randn(4, 2, dtype=f64, generator=gen)
    cases = {
        "indefinite": torch.randn(4, 4, dtype=f64, generator=gen),
        "psd rank 2": L @ L.T,
        "negative rank 1": -L[:, :1] @ L[:, :1].T,
        "zero": torch.zeros(4, 4, dtype=f64),
        "identity": torch.eye(4, dtype=f64),
        "per-sample": torch.randn(5, 4, 4, dtype=f64, generator=gen),
        "per-sample psd": (lambda R: R @ R.mT)(torch.randn(5, 4, 3, dtype=f64, generator=gen)),
    }
    for what, A in cases.items():
        want = (H * (_sym(A)[:, None] if A.dim() == 3 else _sym(A))).sum((-1, -2))
        assert_rel_close(hessmlp.laplacian(model, x, matrix=A), want, f64, what)
        want0 = (H[:, 0] * _sym(A)).sum((-1, -2))
        assert_rel_close(hessmlp.laplacian(model, x, matrix=A, output=0), want0, f64, f"{what} output=0")
    # With wrt: A is k x k over those inputs.
    A = torch.randn(2, 2, dtype=f64, generator=gen)
    want = (block(H, [2, 0]) * _sym(A)).sum((-1, -2))
    assert_rel_close(hessmlp.laplacian(model, x, wrt=[2, 0], matrix=A), want, f64, "wrt")
    assert_rel_close(hessmlp.laplacian(model, x[0], wrt=[2, 0], matrix=A), want[0], f64, "unbatched")
    # The identity is the Laplacian.
    assert_rel_close(hessmlp.laplacian(model, x, matrix=torch.eye(4, dtype=f64)),
                     hessmlp.laplacian(model, x), f64, "A = I")


@pytest.mark.parametrize("name, model", models(), ids=lambda v: v if isinstance(v, str) else "")
def test_gradients_wrt_parameters_weights_and_matrix(name, model):
    """A loss of each operator: its gradients w.r.t. every parameter, c and A, against
    autograd through torch.func."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, dtype=f64, generator=gen)
    params = dict(model.named_parameters())
    c = torch.randn(4, 2, dtype=f64, generator=gen)
    A = torch.randn(3, 3, dtype=f64, generator=gen)
    wrt = [1, 3]
    wrt3 = [0, 2, 3]

    def ops(p, c, A, hess_of):
        Hw = block(hess_of(p), wrt)
        H3 = block(hess_of(p), wrt3)
        return [Hw.diagonal(dim1=-2, dim2=-1).sum(-1),
                (Hw.diagonal(dim1=-2, dim2=-1) * c[:, None]).sum(-1),
                (H3 * _sym(A)).sum((-1, -2))]

    def func_hess(p):
        f = lambda xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]  # noqa: E731
        return torch.func.vmap(torch.func.hessian(f))(x)

    names = list(params)
    for j, what in enumerate(["wrt laplacian", "weights", "matrix"]):
        def loss_ref(p, c, A):
            return (ops(p, c, A, func_hess)[j] ** 2).sum()

        want = torch.func.grad(loss_ref, argnums=(0, 1, 2))({k: v.detach() for k, v in params.items()},
                                                            c, A)
        for p in model.parameters():
            p.grad = None
        cg, Ag = c.clone().requires_grad_(), A.clone().requires_grad_()
        got = [hessmlp.laplacian(model, x, wrt=wrt),
               hessmlp.laplacian(model, x, wrt=wrt, weights=cg),
               hessmlp.laplacian(model, x, wrt=wrt3, matrix=Ag)][j]
        (got ** 2).sum().backward()
        for k in names:
            g = params[k].grad
            g = torch.zeros_like(params[k]) if g is None else g
            assert_rel_close(g, want[0][k], f64, f"{what}: grad {k}")
        if j == 1:
            assert_rel_close(cg.grad, want[1], f64, "grad c")
        if j == 2:
            assert_rel_close(Ag.grad, want[2], f64, "grad A")


def test_wrt_costs_only_its_directions(monkeypatch):
    """The jets carry k directions: graph_jet is called with a (k, d) seed."""
    seen = []
    real = torch.ops.hessmlp.graph_jet
    monkeypatch.setattr(torch.ops.hessmlp, "graph_jet",
                        lambda *a: seen.append(None if a[6] is None else tuple(a[6].shape)) or real(*a))
    model = hessmlp.MLP(10, [16], 1).double()
    x = torch.randn(3, 10, dtype=f64)
    hessmlp.laplacian(model, x, wrt=[0, 1])
    L = torch.randn(10, 2, dtype=f64)
    hessmlp.laplacian(model, x, matrix=L @ L.T)  # rank 2: two directions
    hessmlp.laplacian(model, x, weights=torch.rand(3, 10, dtype=f64))
    assert seen == [(2, 10), (2, 10), (3, 10, 10)]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(wrt=[0, 0]), ValueError, "repeats an input"),
    (dict(wrt=[4]), ValueError, r"out of range for x with d=4 inputs: \[4\]"),
    (dict(wrt=[]), ValueError, "wrt is empty"),
    (dict(wrt=[0.5]), TypeError, "wrt must hold int input indices"),
    (dict(wrt=[True]), TypeError, "wrt must hold int input indices"),
    (dict(wrt=3), TypeError, "wrt must be a sequence"),
    (dict(wrt="01"), TypeError, "wrt must be a sequence"),
    (dict(weights=torch.ones(3, dtype=f64)), ValueError, r"weights must have shape \(4,\) or \(5, 4\)"),
    (dict(wrt=[0, 1], weights=torch.ones(4, dtype=f64)), ValueError,
     r"weights must have shape \(2,\) or \(5, 2\) .*k = len\(wrt\) = 2"),
    (dict(weights=torch.ones(4)), TypeError, "weights is torch.float32 but x is torch.float64"),
    (dict(weights=[1.0, 2.0, 3.0, 4.0]), TypeError, "weights must be a torch.Tensor"),
    (dict(matrix=torch.ones(4, dtype=f64)), ValueError, r"matrix must have shape \(4, 4\) or \(5, 4, 4\)"),
    (dict(matrix=torch.eye(4, dtype=f64), weights=torch.ones(4, dtype=f64)), ValueError, "not both"),
    (dict(matrix=torch.eye(4, dtype=f64, device="meta")), ValueError, "matrix is on meta but x is on cpu"),
])
def test_bad_arguments(kwargs, exc, match):
    model = hessmlp.MLP(4, [8], 1).double()
    with pytest.raises(exc, match=match):
        hessmlp.laplacian(model, torch.randn(5, 4, dtype=f64), **kwargs)


def test_compiled_pinn_step_with_wrt():
    """A heat-equation residual u_t - alpha (u_xx + u_yy), compiled with fullgraph=True: the
    eager loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = hessmlp.ResidualMLP(3, width=16, blocks=2).double()
    x = torch.rand(32, 3, dtype=f64)

    def loss(x):
        u_t = hessmlp.jacobian(model, x, wrt=[2], output=0)[:, 0]
        lap = hessmlp.laplacian(model, x, wrt=[0, 1], output=0)
        return ((u_t - 0.1 * lap) ** 2).mean()

    params = list(model.parameters())
    want = torch.autograd.grad(loss(x), params)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x), params)
    for g, w in zip(got, want):
        assert_rel_close(g, w, f64, "compiled gradient")


# ---- Hessian-vector products ---------------------------------------------------------------------

@pytest.mark.parametrize("name, model", models(), ids=lambda v: v if isinstance(v, str) else "")
def test_hvp(name, model):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, dtype=f64, generator=gen)
    _, H = reference(model, x)
    v = torch.randn(4, dtype=f64, generator=gen)
    vb = torch.randn(6, 4, dtype=f64, generator=gen)
    assert_rel_close(hessmlp.hvp(model, x, v), H @ v, f64, "shared v")
    assert_rel_close(hessmlp.hvp(model, x, vb), torch.einsum("bmij,bj->bmi", H, vb), f64, "per-sample v")
    assert_rel_close(hessmlp.hvp(model, x, vb, output=1), torch.einsum("bij,bj->bi", H[:, 1], vb), f64,
                     "output=1")
    assert_rel_close(hessmlp.hvp(model, x[3], v), H[3] @ v, f64, "unbatched")
    # Where no gradient is needed, 'auto' takes forward along v, then back.
    with torch.no_grad():
        assert_rel_close(hessmlp.hvp(model, x, v), H @ v, f64, "no_grad, shared v")
        assert_rel_close(hessmlp.hvp(model, x, vb, output=1),
                         torch.einsum("bij,bj->bi", H[:, 1], vb), f64, "no_grad, output=1")
        assert_rel_close(hessmlp.hvp(model, x[3], v), H[3] @ v, f64, "no_grad, unbatched")
        with hessmlp.memory_budget(20_000):
            assert_rel_close(hessmlp.hvp(model, x, vb), torch.einsum("bmij,bj->bmi", H, vb), f64,
                             "no_grad, chunks")
    with pytest.raises(ValueError, match="method='reverse' .* is not differentiable"):
        hessmlp.hvp(model, x, v, method="reverse")


@pytest.mark.parametrize("name, model", models(), ids=lambda v: v if isinstance(v, str) else "")
def test_hvp_gradients(name, model):
    """A loss of H v: its gradients w.r.t. every parameter, x and v, against autograd through
    torch.func."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 4, dtype=f64, generator=gen)
    v = torch.randn(4, 4, dtype=f64, generator=gen)
    w = torch.randn(4, 2, 4, dtype=f64, generator=gen)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_ref(p, x, v):
        f = lambda xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]  # noqa: E731
        H = torch.func.vmap(torch.func.hessian(f))(x)
        return (torch.einsum("bmij,bj->bmi", H, v) * w).sum()

    want = torch.func.grad(loss_ref, argnums=(0, 1, 2))(params, x, v)
    for p in model.parameters():
        p.grad = None
    xg, vg = x.clone().requires_grad_(), v.clone().requires_grad_()
    (hessmlp.hvp(model, xg, vg) * w).sum().backward()
    for k, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        assert_rel_close(g, want[0][k], f64, f"grad {k}")
    assert_rel_close(xg.grad, want[1], f64, "grad x")
    assert_rel_close(vg.grad, want[2], f64, "grad v")


def test_hvp_costs_one_direction_pair_per_input(monkeypatch):
    seen = []
    real = torch.ops.hessmlp.graph_jet
    monkeypatch.setattr(torch.ops.hessmlp, "graph_jet",
                        lambda *a: seen.append((a[5], tuple(a[6].shape))) or real(*a))
    model = hessmlp.MLP(10, [16], 1).double()
    hessmlp.hvp(model, torch.randn(3, 10, dtype=f64), torch.randn(10, dtype=f64))
    assert seen == [("cross", (11, 10))]  # 11 directions, 11 second-order columns (not 55)


def test_hvp_reverse_is_one_sweep_per_output(monkeypatch):
    seen = []
    real = torch.ops.hessmlp.graph_jet_backward
    monkeypatch.setattr(torch.ops.hessmlp, "graph_jet_backward",
                        lambda *a: seen.append((a[8], tuple(a[9].shape))) or real(*a))
    model = hessmlp.MLP(10, [16], 3).double()
    with torch.no_grad():
        hessmlp.hvp(model, torch.randn(4, 10, dtype=f64), torch.randn(10, dtype=f64))
    assert seen == [("none", (1, 10))] * 3  # jets along v alone, one sweep back per output


@pytest.mark.parametrize("args, exc, match", [
    ((torch.ones(3, dtype=f64),), ValueError, r"v must have shape \(4,\) or \(5, 4\)"),
    ((torch.ones(4),), TypeError, "v is torch.float32 but x is torch.float64"),
    (([1.0] * 4,), TypeError, "v must be a torch.Tensor"),
    ((torch.ones(4, dtype=f64), None, "backward"), ValueError, "method must be 'auto', 'forward' or"),
])
def test_hvp_bad_arguments(args, exc, match):
    model = hessmlp.MLP(4, [8], 1).double()
    with pytest.raises(exc, match=match):
        hessmlp.hvp(model, torch.randn(5, 4, dtype=f64), *args)


def test_operators_compile():
    """weights, matrix and hvp under torch.compile(fullgraph=True): the eager results (the
    compiled routes take the weighted diagonal, with no data-dependent branch)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = hessmlp.ModifiedMLP(3, width=8, depth=2).double()
    x = torch.randn(5, 3, dtype=f64)
    c = torch.rand(5, 3, dtype=f64)
    A = torch.randn(3, 3, dtype=f64)
    v = torch.randn(3, dtype=f64)

    def f(x):
        return (hessmlp.laplacian(model, x, weights=c), hessmlp.laplacian(model, x, matrix=A),
                hessmlp.hvp(model, x, v))

    for got, want in zip(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x)):
        assert_rel_close(got, want, f64, "compiled")
