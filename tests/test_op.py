"""The registered ops: schema, fake kernels against the real ones, opcheck, torch.compile."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import hessmlp

from helpers import DEVICES, random_mlp

f64 = torch.float64


def _args(mode, method, dtype=f64, B=4, d=3, bias=True, requires_grad=False, save=False,
          device="cpu"):
    model = random_mlp(d, [6, 5], 2, nn.Tanh, dtype=dtype, bias=bias, final_act=True, device=device)
    net = hessmlp.network_of(model)
    x = torch.randn(B, d, dtype=dtype, requires_grad=requires_grad, device=device)
    w = [t.detach().clone().requires_grad_(requires_grad) for t in net.weights]
    b = [None if t is None else t.detach().clone().requires_grad_(requires_grad) for t in net.biases]
    return (x, w, b, net.stage_sizes, net.act_codes, net.act_params, mode, method, save)


CASES = [("full", "forward"), ("full", "reverse"), ("diag", "forward"), ("diag", "reverse"),
         ("trace", "forward"), ("trace", "reverse"), ("none", "forward"), ("none", "reverse")]


def _fake(fm, args):
    def conv(a):
        if isinstance(a, torch.Tensor):
            return fm.from_tensor(a)
        if isinstance(a, list) and a and any(isinstance(t, torch.Tensor) for t in a):
            return [None if t is None else fm.from_tensor(t) for t in a]
        return a
    return [conv(a) for a in args]


def _flat(out):
    for o in out:
        if isinstance(o, (list, tuple)):
            yield from o
        else:
            yield o


def _assert_same_meta(real, fake):
    real, fake = list(_flat(real)), list(_flat(fake))
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device


@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("mode, method", CASES)
@pytest.mark.parametrize("B", [0, 1, 5])
def test_fake_kernel_matches_real(mode, method, B, save):
    args = _args(mode, method, B=B, save=save)
    real = torch.ops.hessmlp.mlp_jet(*args)
    with FakeTensorMode() as fm:
        fake = torch.ops.hessmlp.mlp_jet(*_fake(fm, args))
    _assert_same_meta(real, fake)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
@pytest.mark.parametrize("mode", ["full", "diag", "trace", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_backward_fake_kernel_matches_real(mode, mask, bias):
    x, w, b, *rest, method, save = _args(mode, "forward", bias=bias, save=True)
    value, jac, hess, state = torch.ops.hessmlp.mlp_jet(x, w, b, *rest, method, save)
    args = [torch.randn_like(value), None, torch.randn_like(hess), x, w, b, *rest, state, mask]
    real = torch.ops.hessmlp.mlp_jet_backward(*args)
    with FakeTensorMode() as fm:
        fake = torch.ops.hessmlp.mlp_jet_backward(*_fake(fm, args))
    _assert_same_meta(real, fake)


OPCHECK_SAMPLES = [
    dict(mode=mode, method=method, save=save, requires_grad=True, device=device)
    for mode, method in CASES for save in (False, True) for device in DEVICES
] + [
    dict(mode="trace", method="forward", save=True, requires_grad=True, bias=False),
    dict(mode="diag", method="forward", save=True, requires_grad=False),
    dict(mode="full", method="forward", save=True, requires_grad=True, dtype=torch.float32),
    dict(mode="trace", method="forward", save=True, requires_grad=True, B=1),
]


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=lambda s: "-".join(
    f"{k}={v}" for k, v in s.items()))
def test_opcheck_mlp_jet(sample):
    """Every opcheck utility: schema, autograd registration, fake tensor, aot dispatch."""
    sample = dict(sample)
    args = _args(sample.pop("mode"), sample.pop("method"), **sample)
    torch.library.opcheck(torch.ops.hessmlp.mlp_jet.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_opcheck_mlp_jet_backward(mode, device):
    x, w, b, *rest, method, save = _args(mode, "forward", save=True, device=device)
    value, jac, hess, state = torch.ops.hessmlp.mlp_jet(x, w, b, *rest, method, save)
    for st in (state, []):
        args = (torch.randn_like(value), torch.randn_like(jac), None, x, w, b, *rest, st,
                [True, True, True])
        torch.library.opcheck(torch.ops.hessmlp.mlp_jet_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_stage_derivs(device):
    torch.library.opcheck(torch.ops.hessmlp.stage_derivs.default,
                          (torch.randn(3, 4, dtype=f64, device=device), [2, 1], [0.0, 0.0, 2.0, 1.0]))


def test_stage_derivs_has_no_backward():
    z = torch.randn(3, dtype=f64, requires_grad=True)
    out = torch.ops.hessmlp.stage_derivs(z, [2], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="test hook"):
        out.sum().backward()


class PinnNet(nn.Module):
    """A user's own class, read by torch.fx: input scaling folded into the first Linear."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 16), nn.Linear(16, 16), nn.Linear(16, 1)])

    def forward(self, x):
        h = 2.0 * x - 1.0
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        return self.layers[-1](h)


def _pinn_problem(dtype=f64, make=lambda: hessmlp.MLP(2, [16, 16], 1, activation="tanh"),
                  device="cpu"):
    torch.manual_seed(0)
    model = make().to(dtype=dtype, device=device)
    x = torch.rand(64, 2, dtype=dtype, device=device)
    f = torch.sin(3 * x[:, 0]) * x[:, 1]
    return model, x, f


def _pinn_loss(model, x, f):
    lap = hessmlp.laplacian(model, x, output=0)
    u = model(x)[:, 0]
    return ((lap + f) ** 2).mean() + 0.1 * (u ** 2).mean()


def _pinn_step(model, x, f):
    loss = _pinn_loss(model, x, f)
    loss.backward()
    return loss.detach()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_training_step(device):
    """A whole PINN step, Laplacian loss and backward, in one graph: same loss and gradients
    as eager. (torch.func's double backward breaks here: pytorch issues 91469, 183603.)"""
    torch._dynamo.reset()
    model, x, f = _pinn_problem(device=device)
    eager_loss = _pinn_step(model, x, f)
    eager = _grads(model)
    model.zero_grad()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(_pinn_step, fullgraph=True)
        loss = step(model, x, f)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=0)
    for g, e in zip(_grads(model), eager):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: hessmlp.MLP(2, [16, 16], 1), PinnNet],
                         ids=["MLP", "user_class"])
def test_compile_fullgraph_loss_then_backward(make):
    """The common form: compile the loss (forward and backward graphs), call backward outside."""
    torch._dynamo.reset()
    model, x, f = _pinn_problem(make=make)
    _pinn_step(model, x, f)
    eager = _grads(model)
    model.zero_grad()
    compiled = torch.compile(_pinn_loss, fullgraph=True)
    compiled(model, x, f).backward()
    for g, e in zip(_grads(model), eager):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # A second batch of another size reuses or recompiles the graph without breaking.
    x2 = torch.rand(37, 2, dtype=f64)
    model.zero_grad()
    compiled(model, x2, torch.sin(x2[:, 0])).backward()
    got = _grads(model)
    model.zero_grad()
    _pinn_step(model, x2, torch.sin(x2[:, 0]))
    for g, e in zip(got, _grads(model)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_compile_refuses_unsupported_models_by_name():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    with pytest.raises(Exception, match=r"LayerNorm at model\[1\] is not supported"):
        torch.compile(lambda x: hessmlp.laplacian(model, x), fullgraph=True)(torch.randn(3, 2))


def test_compile_user_class_without_eager_warmup():
    torch._dynamo.reset()
    model, x, f = _pinn_problem(make=PinnNet)
    assert not hasattr(model, "_hessmlp_structure")
    loss = torch.compile(_pinn_loss, fullgraph=True)(model, x, f)
    torch.testing.assert_close(loss, _pinn_loss(model, x, f), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [lambda: hessmlp.MLP(2, [16, 16], 1), PinnNet],
                         ids=["MLP", "user_class"])
def test_compile_step_returning_the_loss_fails_with_torchs_message(make):
    """A whole step that returns the loss it backwarded through, compiled with no eager call
    first: torch's own message (detach it), not an error from inside hessmlp."""
    torch._dynamo.reset()
    model, x, f = _pinn_problem(make=make)

    def step(model, x, f):
        loss = _pinn_loss(model, x, f)
        loss.backward()
        return loss

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        with pytest.raises(Exception, match=r"loss\.detach\(\)") as info:
            torch.compile(step, fullgraph=True)(model, x, f)
    assert "Speculation" not in str(info.value) and "hessmlp" not in str(info.value)


def test_readme_compiled_training_step():
    """The compiled step the README shows: the same losses as eager over a few steps."""
    torch._dynamo.reset()

    def train(compiled):
        torch.manual_seed(0)
        model = hessmlp.MLP(2, [16, 16], 1, activation="tanh").double()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        x_interior, x_boundary = torch.rand(64, 2, dtype=f64), torch.rand(16, 2, dtype=f64)
        f = torch.sin(3 * x_interior[:, 0])

        def loss_and_grads(x_interior, f, x_boundary):
            lap = hessmlp.laplacian(model, x_interior, output=0)
            loss = ((-lap - f) ** 2).mean() + 100 * (model(x_boundary) ** 2).mean()
            loss.backward()
            return loss.detach()

        if compiled:
            loss_and_grads = torch.compile(loss_and_grads, fullgraph=True)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            losses.append(loss_and_grads(x_interior, f, x_boundary))
            opt.step()
        return torch.stack(losses)

    eager = train(False)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = train(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=0)
