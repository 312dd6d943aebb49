"""Memory: 'auto' picks a method that fits, backward in chunks, MemoryErrors that name ways out
that work, and a budget that is per thread and restored exactly."""
import threading

import pytest
import torch
from torch import nn

import hessmlp
from hessmlp import _cost, _memory

from helpers import assert_rel_close, random_mlp

f64 = torch.float64


@pytest.fixture
def free_4gib(monkeypatch):
    # The same on every machine: 4 GiB free, and every call asks.
    monkeypatch.setattr(_cost, "available_bytes", lambda device: 4 << 30)
    monkeypatch.setattr(_memory, "SMALL_CALL_BYTES", 0)


def _forum(d=784, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def test_auto_picks_a_method_that_fits_when_gradients_may_flow(free_4gib):
    # The forum's case: an ordinary model (parameters require grad, grad mode on), one output of
    # a 784-input classifier. Forward jets would need ~300k columns per sample; reverse-Gram fits.
    model = _forum()
    x = torch.randn(8, 784)
    need = _cost.working_bytes(8, 784, [64, 64, 1], "full", "forward", 4, True)
    assert need > 4 << 30  # forward jets do not fit here
    H = hessmlp.hessian(model, x, output=2)
    assert H.shape == (8, 784, 784) and H.requires_grad
    ref = torch.func.vmap(torch.func.hessian(lambda v: model(v)[2]))(x)
    assert (H - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_memory_budget_advice_works_for_the_forum_case():
    model = _forum()
    x = torch.randn(8, 784)
    with hessmlp.memory_budget(1 << 30):
        H = hessmlp.hessian(model, x, output=2)
    assert H.shape == (8, 784, 784)


def test_backward_in_chunks_under_a_budget():
    model = random_mlp(3, [16, 16], 2, nn.Tanh)
    x = torch.randn(300, 3, dtype=f64, requires_grad=True)
    params = [x] + list(model.parameters())
    for method in ("forward", "reverse"):
        ref = torch.autograd.grad(hessmlp.hessian(model, x, method=method).square().sum(), params)
        lap = hessmlp.hessian(model, x, method=method)
        state = "forward" if method == "forward" else "reverse"
        need = _cost.working_bytes(300, 3, [16, 16, 2], "full", "forward", 8, True)
        with hessmlp.memory_budget(need // 5):
            assert 1 < _memory.backward_rows(300, 3, [16, 16, 2], "full", x, state == "reverse") < 300
            got = torch.autograd.grad(lap.square().sum(), params)
        for a, b in zip(got, ref):
            assert_rel_close(a, b, f64, f"{method} chunked backward")


def test_backward_that_cannot_fit_says_so_and_names_ways_out():
    model = random_mlp(3, [16], 2, nn.Tanh)
    x = torch.randn(50, 3, dtype=f64, requires_grad=True)
    H = hessmlp.hessian(model, x, method="reverse")
    with hessmlp.memory_budget(1000):
        with pytest.raises(MemoryError, match=r"backward of this call needs .* per sample") as info:
            H.sum().backward()
    msg = str(info.value)
    assert "output=k" in msg and "torch.no_grad()" in msg and "hessian_diag or laplacian" in msg


def test_memory_errors_name_ways_out_that_work(free_4gib):
    model = _forum()
    x = torch.randn(64, 784)
    # Neither method fits a batch of 64 full Hessians of 10 outputs in 4 GiB with gradients.
    with pytest.raises(MemoryError) as info:
        hessmlp.hessian(model, x)
    msg = str(info.value)
    assert "output=k (the model has 10)" in msg and "torch.no_grad()" in msg
    assert "memory_budget" in msg
    # Each of them works.
    assert hessmlp.hessian(model, x[:4], output=3).shape == (4, 784, 784)
    with torch.no_grad():
        hessmlp.hessian(model, x[:16])
    with hessmlp.memory_budget(1 << 30):
        hessmlp.hessian(model, x[:16])
    # The budget itself too small for one sample: raise it, or the other ways.
    with hessmlp.memory_budget(1000), pytest.raises(MemoryError, match="one sample needs") as info:
        hessmlp.hessian(model, x)
    assert "raise the budget" in str(info.value)


def test_budget_is_per_thread():
    model = random_mlp(3, [32], 1, nn.Tanh)
    x = torch.randn(64, 3, dtype=f64)
    inside, done, errors = threading.Event(), threading.Event(), []

    def other():
        try:
            inside.wait(5)
            hessmlp.hessian(model, x)  # not under the other thread's tiny budget
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=other)
    t.start()
    with hessmlp.memory_budget(100):
        inside.set()
        done.wait(10)
        with pytest.raises(MemoryError, match="one sample needs"):
            hessmlp.hessian(model, x)
    t.join()
    assert not errors, errors
    # The process-wide default reaches other threads.
    previous = hessmlp.set_memory_budget(100)
    try:
        seen = []
        t = threading.Thread(target=lambda: seen.append(_memory.budget()))
        t.start()
        t.join()
        assert seen == [100]
    finally:
        hessmlp.set_memory_budget(previous)
    assert _memory.budget() is None


def test_budget_blocks_left_out_of_order_restore_exactly():
    # Two generators each inside a memory_budget block, finished in the order they started
    # (not nested): each block removes only its own budget.
    def gen(n):
        with hessmlp.memory_budget(n):
            yield _memory.budget()
            yield _memory.budget()

    a, b = gen(1000), gen(2000)
    assert next(a) == 1000
    assert next(b) == 2000
    assert next(a) == 2000  # the innermost block in force is b's
    with pytest.raises(StopIteration):
        next(a)  # a's block ends first
    assert _memory.budget() == 2000
    assert next(b) == 2000
    with pytest.raises(StopIteration):
        next(b)
    assert _memory.budget() is None
