"""Gradients through hessmlp's results: against torch.func and finite differences."""

import pytest
import torch
from torch import nn

import hessmlp

from helpers import ACTIVATIONS, DEVICES, DTYPES, assert_rel_close, func_jet, random_configs, random_mlp

ACT = dict(ACTIVATIONS)
MODES = ["full", "diag", "trace", None]
f64 = torch.float64


class JetOf(nn.Module):
    """The outputs of hessmlp.jet as a module, so that gradcheck and functional_call can swap
    the wrapped model's parameters."""

    def __init__(self, model, mode, output=None, method="auto"):
        super().__init__()
        self.model, self.mode, self.output, self.method = model, mode, output, method

    def forward(self, x):
        r = hessmlp.jet(self.model, x, hessian=self.mode, output=self.output, method=self.method)
        return tuple(t for t in r if t is not None)


def _gradcheck(model, x, mode, output=None, method="auto"):
    wrapper = JetOf(model, mode, output, method)
    names = [n for n, _ in wrapper.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in wrapper.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x.detach().clone().requires_grad_(), *params),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", [a for a, _ in ACTIVATIONS])
def test_gradcheck(act, mode, device):
    for bias, final_act, output in ((True, False, None), (False, True, 1)):
        model = random_mlp(2, [4, 3], 2, ACT[act], bias=bias, final_act=final_act, seed=3,
                           device=device)
        x = torch.randn(3, 2, dtype=f64, device=device)
        _gradcheck(model, x, mode, output)


def test_gradcheck_reverse_method_and_unbatched():
    model = random_mlp(3, [5], 2, nn.Tanh, seed=1)
    for mode in ("full", "diag", "trace"):
        _gradcheck(model, torch.randn(2, 3, dtype=f64), mode, method="reverse")
    _gradcheck(model, torch.randn(3, dtype=f64), "full", output=0)


# depth 1-4, widths 1-33, d 1-6, m 1-3
CONFIGS = random_configs(4321, range(1, 5), 6, [1, 3, 8, 17, 33], 3)
# float64: rounding only; float32: the result's scale times single precision.
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 5e-4}


def _compare_grads(model, x, mode, output=None, method="auto", what="", seed=0):
    """Gradients of a random linear functional of (value, Jacobian, Hessian part) w.r.t. x and
    every parameter: hessmlp against autograd through torch.func."""
    dtype = x.dtype
    params = dict(model.named_parameters())
    xr = x.detach().clone().requires_grad_()
    pr = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ref = func_jet(model, pr, xr, mode)
    if output is not None:
        ref = [t[:, output] for t in ref]
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=dtype).to(x.device) for t in ref]
    ref_grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)),
                                    [xr, *pr.values()])

    xh = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    r = hessmlp.jet(model, xh, hessian=mode, output=output, method=method)
    outs = [t for t in r if t is not None]
    assert len(outs) == len(ref)
    sum((w * t).sum() for w, t in zip(weights, outs)).backward()
    got = [xh.grad, *[p.grad for p in params.values()]]
    for name, a, e in zip(["x", *params], got, ref_grads):
        assert a is not None, f"{what}: no gradient for {name}"
        scale = max(e.abs().max().item(), 1.0)
        err = (a - e).abs().max().item()
        assert err <= GRAD_RTOL[dtype] * scale, \
            f"{what} grad {name}: max error {err:.3e} > {GRAD_RTOL[dtype]:.0e} * {scale:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", [a for a, _ in ACTIVATIONS])
def test_gradients_against_torch_func(act, mode, dtype, device):
    for i, (d, widths, m, bias, final_act) in enumerate(CONFIGS):
        model = random_mlp(d, widths, m, ACT[act], bias=bias, dtype=dtype, seed=i,
                           final_act=final_act, device=device)
        x = torch.randn(4, d, dtype=dtype, device=device)
        tag = f"{act} {mode} d={d} widths={widths} m={m} bias={bias} final_act={final_act}"
        _compare_grads(model, x, mode, what=tag, seed=i)
        _compare_grads(model, x, mode, output=m - 1, what=tag + " output", seed=i)


@pytest.mark.parametrize("make, d", [
    (lambda: __import__("test_models").Siren(2, 16, 1, w0=3.0), 2),
    (lambda: __import__("test_models").Mixed().eval(), 3),
    (lambda: __import__("test_models").PinnMLP([3, 8, 8, 2]), 3),
    (lambda: hessmlp.MLP(2, [6], 1, activation="silu", final_activation="tanh"), 2),
])
def test_gradients_of_traced_models(make, d):
    """Models read by torch.fx, scalar affine maps folded into the first Linear included."""
    torch.manual_seed(0)
    model = make().double()
    for mode in MODES:
        _compare_grads(model, torch.randn(5, d, dtype=f64), mode, what=type(model).__name__)


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_method_gradients_match_forward(device):
    model = random_mlp(4, [9, 7], 3, nn.SiLU, seed=2, device=device)
    x = torch.randn(6, 4, dtype=f64, device=device)
    for mode in ("full", "diag", "trace"):
        _compare_grads(model, x, mode, method="reverse", what=f"reverse {mode}")


def _op_args(mode, B=5, d=3, dtype=f64, requires_grad=True):
    model = random_mlp(d, [6, 5], 2, nn.Tanh, dtype=dtype, final_act=True)
    net = hessmlp.network_of(model)
    x = torch.randn(B, d, dtype=dtype, requires_grad=requires_grad)
    w = [t.detach().clone().requires_grad_(requires_grad) for t in net.weights]
    b = [t.detach().clone().requires_grad_(requires_grad) for t in net.biases]
    return [x, w, b, net.stage_sizes, net.act_codes, net.act_params, mode]


@pytest.mark.parametrize("mode", ["full", "diag", "trace", "none"])
def test_saved_and_recomputed_state_agree(mode):
    x, w, b, *rest = _op_args(mode)
    value, jac, hess, state = torch.ops.hessmlp.mlp_jet(x, w, b, *rest, "forward", True)
    assert len(state) == len(w) and not any(s.requires_grad for s in state)
    grads = [torch.randn_like(t) for t in (value, jac, hess)]
    recomputed = torch.ops.hessmlp.mlp_jet_backward(*grads, x, w, b, *rest, [], [True] * 3)
    saved = torch.ops.hessmlp.mlp_jet_backward(*grads, x, w, b, *rest, state, [True] * 3)
    for r, s in zip([recomputed[0], *recomputed[1], *recomputed[2]],
                    [saved[0], *saved[1], *saved[2]]):
        assert torch.equal(r, s)


def test_only_the_asked_gradients():
    model = random_mlp(3, [6], 2, nn.Tanh, seed=5)
    model[0].requires_grad_(False)  # a frozen first layer
    x = torch.randn(4, 3, dtype=f64)
    hessmlp.laplacian(model, x).sum().backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is not None and model[2].bias.grad is not None
    # Only x: the parameters are untouched.
    model.requires_grad_(False)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(hessmlp.laplacian(model, xg).sum(), [xg])
    xr = x.clone().requires_grad_()
    params = {k: v for k, v in model.named_parameters()}
    ref = func_jet(model, params, xr, "trace")[2]
    (gr,) = torch.autograd.grad(ref.sum(), [xr])
    assert_rel_close(gx, gr, f64, "x-only gradient")
    # An output that the loss does not use gets no gradient computation at all.
    xg = x.clone().requires_grad_()
    r = hessmlp.jet(model, xg, hessian="diag")
    (gv,) = torch.autograd.grad(r.value.sum(), [xg])
    assert_rel_close(gv, r.jacobian.sum(1).detach(), f64, "value-only gradient")


def test_no_state_without_grad():
    model = random_mlp(3, [6], 2, nn.Tanh)
    x = torch.randn(4, 3, dtype=f64)
    with torch.no_grad():
        assert not hessmlp.laplacian(model, x).requires_grad
    assert hessmlp.laplacian(model, x).requires_grad  # the parameters require grad


def test_double_backward_is_refused():
    model = random_mlp(2, [5], 1, nn.Tanh)
    x = torch.randn(3, 2, dtype=f64, requires_grad=True)
    lap = hessmlp.laplacian(model, x)
    (gx,) = torch.autograd.grad(lap.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        gx.sum().backward()


def test_empty_batch_backward():
    model = random_mlp(2, [5], 1, nn.Tanh)
    x = torch.randn(0, 2, dtype=f64, requires_grad=True)
    hessmlp.hessian(model, x).sum().backward()
    assert x.grad.shape == (0, 2)
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight))


def test_float32_training_gradients():
    model = random_mlp(3, [32, 32], 1, nn.Tanh, dtype=torch.float32)
    _compare_grads(model, torch.randn(16, 3), "trace", what="float32")


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.__setitem__(0, torch.zeros(5, 3, dtype=f64)), "grad_value must have shape"),
    (lambda a: a.__setitem__(2, torch.zeros(5, 2, 3, 3, dtype=f64)), "grad_hessian must have shape"),
    (lambda a: a.__setitem__(1, torch.zeros(5, 2, 3)), "grad_jacobian has dtype"),
    (lambda a: a.__setitem__(10, [torch.zeros(5, 6, dtype=f64)]), "state must be empty or have 3"),
    (lambda a: a.__setitem__(10, [torch.zeros(5, 6, dtype=f64), torch.zeros(5, 9, 5, dtype=f64),
                                  torch.zeros(5, 9, 2, dtype=f64)]), r"state\[1\] must have shape"),
])
def test_backward_op_rejects_bad_arguments(bad, match):
    x, w, b, *rest = _op_args("diag", requires_grad=False)
    grads = [torch.zeros(5, 2, dtype=f64), torch.zeros(5, 2, 3, dtype=f64),
             torch.zeros(5, 2, 3, dtype=f64)]
    args = [*grads, x, w, b, *rest, [], [True, True, True]]
    bad(args)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.hessmlp.mlp_jet_backward(*args)


def test_op_refuses_mixed_none_biases_under_autograd():
    x, w, b, *rest = _op_args("trace")
    b[1] = None
    with pytest.raises(ValueError, match="mixes None and tensors"):
        torch.ops.hessmlp.mlp_jet(x, w, b, *rest, "forward")
    with torch.no_grad():
        torch.ops.hessmlp.mlp_jet(x, w, b, *rest, "forward")  # fine without gradients


@pytest.mark.parametrize("mode", MODES)
def test_gradients_of_blocked_batches(mode):
    """A batch large enough for the blocked forward pass, gradients through its saved state."""
    model = random_mlp(3, [80, 80], 2, ACT["tanh"], seed=11)
    _compare_grads(model, torch.randn(700, 3, dtype=f64), mode, what=f"blocked {mode}")
