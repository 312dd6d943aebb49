"""The shared per-element math (csrc/activations.h) against autograd: s, s1, s2, s3."""
import pytest
import torch

import hessmlp
from hessmlp._spec import ACT_CODES, Act
from hessmlp.reference import stage_derivatives

from helpers import DEVICES, DTYPES, RTOL

CASES = [
    [Act("identity")],
    [Act("affine", 1.5, -0.25)],
    [Act("tanh")],
    [Act("sigmoid")],
    [Act("softplus", 1.0, 20.0)],
    [Act("softplus", 2.0, 1.0)],
    [Act("softplus", 0.5, 0.3)],
    [Act("silu")],
    [Act("gelu")],
    [Act("gelu_tanh")],
    [Act("relu")],
    [Act("leaky_relu", 0.1)],
    [Act("elu", 1.0)],
    [Act("elu", 0.3)],
    [Act("sin", 1.0)],
    [Act("sin", 30.0)],
    [Act("square")],
    # composed stages: the chain rule up to third order
    [Act("affine", 30.0, 0.0), Act("sin", 1.0)],
    [Act("tanh"), Act("affine", 2.0, 1.0), Act("softplus", 1.0, 20.0)],
    [Act("silu"), Act("tanh"), Act("square")],
    [Act("gelu_tanh"), Act("sigmoid"), Act("sin", 0.5)],
]


def _points(dtype):
    z = torch.cat([torch.linspace(-6, 6, 241, dtype=dtype),
                   torch.tensor([0.0, 0.5, 1.0, 1e-8, -1e-8, -30.0, 30.0, 12.0], dtype=dtype)])
    return z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", CASES, ids=lambda s: "+".join(a.name for a in s))
def test_stage_derivs_match_autograd(stage, dtype, device):
    z = _points(dtype).to(device)
    codes = [ACT_CODES[a.name] for a in stage]
    params = [float(p) for a in stage for p in (a.p0, a.p1)]
    got = torch.ops.hessmlp.stage_derivs(z, codes, params)
    ref = [r.to(device) for r in stage_derivatives(stage, z.double().cpu())]
    scale_z = max(abs(a.p0) for a in stage) if any(a.name in ("sin", "affine") for a in stage) else 1.0
    assert torch.isfinite(got).all()
    for order in range(4):
        # autograd's own third derivative of tanh-GELU overflows to nan at |z| = 30: skip those
        ok = torch.isfinite(ref[order])
        r = ref[order][ok].to(dtype)
        scale = max(r.abs().max().item(), 1.0)
        err = (got[order][ok] - r).abs().max().item()
        tol = RTOL[dtype] * scale * (scale_z if dtype == torch.float32 else 1.0)
        assert err <= tol, f"derivative {order}: error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_branch_points_follow_pytorch(device):
    # At the kinks PyTorch's autograd picks a side; the kernels pick the same one.
    z = torch.tensor([0.0], dtype=torch.float64, device=device)
    for stage in ([Act("relu")], [Act("leaky_relu", 0.1)], [Act("elu", 0.3)], [Act("softplus", 2.0, 1.0)]):
        codes = [ACT_CODES[a.name] for a in stage]
        params = [float(p) for a in stage for p in (a.p0, a.p1)]
        got = torch.ops.hessmlp.stage_derivs(z, codes, params).cpu()
        ref = stage_derivatives(stage, z.cpu())
        for order in range(4):
            assert torch.equal(got[order], ref[order]), (stage, order)
    # Softplus exactly at its threshold: smooth first derivative, zero second and third (as autograd).
    z = torch.tensor([0.4999999, 0.5, 0.5000001], dtype=torch.float64)
    got = torch.ops.hessmlp.stage_derivs(z.to(device), [ACT_CODES["softplus"]], [2.0, 1.0]).cpu()
    ref = stage_derivatives([Act("softplus", 2.0, 1.0)], z)
    assert torch.allclose(got, torch.stack(ref), rtol=1e-12, atol=0)


def test_stage_derivs_rejects_bad_codes():
    with pytest.raises(ValueError, match="act_codes"):
        torch.ops.hessmlp.stage_derivs(torch.zeros(3), [99], [0.0, 0.0])
    with pytest.raises(ValueError, match="act_params"):
        torch.ops.hessmlp.stage_derivs(torch.zeros(3), [2], [0.0])


def test_stage_derivs_rejects_too_many_functions():
    with pytest.raises(ValueError, match="at most 8 activation codes"):
        torch.ops.hessmlp.stage_derivs(torch.zeros(3), [2] * 9, [0.0] * 18)


class _Fn(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, h):
        return self.f(h)


def _module(a: Act) -> torch.nn.Module:
    nn = torch.nn
    return {
        "identity": lambda: nn.Identity(),
        "affine": lambda: _Fn(lambda h: a.p0 * h + a.p1),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "softplus": lambda: nn.Softplus(beta=a.p0, threshold=a.p1),
        "silu": lambda: nn.SiLU(),
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(a.p0),
        "elu": lambda: nn.ELU(alpha=a.p0),
        "sin": lambda: hessmlp.Sine(a.p0),
        "square": lambda: _Fn(lambda h: h * h),
    }[a.name]()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["forward", "reverse"])
@pytest.mark.parametrize("stage", [s for s in CASES if len(s) == 1], ids=lambda s: s[0].name)
def test_jet_passes_match_autograd_per_neuron(stage, method, dtype):
    # The CPU's jet passes evaluate a stage's functions themselves, lane by lane (tanh and
    # the sigmoid family in csrc/cpu/vmath.h) from the Linear's output and bias: one
    # neuron per point here (bias = z; 16 or 8 neurons a pack, the rest one at a time),
    # out to where exp overflows and underflows.
    z = _points(torch.float64)
    lane_math = stage[0].name in ("identity", "affine", "square", "tanh", "sigmoid", "silu",
                                  "gelu_tanh")
    if lane_math:
        z = torch.cat([z, torch.linspace(-8, 8, 1601, dtype=torch.float64), torch.tensor([-88.0, 88.0, -100.0, 100.0, -709.0, 709.0, -1e4, 1e4,
                                        2.0 ** -30, -(2.0 ** -30), 17.0, -17.0],
                                       dtype=torch.float64)])
    n = z.numel()
    first = torch.nn.Linear(1, n).double()
    last = torch.nn.Linear(n, n, bias=False).double()
    with torch.no_grad():
        first.weight.fill_(1.0)
        first.bias.copy_(z)
        last.weight.copy_(torch.eye(n, dtype=torch.float64))
    layers = [first, _module(stage[0]), last]
    model = torch.nn.Sequential(*layers).to(dtype)
    jet = hessmlp.jet(model, torch.zeros(2, 1, dtype=dtype), hessian="full", method=method)
    ref = stage_derivatives(stage, z.to(dtype).double())  # at the points the model sees
    keep = torch.ones(n, dtype=torch.bool)
    if stage[0].name == "softplus" and dtype == torch.float32:
        # At its threshold softplus switches branch: float32's rounding of beta * z and of the
        # threshold picks a side there as PyTorch's float32 does, not as float64 does.
        keep = (stage[0].p0 * z - stage[0].p1).abs() > 1e-5
    for order, got in enumerate((jet.value[0], jet.jacobian[0, :, 0], jet.hessian[0, :, 0, 0])):
        ok = torch.isfinite(ref[order]) & keep
        r = ref[order][ok]
        err = ((got[ok].double() - r).abs() / r.abs().clamp_min(1.0)).max().item()
        # The functions the CPU evaluates itself: within a few hundred units in the last
        # place of float64 and as close as PyTorch's own float32 tanh gives (a poor
        # approximation, or tanh near 1 from expm1 alone, fails); the others at the usual
        # tolerance.
        tol = ({torch.float64: 1e-13, torch.float32: 5e-6}[dtype] if lane_math else
               RTOL[dtype] * (30.0 if stage[0].name == "sin" and dtype == torch.float32 else 1.0))
        assert err <= tol, f"{stage[0].name} order {order}: error {err:.3e} > {tol:.3e}"
        assert torch.isfinite(got).all()
