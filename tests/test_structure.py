"""The structure hessmlp reads follows the model as it is now (eager and under torch.compile), the
legacy weight norm, hooks, refusal messages that name the user's module and line, and reshapes
that are the identity. Every accepted case is checked against torch.func in float64."""
import copy
import inspect
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessmlp
from hessmlp import UnsupportedModelError

from helpers import RTOL, assert_rel_close, func_jet, func_reference

f64 = torch.float64
FILE = os.path.basename(__file__)


def _x(d, B=5, seed=1, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=dtype)


def _check_hessian(model, x, what=""):
    """hessmlp's Hessian of ``model`` at ``x`` against torch.func (which runs forward)."""
    H = hessmlp.hessian(model, x)
    assert_rel_close(H, func_reference(model, x)[2], x.dtype, what)
    return H


def _func_hessian_rows(model, x):
    """torch.func's Hessian with each sample passed as a (1, d) batch: for models whose forward
    reshapes assume a batch dimension (Flatten, view(-1, n), x.shape[0])."""
    f = lambda xi: model(xi.unsqueeze(0)).squeeze(0)  # noqa: E731
    return torch.func.vmap(torch.func.hessian(f))(x).detach()


def _check_hessian_rows(model, x, what=""):
    H = hessmlp.hessian(model, x)
    assert_rel_close(H, _func_hessian_rows(model, x), x.dtype, what)
    return H


def _ref_laplacian(model, x):
    return func_reference(model, x)[2].diagonal(dim1=-2, dim2=-1).sum(-1)


def _line(obj, fragment):
    """The line number of the first line of obj's source that contains fragment."""
    lines, start = inspect.getsourcelines(obj)
    for i, text in enumerate(lines):
        if fragment in text:
            return start + i
    raise AssertionError(f"{fragment!r} not in the source of {obj}")


# ------------------------------------------------------------------ 1. eager structure changes

class Net(nn.Module):
    def __init__(self, act=None, d=3, w=8, m=2):
        super().__init__()
        self.l1 = nn.Linear(d, w)
        self.act = nn.Tanh() if act is None else act
        self.l2 = nn.Linear(w, m)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def _net(act=None, seed=0):
    torch.manual_seed(seed)
    return Net(act).double()


def test_replaced_activation_module_is_read_again():
    m = _net()
    x = _x(3)
    h_tanh = _check_hessian(m, x, "tanh")
    m.act = nn.Sigmoid()
    h_sig = _check_hessian(m, x, "sigmoid after replacing act")
    assert not torch.allclose(h_tanh, h_sig)
    m.act = nn.GELU(approximate="tanh")
    _check_hessian(m, x, "gelu_tanh after replacing act")


def test_softplus_beta_changed_in_place_is_read_again():
    m = _net(nn.Softplus())
    x = _x(3)
    h1 = _check_hessian(m, x, "softplus beta=1")
    m.act.beta = 3.0
    h3 = _check_hessian(m, x, "softplus beta=3")
    assert not torch.allclose(h1, h3)
    m.act.threshold = 0.5
    _check_hessian(m, x, "softplus beta=3 threshold=0.5")


class ListNet(nn.Module):
    """The PINN class: a ModuleList of Linear layers, tanh between them."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


class PairListNet(nn.Module):
    """Linear layers and their activations in two ModuleLists, zipped in forward."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.acts = nn.ModuleList(nn.Tanh() for _ in sizes[1:-1])

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.layers[-1](x)


def test_module_list_append_is_read_again():
    torch.manual_seed(0)
    m = ListNet([3, 6, 6, 2]).double()
    x = _x(3)
    h_before = _check_hessian(m, x, "3 layers")
    m.layers.append(nn.Linear(2, 4).double())  # the former last layer now gets a tanh too
    h_after = _check_hessian(m, x, "4 layers")
    assert h_after.shape == (5, 4, 3, 3) and h_before.shape == (5, 2, 3, 3)

    p = PairListNet([3, 6, 6, 2]).double()
    _check_hessian(p, x, "pair list")
    p.layers.append(nn.Linear(2, 3).double())
    p.acts.append(nn.Sigmoid())
    assert _check_hessian(p, x, "pair list after append").shape == (5, 3, 3, 3)


def test_deepcopy_then_modify_the_copy():
    m = _net()
    x = _x(3)
    h_orig = _check_hessian(m, x, "original")
    c = copy.deepcopy(m)
    _check_hessian(c, x, "copy before change")
    c.act = nn.SiLU()
    h_copy = _check_hessian(c, x, "copy after its act was replaced")
    assert not torch.allclose(h_orig, h_copy)
    assert_rel_close(_check_hessian(m, x, "original after the copy changed"), h_orig, f64)
    # And the other way round: the original changes, the copy keeps its own structure.
    with torch.no_grad():
        c.l1.weight.mul_(1.5)
    m.act = nn.Softplus(beta=2.0)
    _check_hessian(m, x, "original after its act was replaced")
    _check_hessian(c, x, "copy after the original changed")


class SineNet(nn.Module):
    def __init__(self, w0=30.0):
        super().__init__()
        self.l1 = nn.Linear(2, 8)
        self.l2 = nn.Linear(8, 1)
        self.w0 = w0

    def forward(self, x):
        h = self.l1(x)
        return self.l2(torch.sin(self.w0 * h))


def test_float_attribute_changed_after_first_call():
    torch.manual_seed(0)
    m = SineNet().double()
    with torch.no_grad():
        m.l1.weight.mul_(0.05)
    x = _x(2)
    h30 = _check_hessian(m, x, "w0=30")
    m.w0 = 3.0
    h3 = _check_hessian(m, x, "w0=3")
    assert not torch.allclose(h30, h3)


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 8)
        self.l3 = nn.Linear(8, 2)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = torch.tanh(self.l1(x) * self.scale)
        h = torch.sin(self.scale * self.l2(h))
        return self.l3(h)


def test_scalar_buffer_filled_in_place_is_read_again():
    torch.manual_seed(0)
    m = ScaledNet().double()
    x = _x(3)
    h2 = _check_hessian(m, x, "scale=2")
    m.scale.fill_(3.0)
    h3 = _check_hessian(m, x, "scale=3 after fill_")
    assert not torch.allclose(h2, h3)
    m.scale = torch.tensor(0.5, dtype=f64)  # a new buffer tensor
    _check_hessian(m, x, "scale=0.5 after reassigning")


def test_scalar_buffer_changed_through_data_is_read_again():
    # `.data` writes keep the tensor's version counter: constants are compared by value.
    torch.manual_seed(0)
    m = ScaledNet().double()
    x = _x(3)
    _check_hessian(m, x, "scale=2")
    m.scale.data.fill_(3.0)
    _check_hessian(m, x, "scale=3 after .data.fill_")
    m.scale.data = torch.tensor(4.0, dtype=f64)
    _check_hessian(m, x, "scale=4 after .data =")


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.drop = nn.Dropout(0.3)
        self.l2 = nn.Linear(8, 8)
        self.l3 = nn.Linear(8, 1)

    def forward(self, x):
        h = self.drop(torch.tanh(self.l1(x)))
        h = F.dropout(torch.sigmoid(self.l2(h)), 0.2, self.training)
        return self.l3(h)


def test_train_eval_with_dropout():
    torch.manual_seed(0)
    m = DropNet().double().eval()
    x = _x(3)
    h_eval = _check_hessian(m, x, "eval")
    m.train()
    with pytest.raises(UnsupportedModelError, match="training mode"):
        hessmlp.hessian(m, x)
    m.drop.eval()  # the module in eval mode; F.dropout still sees the model's training flag
    with pytest.raises(UnsupportedModelError, match="dropout in training mode"):
        hessmlp.hessian(m, x)
    m.eval()
    assert_rel_close(_check_hessian(m, x, "eval again"), h_eval, f64)


# ------------------------------------------------------------------ 2. torch.compile

def test_compiled_laplacian_follows_structure_changes():
    torch._dynamo.reset()
    m = _net(nn.Softplus())
    x = _x(3)
    lap = torch.compile(lambda x: hessmlp.laplacian(m, x), fullgraph=True)
    assert_rel_close(lap(x), _ref_laplacian(m, x), f64, "softplus beta=1")
    m.act.beta = 3.0
    assert_rel_close(lap(x), _ref_laplacian(m, x), f64, "softplus beta=3, compiled")
    m.act = nn.Tanh()
    assert_rel_close(lap(x), _ref_laplacian(m, x), f64, "tanh, compiled")


class SineScaledNet(nn.Module):
    """A float attribute and a scalar buffer, both read as constants of the chain."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(2, 8)
        self.l2 = nn.Linear(8, 1)
        self.w0 = 3.0
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = torch.sin(self.w0 * self.l1(x))
        return self.l2(torch.tanh(h * self.scale))


def test_compiled_laplacian_follows_attribute_and_buffer_changes():
    # A float attribute is guarded by dynamo (recompiled); a scalar buffer read as a constant
    # cannot be guarded, so compiled code checks it and stops with a clear error when it changed
    # (never an old value); after torch.compiler.reset() it is read again.
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = SineScaledNet().double()
    x = _x(2)
    lap = torch.compile(lambda x: hessmlp.laplacian(m, x), fullgraph=True)
    assert_rel_close(lap(x), _ref_laplacian(m, x), f64, "w0=3, scale=2")
    m.w0 = 1.5
    assert_rel_close(lap(x), _ref_laplacian(m, x), f64, "w0=1.5, compiled")
    m.scale.fill_(3.0)
    with pytest.raises(RuntimeError, match=r"'scale' read as a constant .* changed since this code "
                                           r"was compiled; call torch.compiler.reset\(\)"):
        lap(x)
    torch.compiler.reset()
    assert_rel_close(lap(x), _ref_laplacian(m, x), f64, "scale=3 after fill_ and a reset")
    m.scale = torch.tensor(0.5, dtype=f64)
    with pytest.raises(RuntimeError, match="changed since this code was compiled"):
        lap(x)


# ------------------------------------------------------------------ 3. weight norm

wn_legacy = torch.nn.utils.weight_norm
wn_param = torch.nn.utils.parametrizations.weight_norm


class WNNet(nn.Module):
    def __init__(self, dim=0):
        super().__init__()
        self.l1 = wn_legacy(nn.Linear(3, 8), dim=dim)
        self.l2 = nn.Linear(8, 8)
        self.l3 = wn_legacy(nn.Linear(8, 2))

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _legacy_seq(dim=0):
    return nn.Sequential(wn_legacy(nn.Linear(3, 8), dim=dim), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(),
                         wn_legacy(nn.Linear(8, 2)))


def _legacy_modules(model):
    return [mod for mod in model.modules() if hasattr(mod, "weight_g")]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("make", [_legacy_seq, WNNet, lambda: _legacy_seq(dim=1), lambda: WNNet(dim=None)],
                         ids=["sequential", "user_class", "sequential_dim1", "user_class_dimNone"])
def test_legacy_weight_norm_after_optimizer_step_without_forward(make):
    torch.manual_seed(0)
    model = make().double()
    x = _x(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = (model(x) ** 2).sum() + model(x).sum()
    loss.backward()
    opt.step()
    # The step changed g and v; .weight is stale until the next forward.
    for mod in _legacy_modules(model):
        hook = next(h for h in mod._forward_pre_hooks.values() if hasattr(h, "compute_weight"))
        assert not torch.allclose(mod.weight, hook.compute_weight(mod)), "the step did not change g, v"
    H = hessmlp.hessian(model, x)  # before any forward
    assert_rel_close(H, func_reference(model, x)[2], f64, "after step")  # forward recomputes .weight


def _grad_rel_close(actual, expected, what, rtol=1e-9):
    assert actual is not None, f"{what}: no gradient"
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def _check_laplacian_grads(model, x, names):
    params = dict(model.named_parameters())
    assert set(names) <= set(params), sorted(params)
    chosen = [params[n] for n in names]
    lap = hessmlp.laplacian(model, x)
    got = torch.autograd.grad(lap.sum(), chosen)
    ref_lap = func_jet(model, params, x, "trace")[2]
    assert_rel_close(lap.detach(), ref_lap.detach(), f64, "laplacian")
    ref = torch.autograd.grad(ref_lap.sum(), chosen)
    for n, g, r in zip(names, got, ref):
        _grad_rel_close(g, r, n)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_legacy_weight_norm_laplacian_gradients():
    torch.manual_seed(0)
    x = _x(3)
    seq = _legacy_seq().double()
    _check_laplacian_grads(seq, x, ["0.weight_g", "0.weight_v", "4.weight_g", "4.weight_v", "2.weight"])
    user = WNNet(dim=1).double()
    _check_laplacian_grads(user, x, ["l1.weight_g", "l1.weight_v", "l3.weight_g", "l3.weight_v", "l2.bias"])


class ParamWNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = wn_param(nn.Linear(3, 8))
        self.l2 = wn_param(nn.Linear(8, 2), dim=1)

    def forward(self, x):
        return self.l2(F.silu(self.l1(x)))


def test_parametrizations_weight_norm():
    torch.manual_seed(0)
    x = _x(3)
    seq = nn.Sequential(wn_param(nn.Linear(3, 8)), nn.Tanh(), wn_param(nn.Linear(8, 2))).double()
    _check_hessian(seq, x, "parametrized sequential")
    _check_laplacian_grads(seq, x, ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
                                    "2.parametrizations.weight.original0", "2.parametrizations.weight.original1"])
    user = ParamWNNet().double()
    _check_hessian(user, x, "parametrized user class")
    _check_laplacian_grads(user, x, ["l1.parametrizations.weight.original0",
                                     "l1.parametrizations.weight.original1",
                                     "l2.parametrizations.weight.original0",
                                     "l2.parametrizations.weight.original1"])
    # After an optimizer step the parametrized weight is computed on every read.
    opt = torch.optim.SGD(user.parameters(), lr=0.5)
    (user(x) ** 2).sum().backward()
    opt.step()
    _check_hessian(user, x, "parametrized user class after a step")


# ------------------------------------------------------------------ 4. hooks

def _seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def test_forward_hook_refused_and_removal_restores():
    x = _x(3)

    def my_forward_hook(module, inp, out):
        return out * 2.0

    seq = _seq()
    _check_hessian(seq, x, "before the hook")  # cached, then the hook must still be seen
    handle = seq[2].register_forward_hook(my_forward_hook)
    with pytest.raises(UnsupportedModelError, match=r"forward hook \([^)]*my_forward_hook\).*model\[2\]"):
        hessmlp.hessian(seq, x)
    handle.remove()
    _check_hessian(seq, x, "after removing the hook")

    m = _net()
    handle = m.l1.register_forward_hook(my_forward_hook)
    with pytest.raises(UnsupportedModelError, match=r"my_forward_hook.*\.remove\(\) on the handle register_forward_hook") as info:
        hessmlp.hessian(m, x)
    assert "README" in str(info.value) and len(str(info.value)) < 600
    handle.remove()
    _check_hessian(m, x, "user class after removing the hook")

    handle = m.register_forward_hook(my_forward_hook)  # on the model itself
    with pytest.raises(UnsupportedModelError, match="my_forward_hook"):
        hessmlp.hessian(m, x)
    handle.remove()
    _check_hessian(m, x, "user class after removing the model's hook")


def test_forward_pre_hook_refused_and_removal_restores():
    x = _x(3)

    def my_pre_hook(module, args):
        return (args[0] * 0.5,)

    seq = _seq()
    handle = seq[0].register_forward_pre_hook(my_pre_hook)
    with pytest.raises(UnsupportedModelError, match=r"my_pre_hook.*model\[0\]"):
        hessmlp.hessian(seq, x)
    handle.remove()
    _check_hessian(seq, x, "after removing the pre-hook")

    m = _net()
    _check_hessian(m, x, "user class before the pre-hook")
    handle = m.act.register_forward_pre_hook(my_pre_hook)
    with pytest.raises(UnsupportedModelError, match="my_pre_hook"):
        hessmlp.hessian(m, x)
    handle.remove()
    _check_hessian(m, x, "user class after removing the pre-hook")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_legacy_spectral_norm_refused():
    torch.manual_seed(0)
    x = _x(3)
    seq = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(3, 8)), nn.Tanh(), nn.Linear(8, 1)).double()
    with pytest.raises(UnsupportedModelError,
                       match=r"SpectralNorm.*torch\.nn\.utils\.parametrizations\.spectral_norm") as info:
        hessmlp.hessian(seq, x)
    assert len(str(info.value)) < 600
    m = _net()
    m.l1 = torch.nn.utils.spectral_norm(m.l1)
    with pytest.raises(UnsupportedModelError, match=r"parametrizations\.spectral_norm"):
        hessmlp.hessian(m, x)


# ------------------------------------------------------------------ 5. refusal messages

class Swish(nn.Module):
    def __init__(self, learnable=True):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.0), requires_grad=learnable)

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class AdaptiveTanh(nn.Module):
    """L-LAAF: tanh(n a x) with a learnable slope a and a fixed scale n."""

    def __init__(self, n=10.0):
        super().__init__()
        self.n = n
        self.a = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        return torch.tanh(self.n * self.a * x)


class WeightNormLinear(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.v = nn.Parameter(torch.randn(b, a))
        self.g = nn.Parameter(torch.ones(b, 1))
        self.bias = nn.Parameter(torch.zeros(b))

    def forward(self, x):
        w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(x, w, self.bias)


class FourierFeatureEmbedding(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.register_buffer("B", torch.randn(d, k))

    def forward(self, x):
        return torch.cat([torch.sin(x @ self.B), torch.cos(x @ self.B)], -1)


class ResidualBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.l = nn.Linear(w, w)

    def forward(self, h):
        return h + torch.tanh(self.l(h))


class Body(nn.Module):
    """A bigger model holding one of the blocks above between two Linear layers."""

    def __init__(self, block, w=4):
        super().__init__()
        self.inp = nn.Linear(2, w)
        self.block = block
        self.out = nn.Linear(w, 1)

    def forward(self, x):
        return self.out(self.block(torch.tanh(self.inp(x))))


class FourierNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = FourierFeatureEmbedding(2, 3)
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(self.embed(x))))


class SkipConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(2, 4)
        self.l2 = nn.Linear(6, 4)
        self.l3 = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.cat([h, x], -1)
        return self.l3(torch.tanh(self.l2(h)))


def _assert_refusal(model, cls_name, line, cause):
    """The refusal names the innermost user class, this file and line, the cause in words, the
    README, in under 600 characters."""
    with pytest.raises(UnsupportedModelError) as info:
        hessmlp.hessian(model, _x(2, dtype=torch.float32))
    msg = str(info.value)
    assert re.search(rf"\b{cls_name}\b", msg), f"class {cls_name} not named: {msg}"
    assert f"{FILE}:{line}:" in msg, f"{FILE}:{line} not in: {msg}"
    assert re.search(cause, msg), f"cause {cause!r} not in: {msg}"
    assert "README" in msg, msg
    assert len(msg) < 600, f"{len(msg)} characters: {msg}"
    return msg


_SWISH_LINE = _line(Swish.forward, "return x * torch.sigmoid")
_LAAF_LINE = _line(AdaptiveTanh.forward, "return torch.tanh(self.n")
_WNL_LINE = _line(WeightNormLinear.forward, "w = self.g * self.v")
_FOURIER_LINE = _line(FourierFeatureEmbedding.forward, "torch.cat(")
_RESIDUAL_LINE = _line(ResidualBlock.forward, "return h + torch.tanh")
_SKIP_LINE = _line(SkipConcatNet.forward, "torch.cat([h, x]")


def _assert_computed(model, d=2):
    """A graph network (once refused, docs/design.md §9) through the public functions: the
    Hessian and a Laplacian loss's parameter gradients against torch.func, in float64."""
    model = model.double()
    x = _x(d)
    f = lambda xi: model(xi.unsqueeze(0))[0]  # noqa: E731
    want = torch.func.vmap(torch.func.hessian(f))(x).detach()
    assert_rel_close(hessmlp.hessian(model, x), want, torch.float64, type(model).__name__)
    params = dict(model.named_parameters())

    def loss(p):
        g = lambda xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0]  # noqa: E731
        return (torch.func.vmap(torch.func.hessian(g))(x).diagonal(dim1=-2, dim2=-1).sum(-1) ** 2).sum()

    grads = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    model.zero_grad()
    (hessmlp.laplacian(model, x) ** 2).sum().backward()
    for k, p in params.items():
        if p.requires_grad:
            assert_rel_close(p.grad, grads[k], torch.float64, f"{type(model).__name__} grad {k}")


@pytest.mark.parametrize("make", [
    lambda: Body(Swish()), lambda: Body(Swish(learnable=False)), lambda: Body(WeightNormLinear(4, 4)),
    lambda: Body(ResidualBlock(4)), lambda: SkipConcatNet(), lambda: Body(AdaptiveTanh()),
    lambda: FourierNet(),
    lambda: nn.Sequential(nn.Linear(2, 4), Swish(), nn.Linear(4, 1)),
    lambda: nn.Sequential(nn.Linear(2, 4), ResidualBlock(4), nn.Linear(4, 1)),
], ids=["swish", "swish_frozen", "weight_norm_linear", "residual", "skip_concat", "adaptive_tanh",
        "fourier_features", "swish_in_sequential", "residual_in_sequential"])
def test_graph_networks_once_refused_are_computed(make):
    _assert_computed(make())


# ------------------------------------------------------------------ 6. identity reshapes

class ReshapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 8)
        self.l3 = nn.Linear(8, 2)

    def forward(self, x):
        h = self.l1(x.view(-1, 3))
        h = torch.tanh(h).reshape(-1, 8)
        h = h.view(x.shape[0], 8)
        h = h.reshape(x.size(0), -1)
        h = self.l2(h.to(x.dtype))
        h = torch.sin(h).to(x.device)
        h = h.flatten(1).contiguous()
        h = torch.flatten(h, 1)
        h = torch.reshape(h, (-1, 8))
        return self.l3(h.view(-1, 8))


class DtypeNet(nn.Module):
    """.double() / .float() / .to(dtype) that change nothing for x of that dtype."""

    def __init__(self, single):
        super().__init__()
        self.single = single
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 1)

    def forward(self, x):
        h = x.float() if self.single else x.double()
        h = torch.tanh(self.l1(h))
        h = h.to(torch.float32 if self.single else torch.float64)
        return self.l2(h.to("cpu"))


def test_identity_reshapes_are_exact():
    torch.manual_seed(0)
    x = _x(3)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(3, 8), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2),
                        nn.Flatten(1, -1)).double()
    _check_hessian_rows(seq, x, "Flatten in a Sequential")
    _check_hessian_rows(ReshapeNet().double(), x, "view/reshape/to/flatten")
    _check_hessian_rows(DtypeNet(single=False).double(), x, ".double() on float64")


def test_float_conversion_on_float32_is_exact():
    torch.manual_seed(0)
    m32 = DtypeNet(single=True).float()
    x32 = _x(3, dtype=torch.float32)
    H = hessmlp.hessian(m32, x32)
    m64 = copy.deepcopy(m32).double()
    m64.single = False
    ref = _func_hessian_rows(m64, x32.double()).float()
    assert_rel_close(H, ref, torch.float32, ".float() on float32")
    assert RTOL[torch.float32] < 1e-3


class BadView(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 10)
        self.l2 = nn.Linear(10, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).view(-1, 5).view(-1, 10))


class BadInputView(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 1)

    def forward(self, x):
        return self.l1(x.view(-1, 4))


class FloatIn64(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.float())))


def test_reshape_and_conversion_refusals():
    x = _x(3)
    with pytest.raises(UnsupportedModelError,
                       match=r"reshape to \(-1, 5\).*BadView.*not the identity.*10 features") as info:
        hessmlp.hessian(BadView().double(), x)
    assert f"{FILE}:{_line(BadView.forward, '.view(-1, 5)')}" in str(info.value)
    with pytest.raises(UnsupportedModelError, match=r"reshape to \(-1, 4\).*3 features"):
        hessmlp.hessian(BadInputView().double(), x)
    with pytest.raises(UnsupportedModelError, match=r"conversion to torch\.float32.*dtype torch\.float64"):
        hessmlp.hessian(FloatIn64().double(), x)
