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
