"""Defects found by adversarial trials, each fixed at its root: a module used twice in a
Sequential, concurrent first calls (torch.fx patches nn.Module for the whole process), tensor
literals in forward, instance forwards, class and config attributes, global hooks, NaN
constants, memory accounting of chunked calls, and refusal messages."""
import threading

import pytest
import torch
from torch import nn

import hessmlp
from hessmlp import UnsupportedModelError, _cost, _memory

from helpers import assert_rel_close, func_reference

f64 = torch.float64


def _check(model, x, what=""):
    j = hessmlp.jet(model, x)
    value, jac, hess = func_reference(model, x)
    assert_rel_close(j.value, value, f64, f"{what} value")
    assert_rel_close(j.jacobian, jac, f64, f"{what} jacobian")
    assert_rel_close(j.hessian, hess, f64, f"{what} hessian")


# ---------------------------------------------------------------- the same module twice

def test_module_used_twice_in_a_sequential():
    torch.manual_seed(0)
    act = nn.Tanh()
    shared_act = nn.Sequential(nn.Linear(3, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 2)).double()
    tied = nn.Linear(8, 8)
    tied_linear = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), tied, nn.Tanh(), tied, nn.Tanh(),
                                nn.Linear(8, 1)).double()
    block = nn.Sequential(nn.Linear(6, 6), nn.SiLU())
    repeated = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), block, block, nn.Linear(6, 1)).double()
    x = torch.randn(5, 3, dtype=f64)
    for name, model in (("shared act", shared_act), ("tied Linear", tied_linear),
                        ("repeated block", repeated)):
        _check(model, x, name)
    # The gradient of the tied weight sums both uses.
    x.requires_grad_(True)
    loss = hessmlp.laplacian(tied_linear, x).square().sum()
    (g,) = torch.autograd.grad(loss, [tied.weight])
    params = dict(tied_linear.named_parameters())

    def lap(p):
        f = lambda xi: torch.func.functional_call(tied_linear, p, (xi,))  # noqa: E731
        H = torch.func.vmap(torch.func.hessian(f))(x)
        return H.diagonal(dim1=-2, dim2=-1).sum(-1).square().sum()

    (ref,) = torch.autograd.grad(lap(params), [params["2.weight"]])
    assert_rel_close(g, ref, f64, "tied weight gradient")


# ---------------------------------------------------------------- threads

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_concurrent_first_calls_and_plain_forwards_in_other_threads():
    # torch.fx patches nn.Module.__call__ for the whole process while it traces: hessmlp traces
    # one model at a time, and other threads' module calls pass through to PyTorch's own.
    x = torch.randn(8, 3)
    plain = _Net()
    errors, stop = [], threading.Event()
    call_before = nn.Module.__call__

    def first_calls(barrier):
        barrier.wait()
        try:
            for _ in range(5):
                hessmlp.laplacian(_Net(), x)
        except Exception as e:  # noqa: BLE001
            errors.append(f"hessmlp: {e}")

    def forwards():
        while not stop.is_set():
            try:
                plain(x)
            except Exception as e:  # noqa: BLE001
                errors.append(f"plain forward: {e}")
                return

    side = threading.Thread(target=forwards)
    side.start()
    for _ in range(10):
        barrier = threading.Barrier(2)
        ts = [threading.Thread(target=first_calls, args=(barrier,)) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    stop.set()
    side.join()
    assert not errors, errors[:3]
    assert nn.Module.__call__ is call_before
    plain(x)


# ---------------------------------------------------------------- what forward may hold

class _Literal(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.l1(x)) * torch.tensor(2.0)
        return self.l2(h * torch.tensor(0.5, dtype=x.dtype)) + torch.as_tensor(1.0)


def test_tensor_literals_in_forward_are_constants_and_do_not_grow_the_model():
    torch.manual_seed(0)
    model = _Literal().double()
    x = torch.randn(4, 3, dtype=f64)
    keys = set(model.__dict__)
    for _ in range(5):
        _check(model, x, "literals")
    assert set(model.__dict__) - keys <= {"_hessmlp_structure"}


class _Defaults(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x, scale=2.0, mods=None):
        h = torch.tanh(self.l1(x) * scale)
        if mods is not None:
            h = h * mods
        return self.l2(h)


def test_forward_arguments_with_defaults_are_read_at_their_default():
    torch.manual_seed(0)
    model = _Defaults().double()
    _check(model, torch.randn(4, 3, dtype=f64), "defaults")


class _Siren(nn.Module):
    w0 = 30.0

    def __init__(self, cfg=None):
        super().__init__()
        self.l1, self.l2 = nn.Linear(2, 8), nn.Linear(8, 1)
        self.cfg = cfg

    def forward(self, x):
        w0 = self.cfg.w0 if self.cfg is not None else self.w0
        return self.l2(torch.sin(w0 * self.l1(x)))


class _Config:
    def __init__(self, w0):
        self.w0 = w0


def test_class_and_config_attributes_are_followed():
    torch.manual_seed(0)
    x = torch.randn(4, 2, dtype=f64)
    model = _Siren().double()
    try:
        _check(model, x, "w0=30")
        _Siren.w0 = 3.0  # a class attribute
        _check(model, x, "class w0=3")
    finally:
        _Siren.w0 = 30.0
    model = _Siren(_Config(2.0)).double()
    _check(model, x, "cfg w0=2")
    model.cfg.w0 = 0.5  # an attribute of an object the module holds
    _check(model, x, "cfg w0=0.5")


def test_instance_forward_is_refused():
    model = _Net()
    model.forward = lambda x: model.l2(torch.sigmoid(model.l1(x)))
    with pytest.raises(UnsupportedModelError, match=r"a forward set on the instance"):
        hessmlp.laplacian(model, torch.randn(2, 3))
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    seq[1].forward = torch.sigmoid
    with pytest.raises(UnsupportedModelError, match=r"a forward set on the instance .* model\[1\]"):
        hessmlp.laplacian(seq, torch.randn(2, 3))


def test_global_module_hooks_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(2, 3)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 2)
    try:
        with pytest.raises(UnsupportedModelError, match="global module forward hook"):
            hessmlp.laplacian(model, x)
    finally:
        handle.remove()
    hessmlp.laplacian(model, x)


class _ScaledBy(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 8), nn.Linear(8, 1)
        self.register_buffer("c", torch.tensor(2.0))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)) * self.c)


def test_nan_constant_eager_and_compiled():
    torch._dynamo.reset()
    model = _ScaledBy()
    x = torch.randn(3, 3)
    with torch.no_grad():
        model.c.fill_(float("nan"))
    lap = torch.compile(lambda x: hessmlp.laplacian(model, x), fullgraph=True)
    assert torch.isnan(hessmlp.laplacian(model, x)).all()
    assert torch.isnan(lap(x)).all() and torch.isnan(lap(x)).all()  # no "changed" error


def test_power_one_before_the_first_linear():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.o = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.o(torch.tanh(self.l(x ** 1)))

    torch.manual_seed(0)
    _check(M().double(), torch.randn(3, 3, dtype=f64), "x ** 1")


# ---------------------------------------------------------------- memory accounting

def test_chunked_call_counts_all_its_results(monkeypatch):
    # Under a budget every chunk fits, but the whole batch's results must fit too.
    monkeypatch.setattr(_cost, "available_bytes", lambda device: 300 << 20)
    model = hessmlp.MLP(40, [64], 4).double()
    x = torch.randn(22000, 40, dtype=f64)
    with hessmlp.memory_budget(64 << 20), torch.no_grad():
        with pytest.raises(MemoryError, match=r"results of all 22000 included.*smaller batch") as info:
            hessmlp.hessian(model, x)
    assert "set_memory_budget" not in str(info.value)  # would not help: the results alone are too big


def test_budget_messages_give_sizes_and_no_advice_that_cannot_work():
    model = hessmlp.MLP(3, [16, 16], 2, activation="silu")
    x = torch.randn(100, 3)
    with hessmlp.memory_budget(100), torch.no_grad():
        with pytest.raises(MemoryError, match=r"one sample needs about \d+\.\d+ KiB .* budget is "
                                              r"100 bytes; raise the budget") as info:
            hessmlp.hessian(model, x, method="forward")
    assert "smaller batch" not in str(info.value)
    xr = x.clone().requires_grad_()
    H = hessmlp.hessian(model, xr, method="reverse")
    with hessmlp.memory_budget(2048):
        with pytest.raises(MemoryError, match=r"backward .* \d+\.\d+ KiB per sample .* 2\.00 KiB") \
                as info:
            H.sum().backward()
    assert "smaller batch" not in str(info.value)


# ---------------------------------------------------------------- messages

def test_messages_name_the_argument_and_the_cause():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="hessian must be 'full', 'diag', 'trace' or None"):
        hessmlp.jet(model, x, hessian=["full"])
    with pytest.raises(ValueError, match="method must be 'auto'"):
        hessmlp.hessian(model, x, method=["forward"])
    with pytest.raises(UnsupportedModelError, match=r"the activation ReLU6 at model\[1\] .* not one "
                                                    r"of the elementwise functions"):
        hessmlp.hessian(nn.Sequential(nn.Linear(3, 4), nn.ReLU6(), nn.Linear(4, 1)), x)
    with pytest.raises(UnsupportedModelError, match="uninitialised LazyLinear .* Run one forward"):
        hessmlp.hessian(nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 1)), x)
    pre = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    pre[1].register_forward_pre_hook(lambda m, i: i)
    with pytest.raises(UnsupportedModelError, match="a forward pre-hook .* register_forward_pre_hook"):
        hessmlp.hessian(pre, x)
    with pytest.raises(ValueError, match=r"model\[2\] has out_features=0"):
        hessmlp.hessian(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 0)), x)
    with pytest.raises(UnsupportedModelError, match="Module has no forward method"):
        hessmlp.hessian(nn.Module(), x)

    class DataDep(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            h = self.l(x)
            if h.sum() > 0:
                h = torch.tanh(h)
            return h

    with pytest.raises(UnsupportedModelError, match=r"test_trials.py:\d+: if h.sum\(\) > 0: .* "
                                                    r"branches on the values"):
        hessmlp.hessian(DataDep(), x)


# ---------------------------------------------------------------- found in review

def test_compiled_functions_follow_class_and_config_attributes():
    x = torch.randn(4, 2, dtype=f64)

    def lap_ref(m):
        return func_reference(m, x)[2].diagonal(dim1=-2, dim2=-1).sum(-1)

    for cfg in (None, _Config(2.0)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _Siren(cfg).double()
        lap = torch.compile(lambda x: hessmlp.laplacian(model, x), fullgraph=True)
        try:
            assert_rel_close(lap(x), lap_ref(model), f64, "before")
            if cfg is None:
                _Siren.w0 = 5.0
            else:
                model.cfg.w0 = 5.0
            assert_rel_close(lap(x), lap_ref(model), f64, "after the change, compiled")
        finally:
            _Siren.w0 = 30.0


def test_compile_a_fresh_mlp_first():
    # Compiled before any eager call on a user class (hessmlp.MLP is one): no dynamo error.
    torch._dynamo.reset()
    model = hessmlp.MLP(2, [8], 1).double()
    x = torch.randn(3, 2, dtype=f64)
    got = torch.compile(lambda x: hessmlp.laplacian(model, x), fullgraph=True)(x)
    assert_rel_close(got, hessmlp.laplacian(model, x), f64)


def test_fake_kernel_for_no_inputs_with_reverse_and_saved_state():
    from torch._subclasses.fake_tensor import FakeTensorMode
    w = [torch.randn(4, 0), torch.randn(1, 4)]
    args = (torch.zeros(3, 0), w, [torch.randn(4), torch.randn(1)], [1, 0], [2], [0.0, 0.0],
            "full", "reverse", True)
    real = torch.ops.hessmlp.mlp_jet(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.hessmlp.mlp_jet(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                                           [mode.from_tensor(t) for t in a] if isinstance(a, list)
                                           and a and isinstance(a[0], torch.Tensor) else a
                                           for a in args])
    assert [tuple(s.shape) for s in real[3]] == [tuple(s.shape) for s in fake[3]] != []


def test_budget_applies_to_a_single_sample():
    model = hessmlp.MLP(3, [64, 64], 2)
    one = _cost.working_bytes(1, 3, [64, 64, 2], "full", "forward", 4, False)
    for x in (torch.randn(1, 3), torch.randn(3)):
        with hessmlp.memory_budget(one // 2), torch.no_grad():
            with pytest.raises(MemoryError, match="one sample needs"):
                hessmlp.hessian(model, x, method="forward")


def test_tensor_literals_of_other_kinds():
    class M(nn.Module):
        def __init__(self, lit):
            super().__init__()
            self.l, self.o, self.lit = nn.Linear(3, 4), nn.Linear(4, 1), lit

        def forward(self, x):
            return self.o(torch.tanh(self.l(x)) * self.lit())

    x = torch.randn(2, 3, dtype=f64)
    torch.manual_seed(0)
    small_int = M(lambda: torch.tensor(3, dtype=torch.int16)).double()
    _check(small_int, x, "int16 literal")
    _check(small_int, x, "int16 literal, second call")
    with pytest.raises(UnsupportedModelError, match=r"a tensor literal of shape \(4,\)"):
        hessmlp.hessian(M(lambda: torch.tensor([1, 2, 3, 4])).double(), x)
