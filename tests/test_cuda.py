"""CUDA specifics: agreement with the CPU kernels, devices, streams, TF32. Skipped without a GPU."""
import pytest
import torch
from torch import nn

import hessmlp

from helpers import random_mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
f64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode, method", [("full", "forward"), ("full", "reverse"),
                                          ("diag", "forward"), ("diag", "reverse"),
                                          ("trace", "forward"), ("trace", "reverse"),
                                          (None, "forward")])
def test_cuda_matches_cpu(mode, method, dtype):
    model = random_mlp(5, [40, 33], 3, nn.SiLU, dtype=dtype, final_act=True)
    x = torch.randn(257, 5, dtype=dtype)
    cpu = hessmlp.jet(model, x, hessian=mode, method=method)
    gpu = hessmlp.jet(model.cuda(), x.cuda(), hessian=mode, method=method)
    tol = 1e-12 if dtype == f64 else 1e-5
    for c, g in zip(cpu, gpu):
        if c is not None:
            torch.testing.assert_close(g.cpu(), c, rtol=tol, atol=tol)


def test_large_d_reverse_gram_uses_batched_gemm_on_cuda():
    model = random_mlp(40, [16], 2, nn.Tanh)
    x = torch.randn(3, 40, dtype=f64)
    cpu = hessmlp.hessian(model, x, method="reverse")
    gpu = hessmlp.hessian(model.cuda(), x.cuda(), method="reverse")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)


def test_backward_on_cuda_matches_cpu():
    model = random_mlp(3, [32, 32], 1, nn.Tanh)
    x = torch.rand(100, 3, dtype=f64)
    grads = []
    for dev in ("cpu", "cuda"):
        m = random_mlp(3, [32, 32], 1, nn.Tanh, device=dev)
        m.load_state_dict(model.state_dict())
        xx = x.to(dev).requires_grad_()
        (hessmlp.laplacian(m, xx) ** 2).sum().backward()
        grads.append([xx.grad.cpu()] + [p.grad.cpu() for p in m.parameters()])
    for c, g in zip(*grads):
        torch.testing.assert_close(g, c, rtol=1e-11, atol=1e-12)


def test_side_stream_and_empty_batch():
    model = random_mlp(3, [16], 2, nn.Tanh, device="cuda")
    x = torch.randn(64, 3, dtype=f64, device="cuda")
    ref = hessmlp.hessian(model, x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = hessmlp.hessian(model, x)
    s.synchronize()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert hessmlp.hessian(model, x[:0]).shape == (0, 2, 3, 3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    model = random_mlp(3, [16], 1, nn.Tanh)
    x = torch.randn(8, 3, dtype=f64)
    got = hessmlp.hessian(model.to("cuda:1"), x.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), hessmlp.hessian(model.cpu(), x))


def test_tf32_is_off_by_default_so_float32_stays_exact():
    assert not torch.backends.cuda.matmul.allow_tf32
    model = random_mlp(3, [128, 128], 1, nn.Tanh, dtype=torch.float32, device="cuda")
    x = torch.randn(512, 3, device="cuda")
    ref = hessmlp.hessian(model.double(), x.double())
    got = hessmlp.hessian(model.float(), x)
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


def test_mixed_devices_are_refused():
    model = random_mlp(3, [8], 1, nn.Tanh, device="cuda")
    with pytest.raises(ValueError, match="is on cuda"):
        hessmlp.hessian(model, torch.randn(2, 3, dtype=f64))
