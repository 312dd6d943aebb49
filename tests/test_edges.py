"""Edge cases that once gave silent wrong answers or crashes: non-finite values, d = 0, the
raw ops' device and bias checks, ELU just below 0, autocast."""
import pytest
import torch
from torch import nn

import hessmlp
from hessmlp._spec import ACT_CODES

from helpers import ACTIVATIONS, DEVICES, assert_rel_close, random_mlp

f64 = torch.float64


# ---------------------------------------------------------------- non-finite values

def _assert_same_values(got, ref):
    assert got.shape == ref.shape
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), (got, ref)
    ok = ~torch.isnan(ref)
    assert torch.equal(torch.isinf(got[ok]), torch.isinf(ref[ok])), (got, ref)
    assert torch.allclose(got[ok], ref[ok], rtol=1e-12, atol=1e-300, equal_nan=False), (got, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, act", ACTIVATIONS)
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_values_equal_forward_at_non_finite_inputs(name, act, method, device):
    # Every activation between Linear layers with NaN, +-inf and huge entries in x: the value
    # is the model's forward, NaN and inf included (ReLU once turned NaN into 0).
    model = random_mlp(3, [7, 5], 2, act, device=device, final_act=True)
    x = torch.randn(8, 3, dtype=f64, device=device)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    x[2, 2] = -float("inf")
    x[3, 0] = 1e300
    x[4] = float("nan")
    with torch.no_grad():
        ref = model(x)
        for hess in ("full", "diag", "trace", None):
            if method == "reverse" and hess is None:
                continue
            got = hessmlp.jet(model, x, hessian=hess, method=method)
            _assert_same_values(got.value, ref)
            # Rows without a non-finite entry are unaffected by the others.
            fine = torch.isfinite(x).all(1) & (x.abs() < 1e10).all(1)
            jac = torch.func.vmap(torch.func.jacrev(model))(x[fine])
            assert_rel_close(got.value[fine], ref[fine], f64, "value")
            assert_rel_close(got.jacobian[fine], jac, f64, "jacobian")


@pytest.mark.parametrize("name, act", ACTIVATIONS)
def test_nan_weight_gives_nan_value(name, act):
    model = random_mlp(3, [6], 1, act, final_act=True)
    with torch.no_grad():
        model[0].weight[2, 1] = float("nan")
    x = torch.randn(4, 3, dtype=f64)
    with torch.no_grad():
        ref = model(x)
        for method in ("forward", "reverse"):
            _assert_same_values(hessmlp.jet(model, x, method=method).value, ref)


def test_nan_in_x_propagates_into_derivatives_of_that_sample_only():
    model = random_mlp(3, [6, 6], 1, nn.ReLU)
    x = torch.randn(5, 3, dtype=f64)
    x[2, 1] = float("nan")
    j = hessmlp.jet(model, x)
    assert torch.isnan(j.value[2]).all()
    others = [0, 1, 3, 4]
    assert torch.isfinite(j.jacobian[others]).all() and torch.isfinite(j.hessian[others]).all()


# ---------------------------------------------------------------- ELU below 0

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_elu_keeps_precision_just_below_zero(dtype, device):
    z = torch.tensor([-1e-10, -1e-7, -1e-5, -1e-3, -0.3, -5.0, -40.0], dtype=dtype, device=device)
    got = torch.ops.hessmlp.stage_derivs(z, [ACT_CODES["elu"]], [0.7, 0.0])
    ref = torch.nn.functional.elu(z.double(), alpha=0.7).to(dtype)
    rel = ((got[0] - ref).abs() / ref.abs()).max().item()
    assert rel <= 2 * torch.finfo(dtype).eps, rel
    # The derivatives alpha e^z.
    e = 0.7 * torch.exp(z.double()).to(dtype)
    for order in (1, 2, 3):
        assert torch.allclose(got[order], e, rtol=2 * torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------- d = 0

@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("fn, shape", [(hessmlp.hessian, (4, 3, 0, 0)), (hessmlp.hessian_diag, (4, 3, 0)),
                                       (hessmlp.laplacian, (4, 3)), (hessmlp.jacobian, (4, 3, 0))])
def test_no_input_features(fn, shape, method):
    # d = 0 (a network of its biases alone): empty derivatives, a zero Laplacian, the value
    # of the forward; once a segfault on reverse-Gram's path.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh()).double()
    x = torch.zeros(4, 0, dtype=f64)
    out = fn(model, x, method=method)
    assert out.shape == shape
    if fn is hessmlp.laplacian:
        assert torch.equal(out, torch.zeros(shape, dtype=f64))
    j = hessmlp.jet(model, x, hessian="trace", method=method)
    assert torch.allclose(j.value, model(x).detach(), rtol=1e-14, atol=0)
    # And its gradients w.r.t. the parameters (the bias path alone).
    loss = j.value.sum() + j.hessian.sum()
    loss.backward()
    ref = nn.Sequential(*[type(m)() if not isinstance(m, nn.Linear) else m for m in model])
    assert model[2].bias.grad is not None and torch.isfinite(model[2].bias.grad).all()


# ---------------------------------------------------------------- the raw ops

def _raw_args(device_w="cpu", device_x="cpu"):
    x = torch.randn(2, 3, device=device_x)
    w = [torch.randn(4, 3, device=device_w), torch.randn(1, 4, device=device_w)]
    return x, w


@pytest.mark.parametrize("dx, dw", [("cpu", "meta"), ("meta", "cpu")])
def test_raw_op_refuses_mixed_devices(dx, dw):
    x, w = _raw_args(dw, dx)
    with pytest.raises(ValueError, match=r"is on (meta|cpu) but x is on (cpu|meta)"):
        torch.ops.hessmlp.mlp_jet(x, w, [None, None], [1, 0], [ACT_CODES["tanh"]], [0.0, 0.0],
                                  "full", "forward")
    with pytest.raises(ValueError, match=r"is on (meta|cpu) but x is on (cpu|meta)"):
        torch.ops.hessmlp.mlp_jet_backward(None, None, None, x, w, [None, None], [1, 0],
                                           [ACT_CODES["tanh"]], [0.0, 0.0], "full", [],
                                           [True, True, True])
    b = torch.randn(4, device="meta" if dx == "cpu" else "cpu")
    x, w = _raw_args(dx, dx)
    with pytest.raises(ValueError, match=r"biases\[0\] is on"):
        torch.ops.hessmlp.mlp_jet(x, w, [b, None], [1, 0], [ACT_CODES["tanh"]], [0.0, 0.0],
                                  "full", "forward")


def test_raw_op_refuses_mixed_biases_that_require_grad():
    # Autograd cannot see into a list of None and tensors: it would drop that bias's gradient.
    x, w = _raw_args()
    b = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="mixes None and tensors"):
        torch.ops.hessmlp.mlp_jet(x, w, [b, None], [1, 0], [ACT_CODES["tanh"]], [0.0, 0.0],
                                  "full", "forward")
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="mixes None and tensors"):
        torch.ops.hessmlp.mlp_jet(x, w, [b, None], [1, 0], [ACT_CODES["tanh"]], [0.0, 0.0],
                                  "full", "forward")
    with torch.no_grad():  # nothing to differentiate: fine
        torch.ops.hessmlp.mlp_jet(x, w, [b, None], [1, 0], [ACT_CODES["tanh"]], [0.0, 0.0],
                                  "full", "forward")


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("method", ["forward", "reverse"])
@pytest.mark.parametrize("B", [3, 3000])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_the_parameters_dtype(method, B, amp):
    model = hessmlp.MLP(3, [64, 64], 1)
    x = torch.randn(B, 3)
    ref = hessmlp.jet(model, x, method=method)
    with torch.autocast("cpu", amp):
        got = hessmlp.jet(model, x, method=method)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # The backward too.
    x.requires_grad_(True)
    with torch.autocast("cpu", amp):
        lap = hessmlp.laplacian(model, x)
    (g,) = torch.autograd.grad(lap.sum(), [x])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


# ---------------------------------------------------------------- transforms hessmlp refuses

def test_torch_func_transforms_are_refused_with_what_works():
    model = hessmlp.MLP(2, [8], 1)
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"torch.func transforms .* loss.backward\(\)"):
        torch.func.grad(lambda x: hessmlp.laplacian(model, x).sum())(x)
    with pytest.raises(RuntimeError, match="hessmlp is batched already"):
        torch.func.vmap(lambda xi: hessmlp.laplacian(model, xi))(x)


def test_torchscript_is_refused_with_what_works():
    model = hessmlp.MLP(2, [8], 1)
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace .* Use torch.compile"):
        torch.jit.trace(lambda x: hessmlp.laplacian(model, x), (x,))

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return hessmlp.laplacian(self.net, x)

    # TorchScript's compiler stops at hessmlp's signature; the line it shows says what to do.
    with pytest.raises(RuntimeError, match=r"(?s)not TorchScript: use torch.compile"):
        torch.jit.script(Loss())
