"""Every public function, mode and method against torch.func on random networks."""

import pytest
import torch
from torch import nn

import hessmlp
from hessmlp import reference

from helpers import (ACTIVATIONS, DEVICES, DTYPES, assert_rel_close, func_reference, random_configs,
                     random_mlp)

ACT = dict(ACTIVATIONS)


# depth 1-5, widths 1-64, d 1-8, m 1-4
CONFIGS = random_configs(1234, range(1, 6), 8, [1, 2, 5, 16, 33, 64], 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [a for a, _ in ACTIVATIONS])
def test_all_modes_against_torch_func(act, dtype, device):
    for i, (d, widths, m, bias, final_act) in enumerate(CONFIGS):
        model = random_mlp(d, widths, m, ACT[act], bias=bias, dtype=dtype, device=device, seed=i,
                           final_act=final_act)
        x = torch.randn(5, d, dtype=dtype, device=device)
        value, jac, hess = func_reference(model, x)
        tag = f"{act} d={d} widths={widths} m={m} bias={bias} final_act={final_act}"
        for method in ("forward", "reverse"):
            r = hessmlp.jet(model, x, hessian="full", method=method)
            assert_rel_close(r.value, value, dtype, f"value {method} {tag}")
            assert_rel_close(r.jacobian, jac, dtype, f"jacobian {method} {tag}")
            assert_rel_close(r.hessian, hess, dtype, f"hessian {method} {tag}")
        assert_rel_close(hessmlp.hessian(model, x), hess, dtype, f"hessian auto {tag}")
        diag = hess.diagonal(dim1=-2, dim2=-1)
        assert_rel_close(hessmlp.hessian_diag(model, x), diag, dtype, f"diag {tag}")
        assert_rel_close(hessmlp.laplacian(model, x), diag.sum(-1), dtype, f"trace {tag}")
        assert_rel_close(hessmlp.jacobian(model, x), jac, dtype, f"jacobian {tag}")
        for method in ("forward", "reverse"):
            assert_rel_close(hessmlp.jacobian(model, x, method=method), jac, dtype,
                             f"jacobian {method} {tag}")
        for mode, part in (("diag", diag), ("trace", diag.sum(-1)), (None, None)):
            for method in ("forward", "reverse") if mode else ("forward", "reverse", "auto"):
                r = hessmlp.jet(model, x, hessian=mode, method=method)
                assert_rel_close(r.value, value, dtype, f"jet value {mode} {method} {tag}")
                assert_rel_close(r.jacobian, jac, dtype, f"jet jacobian {mode} {method} {tag}")
                if mode is None:
                    assert r.hessian is None
                else:
                    assert_rel_close(r.hessian, part, dtype, f"jet {mode} {method} {tag}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_selection_and_unbatched(dtype):
    model = random_mlp(4, [16, 16], 3, nn.Tanh, dtype=dtype)
    x = torch.randn(6, 4, dtype=dtype)
    value, jac, hess = func_reference(model, x)
    for k in (0, 2, -1):
        for method in ("forward", "reverse"):
            assert_rel_close(hessmlp.hessian(model, x, output=k, method=method), hess[:, k], dtype, f"k={k}")
        assert_rel_close(hessmlp.hessian_diag(model, x, output=k), hess[:, k].diagonal(dim1=-2, dim2=-1),
                         dtype)
        assert_rel_close(hessmlp.laplacian(model, x, output=k),
                         hess[:, k].diagonal(dim1=-2, dim2=-1).sum(-1), dtype)
        assert_rel_close(hessmlp.jacobian(model, x, output=k), jac[:, k], dtype)
        r = hessmlp.jet(model, x, output=k)
        assert_rel_close(r.value, value[:, k], dtype)
    # unbatched input drops B everywhere
    x1 = x[2]
    assert_rel_close(hessmlp.hessian(model, x1), hess[2], dtype)
    assert_rel_close(hessmlp.hessian(model, x1, output=1), hess[2, 1], dtype)
    assert_rel_close(hessmlp.hessian_diag(model, x1), hess[2].diagonal(dim1=-2, dim2=-1), dtype)
    assert_rel_close(hessmlp.laplacian(model, x1), hess[2].diagonal(dim1=-2, dim2=-1).sum(-1), dtype)
    assert_rel_close(hessmlp.jacobian(model, x1), jac[2], dtype)
    r = hessmlp.jet(model, x1, hessian="trace", output=0)
    assert r.value.shape == () and r.jacobian.shape == (4,) and r.hessian.shape == ()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_implementation_matches_torch_func(dtype):
    model = random_mlp(3, [12, 7], 2, nn.SiLU, dtype=dtype)
    x = torch.randn(4, 3, dtype=dtype)
    value, jac, hess = func_reference(model, x)
    net = hessmlp.network_of(model)
    v, j, h = reference.jet_forward(x, net.weights, net.biases, net.stages, "full")
    assert_rel_close(v, value, dtype)
    assert_rel_close(j, jac, dtype)
    assert_rel_close(h, hess, dtype)
    assert_rel_close(reference.hessian_reverse(x, net.weights, net.biases, net.stages), hess, dtype)
    _, _, t = reference.jet_forward(x, net.weights, net.biases, net.stages, "trace")
    assert_rel_close(t, hess.diagonal(dim1=-2, dim2=-1).sum(-1), dtype)


def test_large_d_uses_gemm_gram():
    # d above the fused-loop limit takes the batched-GEMM branch of reverse-Gram.
    model = random_mlp(40, [24, 24], 2, nn.Tanh)
    x = torch.randn(3, 40, dtype=torch.float64)
    _, _, hess = func_reference(model, x)
    assert_rel_close(hessmlp.hessian(model, x, method="reverse"), hess, torch.float64)
    assert_rel_close(hessmlp.hessian(model, x, method="forward"), hess, torch.float64)


def test_hessian_is_symmetric_and_dtype_preserved():
    model = random_mlp(5, [20], 2, nn.GELU, dtype=torch.float32)
    x = torch.randn(8, 5)
    for method in ("forward", "reverse"):
        H = hessmlp.hessian(model, x, method=method)
        assert H.dtype == torch.float32
        assert torch.equal(H, H.transpose(-1, -2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode, method", [("full", "forward"), ("diag", "forward"), ("trace", "forward"),
                                          (None, "forward"), ("full", "reverse"), ("diag", "reverse"),
                                          ("trace", "reverse")])
def test_blocked_batches_match_small_calls(mode, method, dtype):
    """Large batches go through the CPU's blocked passes (blocks of samples through all
    layers, in parallel): same results as small calls, and as torch.func."""
    model = random_mlp(4, [96, 64], 2, ACT["silu"], dtype=dtype, seed=7, final_act=True)
    x = torch.randn(1500, 4, dtype=dtype)
    whole = hessmlp.jet(model, x, hessian=mode, method=method)
    parts = [hessmlp.jet(model, xi, hessian=mode, method=method) for xi in x.split(7)]
    for k, t in enumerate(whole):
        if t is None:
            continue
        assert_rel_close(t, torch.cat([p[k] for p in parts]), dtype, f"output {k}")
    value, jac, hess = func_reference(model, x[:300])
    assert_rel_close(whole.jacobian[:300], jac, dtype, "jacobian vs torch.func")
    ref = {"full": hess, "diag": hess.diagonal(dim1=-2, dim2=-1),
           "trace": hess.diagonal(dim1=-2, dim2=-1).sum(-1)}.get(mode)
    if ref is not None:
        assert_rel_close(whole.hessian[:300], ref, dtype, f"{mode} vs torch.func")


@pytest.mark.parametrize("final_act", [True, False])
@pytest.mark.parametrize("d", [7, 13, 16, 17, 23, 40])
def test_reverse_gram_block_triangle(d, final_act):
    """Up to d = 16 reverse-Gram's Gram kernel, above it batched GEMMs over one triangle of
    blocks, mirrored."""
    model = random_mlp(d, [24, 17], 3, ACT["gelu"], seed=d, final_act=final_act)
    x = torch.randn(5, d, dtype=torch.float64)
    ref = func_reference(model, x)[2]
    got = hessmlp.hessian(model, x, method="reverse")
    assert_rel_close(got, ref, torch.float64, f"reverse d={d}")
    # Off-diagonal blocks are mirrored exactly, diagonal blocks are symmetric up to rounding.
    assert_rel_close(got, got.transpose(-1, -2).contiguous(), torch.float64, "symmetry")


class _Affine(nn.Module):
    def forward(self, h):
        return 2.0 * h - 0.5


@pytest.mark.parametrize("d", [3, 20])
@pytest.mark.parametrize("m", [1, 3])
def test_reverse_gram_with_linear_last_stage(d, m):
    """Reverse-Gram with a linear last stage (none, or affine) skips that stage's Gram term,
    gives the last two stages the value alone and takes the Jacobian from its backward pass
    (dy/dx = dy/dz_0 W_0); with a nonlinear one it does not. One and two Linear layers too."""
    models = [
        nn.Sequential(nn.Linear(d, m)),
        nn.Sequential(nn.Linear(d, 7), nn.Tanh()),
        nn.Sequential(nn.Linear(d, 9), nn.Tanh(), nn.Linear(9, m)),
        nn.Sequential(nn.Linear(d, 9), nn.Tanh(), nn.Linear(9, m), _Affine()),
        nn.Sequential(nn.Linear(d, 9), nn.Tanh(), nn.Linear(9, m), nn.Sigmoid()),
        nn.Sequential(nn.Linear(d, 33), nn.SiLU(), nn.Linear(33, 17), nn.Tanh(),
                      nn.Linear(17, m, bias=False), _Affine()),
    ]
    for i, model in enumerate(models):
        torch.manual_seed(i)
        model = model.double()
        x = torch.randn(40, d, dtype=torch.float64)
        value, jac, hess = func_reference(model, x)
        diag = hess.diagonal(dim1=-2, dim2=-1)
        for mode, part in (("full", hess), ("diag", diag), ("trace", diag.sum(-1))):
            r = hessmlp.jet(model, x, hessian=mode, method="reverse")
            tag = f"model {i} d={d} m={m} {mode}"
            assert_rel_close(r.value, value, torch.float64, f"value {tag}")
            assert_rel_close(r.jacobian, jac, torch.float64, f"jacobian {tag}")
            assert_rel_close(r.hessian, part, torch.float64, f"hessian {tag}")
