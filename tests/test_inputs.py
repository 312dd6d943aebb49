"""Bad input gets a clear exception naming the argument; edge cases give the right shapes."""
import pytest
import torch
from torch import nn

import hessmlp
from hessmlp import _cost, _memory

from helpers import assert_rel_close, func_reference, random_mlp

f64 = torch.float64


@pytest.fixture
def model():
    return random_mlp(3, [8], 2, nn.Tanh)


def test_x_must_be_tensor(model):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        hessmlp.hessian(model, [[0.0, 1.0, 2.0]])


@pytest.mark.parametrize("shape", [(), (2, 3, 3), (1, 1, 2, 3)])
def test_x_dims(model, shape):
    with pytest.raises(ValueError, match=r"x must have shape \(d,\) or \(B, d\)"):
        hessmlp.hessian(model, torch.zeros(shape, dtype=f64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16, torch.bool, torch.complex128])
def test_x_dtype(model, dtype):
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        hessmlp.laplacian(model, torch.zeros(2, 3, dtype=dtype))


def test_wrong_feature_count(model):
    with pytest.raises(ValueError, match=r"x has 5 features but model\[0\].*in_features=3"):
        hessmlp.hessian(model, torch.zeros(2, 5, dtype=f64))


def test_mismatched_dtype(model):
    with pytest.raises(TypeError, match=r"x is torch.float32 but the weight of model\[0\] is torch.float64"):
        hessmlp.hessian(model, torch.zeros(2, 3))


def test_mixed_devices(model):
    with pytest.raises(ValueError, match=r"x is on meta but the weight of model\[0\] is on cpu"):
        hessmlp.hessian(model, torch.zeros(2, 3, dtype=f64, device="meta"))


def test_inconsistent_layers():
    bad = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(5, 1)).double()
    with pytest.raises(ValueError, match=r"model\[2\] expects in_features=5 but model\[0\] produces 4"):
        hessmlp.hessian(bad, torch.zeros(2, 3, dtype=f64))


@pytest.mark.parametrize("output, exc, match", [
    (2, ValueError, "output=2 is out of range for a model with 2 outputs"),
    (-3, ValueError, "out of range"),
    (1.0, TypeError, "output must be an int"),
    (True, TypeError, "output must be an int"),
    (torch.tensor(1.0), TypeError, "output must be an int"),
    ("1", TypeError, "output must be an int"),
])
def test_bad_output(model, output, exc, match):
    with pytest.raises(exc, match=match):
        hessmlp.hessian(model, torch.zeros(2, 3, dtype=f64), output=output)


def test_bad_mode_and_method(model):
    x = torch.zeros(2, 3, dtype=f64)
    with pytest.raises(ValueError, match="hessian must be 'full', 'diag', 'trace' or None"):
        hessmlp.jet(model, x, hessian="upper")
    with pytest.raises(ValueError, match="method must be 'auto', 'forward' or 'reverse'"):
        hessmlp.hessian(model, x, method="fast")


def test_op_checks_name_arguments():
    x = torch.zeros(2, 3, dtype=f64)
    w = [torch.zeros(4, 3, dtype=f64), torch.zeros(1, 5, dtype=f64)]
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[n, 4\]"):
        torch.ops.hessmlp.mlp_jet(x, w, [None, None], [1, 0], [2], [0.0, 0.0], "full", "forward")
    w[1] = torch.zeros(1, 4)
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype Float but x has dtype Double"):
        torch.ops.hessmlp.mlp_jet(x, w, [None, None], [1, 0], [2], [0.0, 0.0], "full", "forward")
    w[1] = torch.zeros(1, 4, dtype=f64)
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape \[4\]"):
        torch.ops.hessmlp.mlp_jet(x, w, [torch.zeros(3, dtype=f64), None], [1, 0], [2], [0.0, 0.0], "full",
                                  "forward")
    with pytest.raises(ValueError, match="act_codes must have 1 entries"):
        torch.ops.hessmlp.mlp_jet(x, w, [None, None], [1, 0], [], [], "full", "forward")
    with pytest.raises(ValueError, match="mode must be one of"):
        torch.ops.hessmlp.mlp_jet(x, w, [None, None], [1, 0], [2], [0.0, 0.0], "upper", "forward")
    with pytest.raises(ValueError, match="method must be 'forward' or 'reverse', got 'fast'"):
        torch.ops.hessmlp.mlp_jet(x, w, [None, None], [1, 0], [2], [0.0, 0.0], "none", "fast")


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_empty_batch(model, method):
    x = torch.zeros(0, 3, dtype=f64)
    r = hessmlp.jet(model, x, method=method)
    assert r.value.shape == (0, 2) and r.jacobian.shape == (0, 2, 3) and r.hessian.shape == (0, 2, 3, 3)
    assert hessmlp.laplacian(model, x).shape == (0, 2)
    assert hessmlp.hessian_diag(model, x, output=1).shape == (0, 3)


def test_non_contiguous_x(model):
    base = torch.randn(3, 10, dtype=f64)
    x = base[:, ::3]  # (3, 4) strided ...
    x = x[:, :3]      # (3, 3), not contiguous
    assert not x.is_contiguous()
    _, _, hess = func_reference(model, x.contiguous())
    for method in ("forward", "reverse"):
        assert_rel_close(hessmlp.hessian(model, x, method=method), hess, f64)
    xt = torch.randn(3, 5, dtype=f64).t()  # (5, 3) transposed
    assert_rel_close(hessmlp.laplacian(model, xt),
                     func_reference(model, xt.contiguous())[2].diagonal(dim1=-2, dim2=-1).sum(-1), f64)


def test_non_contiguous_weights():
    model = random_mlp(3, [6], 1, nn.Tanh)
    with torch.no_grad():
        w = model[0].weight.detach().clone()
    model[0].weight = nn.Parameter(w.t().contiguous().t())  # same values, column-major
    assert not model[0].weight.is_contiguous()
    x = torch.randn(4, 3, dtype=f64)
    assert_rel_close(hessmlp.hessian(model, x), func_reference(model, x)[2], f64)


def test_huge_request_is_refused_before_allocating(monkeypatch, model):
    monkeypatch.setattr(_cost, "available_bytes", lambda device: 10_000)
    monkeypatch.setattr(_memory, "SMALL_CALL_BYTES", 0)  # every call asks (see the next test)
    with pytest.raises(MemoryError, match=r"needs about .* MiB .* output=k .* smaller batch"):
        hessmlp.hessian(model, torch.zeros(1000, 3, dtype=f64))
    with pytest.raises(MemoryError, match="smaller batch"):
        hessmlp.hessian(model, torch.zeros(1000, 3, dtype=f64), output=0)


def test_small_calls_do_not_ask_for_free_memory(monkeypatch, model):
    # Reading /proc/meminfo costs more than a small call: only calls that need 32 MiB or
    # more ask for the free memory.
    def refuse(device):
        raise AssertionError("a small call asked for the free memory")

    monkeypatch.setattr(_cost, "available_bytes", refuse)
    for method in ("auto", "forward", "reverse"):
        hessmlp.hessian(model, torch.zeros(64, 3, dtype=f64), method=method)
    big = 2 * _memory.SMALL_CALL_BYTES // (8 * 3 * 3)  # samples whose Hessians alone need 64 MiB
    with pytest.raises(AssertionError, match="asked for the free memory"):
        hessmlp.hessian(model, torch.zeros(big, 3, dtype=f64))


def test_huge_forum_case_is_refused():
    # 784 inputs, 10 outputs, a batch of 4096: 4096 * 10 * 784 * 784 doubles = 188 GiB.
    model = nn.Sequential(nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))
    with pytest.raises(MemoryError, match="GiB"):
        hessmlp.hessian(model, torch.zeros(4096, 784))


def test_auto_method_picks_by_cost():
    # measured (benchmarks/suite.py, method crossover)
    assert _cost.choose_method(3, [128, 128, 128, 1], "full") == "reverse"  # the PINN shape
    assert _cost.choose_method(3, [128, 128, 128, 1], "diag") == "reverse"
    assert _cost.choose_method(3, [128, 128, 128, 1], "trace") == "forward"
    assert _cost.choose_method(16, [128, 128, 128, 1], "full") == "reverse"
    assert _cost.choose_method(2, [128, 128, 128, 4], "full") == "forward"
    assert _cost.choose_method(2, [128, 128, 128, 4], "diag") == "forward"
    # the Jacobian alone: backpropagation for few outputs, forward jets for more outputs than d
    assert _cost.choose_method(3, [128, 128, 128, 128, 1], "none") == "reverse"
    assert _cost.choose_method(784, [512, 512, 10], "none") == "reverse"
    assert _cost.choose_method(3, [128, 128, 128, 4], "none") == "forward"
    assert _cost.choose_method(2, [64, 4], "none") == "forward"
    # many inputs, one output: reverse-Gram is far cheaper
    assert _cost.choose_method(784, [512, 512, 1], "full") == "reverse"


def test_numpy_integer_output(model):
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3, dtype=f64)
    assert torch.equal(hessmlp.hessian(model, x, output=np.int64(1)), hessmlp.hessian(model, x, output=1))


@pytest.mark.skipif(torch._C._dispatch_has_kernel_for_dispatch_key("hessmlp::mlp_jet", "CUDA"),
                    reason="checks the CPU-only build's message")
def test_cuda_tensors_without_cuda_kernels_are_refused_clearly():
    # No GPU here: a stand-in with a CUDA device reaches the backend check.
    class FakeCudaTensor:
        device = torch.device("cuda", 0)

    from hessmlp import api
    with pytest.raises(NotImplementedError, match=r"no kernel for tensors on cuda:0 \(built for: CPU\)"):
        api._check_backend(FakeCudaTensor())


def test_compiled_model_wrapper_is_unwrapped():
    model = random_mlp(3, [8], 1, nn.Tanh)
    x = torch.randn(4, 3, dtype=f64)
    wrapped = torch.compile(model)
    assert torch.equal(hessmlp.hessian(wrapped, x), hessmlp.hessian(model, x))


@pytest.mark.parametrize("mode, method", [("full", "forward"), ("diag", "forward"), ("trace", "forward"),
                                          (None, "forward"), ("full", "reverse"), ("diag", "reverse"),
                                          ("trace", "reverse")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, divisor", [(2000, 4), (777, 7), (203, 60)])
def test_memory_budget_chunks_agree_to_rounding(mode, method, dtype, B, divisor):
    # Chunks of any size (also fewer rows than one CPU block) give the unchunked results up to
    # rounding, as the README promises; not to the bit: a GEMM library may round a row
    # differently in a batch of another size (seen on AMD EPYC with MKL).
    model = random_mlp(3, [32, 32], 2, nn.Tanh, dtype=dtype)
    x = torch.randn(B, 3, dtype=dtype, requires_grad=True)
    ref = hessmlp.jet(model, x, hessian=mode, method=method)
    need = _cost.working_bytes(B, 3, [32, 32, 2], mode or "none", method, x.element_size(), True)
    with hessmlp.memory_budget(need // divisor):
        rows = _memory.rows_per_call(B, 3, [32, 32, 2], mode or "none", method, x, True)
        assert 1 < rows < B  # chunked
        got = hessmlp.jet(model, x, hessian=mode, method=method)
    tol = CHUNK_RTOL[dtype]
    for a, b in zip(got, ref):
        if b is not None:
            assert_close_scaled(a, b, tol)
    # Gradients flow through the chunks too.
    params = list(model.parameters())
    ga = torch.autograd.grad(sum(t.sum() for t in got if t is not None), [x] + params)
    gb = torch.autograd.grad(sum(t.sum() for t in ref if t is not None), [x] + params)
    for a, b in zip(ga, gb):
        assert_close_scaled(a, b, tol)


# What the README promises of chunked results: equal up to rounding, a few units in the last
# place of the result's scale (each chunk's sums may be added in another order).
CHUNK_RTOL = {torch.float64: 64 * torch.finfo(torch.float64).eps,
              torch.float32: 64 * torch.finfo(torch.float32).eps}


def assert_close_scaled(a, b, rtol):
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, f"{err:.3e} > {rtol:.1e} * {scale:.3e}"


def test_memory_budget_arguments():
    with pytest.raises(TypeError, match="memory budget must be an int"):
        hessmlp.set_memory_budget(1.5)
    with pytest.raises(ValueError, match="must be positive"):
        hessmlp.set_memory_budget(0)
    model = random_mlp(3, [32], 1, nn.Tanh)
    with hessmlp.memory_budget(100):
        with pytest.raises(MemoryError, match="one sample needs"):
            hessmlp.hessian(model, torch.randn(4, 3, dtype=f64))
    assert hessmlp.set_memory_budget(None) is None
