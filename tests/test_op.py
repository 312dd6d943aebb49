"""The registered ops: schema, fake kernels against the real ones, opcheck."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import hessmlp

from helpers import random_mlp


def _args(mode, method, dtype=torch.float64, B=4, d=3):
    model = random_mlp(d, [6, 5], 2, nn.Tanh, dtype=dtype)
    net = hessmlp.network_of(model)
    x = torch.randn(B, d, dtype=dtype)
    w = [t.detach() for t in net.weights]
    b = [t.detach() for t in net.biases]
    return (x, w, b, net.stage_sizes, net.act_codes, net.act_params, mode, method)


CASES = [("full", "forward"), ("full", "reverse"), ("diag", "forward"), ("trace", "forward"),
         ("none", "forward")]


@pytest.mark.parametrize("mode, method", CASES)
@pytest.mark.parametrize("B", [0, 1, 5])
def test_fake_kernel_matches_real(mode, method, B):
    args = _args(mode, method, B=B)
    real = torch.ops.hessmlp.mlp_jet(*args)
    with FakeTensorMode() as fm:
        fake_args = list(args)
        fake_args[0] = fm.from_tensor(args[0])
        fake_args[1] = [fm.from_tensor(t) for t in args[1]]
        fake_args[2] = [fm.from_tensor(t) for t in args[2]]
        fake = torch.ops.hessmlp.mlp_jet(*fake_args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device


@pytest.mark.parametrize("mode, method", CASES)
def test_opcheck_schema_and_fake(mode, method):
    torch.library.opcheck(torch.ops.hessmlp.mlp_jet.default, _args(mode, method),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_stage_derivs():
    torch.library.opcheck(torch.ops.hessmlp.stage_derivs.default,
                          (torch.randn(3, 4, dtype=torch.float64), [2, 1], [0.0, 0.0, 2.0, 1.0]),
                          test_utils=("test_schema", "test_faketensor"))


def test_backward_fails_loudly_until_implemented():
    model = hessmlp.MLP(2, [4], 1).double()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    L = hessmlp.laplacian(model, x)
    with pytest.raises(NotImplementedError, match="not implemented in this version"):
        L.sum().backward()
    with torch.no_grad():
        assert not hessmlp.laplacian(model, x).requires_grad
