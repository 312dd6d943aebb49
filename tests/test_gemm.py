"""hessmlp's own CPU matrix product (csrc/cpu/gemm.h), every instruction set this CPU runs,
against float64 products with a bound on the rounding error, on shapes that cover every
edge of its register tiles; and whole networks computed with each instruction set (a
subprocess with HESSMLP_CPU_ISA) against torch.func."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hessmlp
import hessmlp.bench

NATIVE_BACKEND = True  # (the CPU product is not one of the emulated ops)

OPS = torch.ops.hessmlp
SUPPORTED = OPS._cpu_isa(torch.empty(0))[1:]
ISAS = ["avx512", "avx2", "aten"]
EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _operand(rows, cols, dtype, transposed, gen):
    if transposed:
        return torch.randn(cols, rows, dtype=dtype, generator=gen).t()
    return torch.randn(rows, cols, dtype=dtype, generator=gen)


def _check(got, a, b, c, dtype):
    """|got - exact| <= 2 (K + 2) eps (|a| |b| + |c|): the rounding of any summation order."""
    K = a.shape[1]
    exact = a.double() @ b.double()
    bound = a.double().abs() @ b.double().abs()
    if c is not None:
        exact = exact + c.double()
        bound = bound + c.double().abs()
    err = (got.double() - exact).abs()
    tol = 2 * (K + 2) * EPS[dtype] * bound + 1e-300
    worst = (err / tol).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {err.max().item():.3e} exceeds the rounding bound ({worst:.2f}x)"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_on_tile_edges(isa, dtype):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    gen = torch.Generator().manual_seed(0)
    for M in (1, 5, 6, 7, 11, 12, 13, 25, 61):
        for K in (1, 3, 17, 128, 300):
            for N in (1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 65, 130):
                a = _operand(M, K, dtype, (M + N) % 2 == 1, gen)
                b = _operand(K, N, dtype, (K + N) % 3 == 0, gen)
                c = torch.randn(M, N, dtype=dtype, generator=gen) if (M * N) % 2 else None
                got = OPS._cpu_mm(a, b, c, isa)
                assert got.shape == (M, N) and got.dtype == dtype
                _check(got, a, b, c, dtype)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_large_products_split_among_threads(isa):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    gen = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for dtype in (torch.float32, torch.float64):
                a = torch.randn(3001, 129, dtype=dtype, generator=gen)
                b = torch.randn(129, 77, dtype=dtype, generator=gen)
                _check(OPS._cpu_mm(a, b, None, isa), a, b, None, dtype)
                # a transposed (the weight gradient's g^T @ act), K past one k slice
                # a b large enough to be packed into panels (past 128 KB), a transposed
                a = torch.randn(300, 600, dtype=dtype, generator=gen)
                b = torch.randn(77, 600, dtype=dtype, generator=gen).t()
                _check(OPS._cpu_mm(a, b, None, isa), a, b, None, dtype)
                g = torch.randn(700, 40, dtype=dtype, generator=gen)
                act = torch.randn(700, 50, dtype=dtype, generator=gen)
                c = torch.randn(40, 50, dtype=dtype, generator=gen)
                _check(OPS._cpu_mm(g.t(), act, c, isa), g.t(), act, c, dtype)
    finally:
        torch.set_num_threads(threads)


def test_empty_and_zero_k():
    for isa in SUPPORTED:
        a = torch.randn(5, 0)
        b = torch.randn(0, 7)
        assert torch.equal(OPS._cpu_mm(a, b, None, isa), torch.zeros(5, 7))
        c = torch.randn(5, 7)
        assert torch.equal(OPS._cpu_mm(a, b, c, isa), c)
        assert OPS._cpu_mm(torch.randn(0, 3), torch.randn(3, 4), None, isa).shape == (0, 4)


def test_bad_isa_names():
    with pytest.raises(ValueError, match="isa must be"):
        OPS._cpu_mm(torch.randn(2, 2), torch.randn(2, 2), None, "sse9")
    for isa in ISAS:
        if isa not in SUPPORTED:
            with pytest.raises(ValueError, match="cannot run"):
                OPS._cpu_mm(torch.randn(2, 2), torch.randn(2, 2), None, isa)


def test_fma_probe():
    if SUPPORTED == ["aten"]:
        with pytest.raises(RuntimeError, match="AVX2 or AVX-512"):
            OPS._fma_peak(torch.empty(0), 10000)
        assert hessmlp.bench.fma_peak() == 0.0
        return
    secs, flops = OPS._fma_peak(torch.empty(0), 10000).tolist()
    assert secs > 0 and flops > 0
    assert hessmlp.bench.fma_peak(0.01) > 0


_NETWORKS = textwrap.dedent("""
    import torch, hessmlp
    from torch import nn
    torch.manual_seed(0)
    assert torch.ops.hessmlp._cpu_isa(torch.empty(0))[0] == {isa!r}
    worst = 0.0
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        chain = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 33), nn.SiLU(),
                              nn.Linear(33, 2)).to(dtype)
        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = nn.Linear(3, 21), nn.Linear(21, 21), nn.Linear(21, 1)
            def forward(self, x):
                h = torch.tanh(self.a(x))
                return self.c(h + torch.sin(self.b(h)) * h)
        res = Res().to(dtype)
        x = torch.randn(301, 3, dtype=dtype)
        for model in (chain, res):
            H = torch.func.vmap(torch.func.hessian(model))(x)
            for method in (("forward", "reverse") if model is chain else ("forward",)):
                got = hessmlp.hessian(model, x, method=method)
                worst = max(worst, ((got - H).abs().max() / H.abs().max()).item() / tol)
            lap = hessmlp.laplacian(model, x)
            worst = max(worst, ((lap - H.diagonal(dim1=-2, dim2=-1).sum(-1)).abs().max()
                                / H.abs().max()).item() / tol)
            # gradients of a Laplacian loss w.r.t. the parameters
            ps = list(model.parameters())
            g = torch.autograd.grad(hessmlp.laplacian(model, x).square().mean(), ps,
                                    allow_unused=True, materialize_grads=True)
            def loss(*p):
                names = [n for n, _ in model.named_parameters()]
                f = lambda xi: torch.func.functional_call(model, dict(zip(names, p)), (xi,))
                h = torch.func.vmap(torch.func.hessian(f))(x)
                return h.diagonal(dim1=-2, dim2=-1).sum(-1).square().mean()
            ref = torch.autograd.grad(loss(*ps), ps, allow_unused=True, materialize_grads=True)
            for a, b in zip(g, ref):
                worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() / tol)
    print("WORST", worst)
""")


@pytest.mark.parametrize("isa", ISAS)
def test_networks_with_each_isa(isa):
    """The ops' results with each instruction set's products (HESSMLP_CPU_ISA, read when the
    library loads: a fresh process) against torch.func, float64 and float32."""
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    env = dict(os.environ, HESSMLP_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _NETWORKS.format(isa=isa)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst <= 1.0, f"{isa}: error {worst:.2f}x the tolerance"
