"""Turn an nn.Module into the flat network description of the mlp_jet op.

A network is a chain  Linear, elementwise functions, Linear, ...  The
elementwise functions between two Linear layers (and after the last one) form
a "stage"; the C++ kernels compose each stage by the chain rule. Constant
scalar affine maps (``30.0 * h``, ``h / 2 + 1``) are elementwise functions too;
before the first Linear they are folded into its weight and bias.

nn.Sequential models are read directly; any other module is traced with
torch.fx and must be a straight chain of supported calls.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import Sine

__all__ = ["UnsupportedModelError", "Act", "Network", "network_of", "ACT_CODES", "SUPPORTED"]

# The contract with csrc/activations.h.
ACT_CODES = {
    "identity": 0, "affine": 1, "tanh": 2, "sigmoid": 3, "softplus": 4, "silu": 5, "gelu": 6,
    "gelu_tanh": 7, "relu": 8, "leaky_relu": 9, "elu": 10, "sin": 11, "square": 12,
}

# The most elementwise functions between two Linear layers (kMaxStageOps in csrc/jet_math.h).
MAX_STAGE_FUNCTIONS = 8

SUPPORTED = (
    "nn.Linear, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.SiLU, nn.GELU ('none' or 'tanh'), nn.ReLU, "
    "nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout (eval mode), hessmlp.Sine, nested nn.Sequential, "
    "the matching torch / torch.nn.functional calls and Tensor methods (tanh, sigmoid, softplus, "
    "silu, gelu, relu, leaky_relu, elu, sin, square, F.linear), squaring (h * h, h ** 2), and "
    "multiplying, dividing, adding or subtracting a constant scalar")


class UnsupportedModelError(ValueError):
    """The model is not a chain of layers that hessmlp computes exactly."""


@dataclass(frozen=True)
class Act:
    """One elementwise function: a name of ACT_CODES and its two parameters."""
    name: str
    p0: float = 0.0
    p1: float = 0.0


@dataclass
class Network:
    """The flat description that the op takes (see csrc/ops.cpp)."""
    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    stages: List[List[Act]]          # stage after each Linear
    where: List[str]                 # position of each Linear, for error messages

    @property
    def stage_sizes(self) -> List[int]:
        return [len(s) for s in self.stages]

    @property
    def act_codes(self) -> List[int]:
        return [ACT_CODES[a.name] for s in self.stages for a in s]

    @property
    def act_params(self) -> List[float]:
        return [float(p) for s in self.stages for a in s for p in (a.p0, a.p1)]


# A step of the chain: ("linear", where, (weight path, bias path or None)) or
# ("act", where, Act). Paths are attribute paths from the model ("0.weight",
# "layers.2.bias"), so that the structure is plain data: torch.compile takes it as
# a constant and traces only the parameter reads.
Step = Tuple[str, str, object]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _refuse(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"hessmlp: {what} at {where} is not supported: hessmlp computes exact Hessians of chains of "
        f"Linear layers and elementwise functions. Supported: {SUPPORTED}.")


# ---------------------------------------------------------------- modules

def _is(m: nn.Module, cls) -> bool:
    # Subclasses count only when they keep the base class's forward.
    return isinstance(m, cls) and type(m).forward is cls.forward


def _module_steps(m: nn.Module, where: str, path: str) -> List[Step]:
    if _is(m, nn.Linear):
        return [("linear", where, (_join(path, "weight"),
                                   None if m.bias is None else _join(path, "bias")))]
    if _is(m, nn.Identity):
        return []
    if type(m) is nn.Dropout:
        if m.training and m.p > 0:
            raise UnsupportedModelError(
                f"hessmlp: {where} is nn.Dropout(p={m.p}) in training mode, which is random; call "
                f"model.eval() first (in eval mode Dropout is the identity)")
        return []
    if _is(m, nn.Tanh):
        return [("act", where, Act("tanh"))]
    if _is(m, nn.Sigmoid):
        return [("act", where, Act("sigmoid"))]
    if _is(m, nn.Softplus):
        return [("act", where, Act("softplus", float(m.beta), float(m.threshold)))]
    if _is(m, nn.SiLU):
        return [("act", where, Act("silu"))]
    if _is(m, nn.GELU):
        return [("act", where, _gelu(m.approximate, where))]
    if _is(m, nn.ReLU):
        return [("act", where, Act("relu"))]
    if _is(m, nn.LeakyReLU):
        return [("act", where, Act("leaky_relu", float(m.negative_slope)))]
    if _is(m, nn.ELU):
        return [("act", where, Act("elu", float(m.alpha)))]
    if _is(m, Sine):
        return [("act", where, Act("sin", float(m.w0)))]
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        steps = []
        for name, child in m.named_children():
            steps += _module_steps(child, f"{where}[{name}]", _join(path, name))
        return steps
    if not type(m).__module__.startswith("torch."):
        # A user's own module inside a Sequential: its forward must be a chain too.
        return _FxChain(m, where, path).steps()
    raise _refuse(where, f"{type(m).__name__}")


def _gelu(approximate: str, where: str) -> Act:
    if approximate == "none":
        return Act("gelu")
    if approximate == "tanh":
        return Act("gelu_tanh")
    raise UnsupportedModelError(f"hessmlp: GELU at {where} has approximate={approximate!r}; "
                                "expected 'none' or 'tanh'")


# ---------------------------------------------------------------- torch.fx

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, Sine):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, qualname)


def _bind(args, kwargs, names, defaults):
    """Positional and keyword arguments of a call -> {name: value}."""
    out = dict(zip(names, [None] * len(names)))
    out.update(defaults)
    for n, a in zip(names, args):
        out[n] = a
    for k, v in kwargs.items():
        if k not in out:
            raise TypeError(k)
        out[k] = v
    return out


# name -> (parameter names after the input, defaults, Act builder)
_FUNCS = {
    "tanh": ((), {}, lambda a: Act("tanh")),
    "sigmoid": ((), {}, lambda a: Act("sigmoid")),
    "softplus": (("beta", "threshold"), {"beta": 1.0, "threshold": 20.0},
                 lambda a: Act("softplus", float(a["beta"]), float(a["threshold"]))),
    "silu": (("inplace",), {"inplace": False}, lambda a: Act("silu")),
    "gelu": (("approximate",), {"approximate": "none"}, None),
    "relu": (("inplace",), {"inplace": False}, lambda a: Act("relu")),
    "leaky_relu": (("negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False},
                   lambda a: Act("leaky_relu", float(a["negative_slope"]))),
    "elu": (("alpha", "inplace"), {"alpha": 1.0, "inplace": False},
            lambda a: Act("elu", float(a["alpha"]))),
    "sin": ((), {}, lambda a: Act("sin", 1.0)),
    "square": ((), {}, lambda a: Act("square")),
}

_FUNCTION_NAMES = {
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.softplus: "softplus", F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu",
    F.leaky_relu: "leaky_relu", F.elu: "elu", torch.sin: "sin",
    torch.tanh_: "tanh", torch.sigmoid_: "sigmoid", torch.relu_: "relu", torch.sin_: "sin",
    F.relu_: "relu", F.leaky_relu_: "leaky_relu", F.elu_: "elu", torch.square: "square",
}

_ARITH = {
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.neg: "neg", torch.neg: "neg", operator.pos: "pos",
    operator.pow: "pow", torch.pow: "pow",
}
_ARITH_METHODS = {"mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul",
                  "div": "div", "div_": "div", "__truediv__": "div", "true_divide": "div",
                  "add": "add", "add_": "add", "__add__": "add", "__radd__": "add",
                  "sub": "sub", "sub_": "sub", "__sub__": "sub", "__rsub__": "rsub",
                  "neg": "neg", "neg_": "neg", "__neg__": "neg", "pow": "pow", "__pow__": "pow"}


class _FxChain:
    def __init__(self, model: nn.Module, name: str, path: str = ""):
        self.model = model
        self.name = name
        self.path = path  # of model within the model hessmlp was given
        try:
            self.graph = _Tracer().trace(model)
        except Exception as e:  # fx raises many types for data-dependent control flow
            raise UnsupportedModelError(
                f"hessmlp: could not trace {name}.forward with torch.fx ({type(e).__name__}: {e}). "
                f"hessmlp accepts nn.Sequential models and modules whose forward is a straight chain "
                f"of {SUPPORTED}. Write the model as an nn.Sequential (see hessmlp.MLP).") from e

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{self.name}.{node.target} ({type(self.model.get_submodule(node.target)).__name__})"
        if node.op == "call_method":
            return f"node '{node.name}' (Tensor.{node.target}) of {self.name}.forward"
        target = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({target}) of {self.name}.forward"

    def _attr(self, node: fx.Node):
        obj = self.model
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj

    def _scalar(self, v, node: fx.Node) -> float:
        if isinstance(v, fx.Node):
            if v.op != "get_attr":
                raise _refuse(self._where(node), "an operation between two computed tensors")
            t = self._attr(v)
            if not isinstance(t, torch.Tensor) or t.numel() != 1:
                raise _refuse(self._where(node), f"a non-scalar operand '{v.target}'")
            if t.requires_grad:
                raise _refuse(self._where(node), f"a learnable scalar '{v.target}' (trainable "
                                                 "activation parameters are not supported)")
            return float(t.item())
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _refuse(self._where(node), f"an operand of type {type(v).__name__}")
        return float(v)

    def steps(self) -> List[Step]:
        nodes = list(self.graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"hessmlp: {self.name}.forward must take exactly one tensor input, it takes "
                f"{len(inputs)} ({', '.join(n.target for n in inputs)}); concatenate the inputs "
                "into one x outside the model")
        cur = inputs[0]
        steps: List[Step] = []
        for node in nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                if node.args[0] is not cur:
                    raise UnsupportedModelError(
                        f"hessmlp: {self.name}.forward must return the single tensor at the end of "
                        f"its chain, it returns {node.args[0]!r}")
                break
            args, kwargs = list(node.args), dict(node.kwargs)
            uses = [a for a in list(args) + list(kwargs.values()) if a is cur]
            if node.op == "call_method":
                if not args or args[0] is not cur:
                    raise _refuse(self._where(node), f"method '{node.target}' not applied to the chain")
            elif not uses:
                raise _refuse(self._where(node), "a computation that does not continue the chain")
            steps += self._node_steps(node, cur, args, kwargs)
            cur = node
        return steps

    def _node_steps(self, node, cur, args, kwargs) -> List[Step]:
        where = self._where(node)
        if node.op == "call_module":
            if len(args) != 1 or args[0] is not cur or kwargs:
                raise _refuse(where, "a module call with extra arguments")
            mod = self.model.get_submodule(node.target)
            return _module_steps(mod, where, _join(self.path, node.target))
        if node.op == "call_method":
            name = node.target
            if name in _ARITH_METHODS:
                return [("act", where, self._affine(_ARITH_METHODS[name], args, kwargs, cur, node))]
            fname = name[:-1] if name.endswith("_") else name
            if fname in ("tanh", "sigmoid", "relu", "sin", "square"):
                if len(args) != 1 or kwargs:
                    raise _refuse(where, f"Tensor.{name} with arguments")
                return [("act", where, _FUNCS[fname][2]({}))]
            if name in ("contiguous", "clone"):
                return []
            raise _refuse(where, f"Tensor.{name}")
        # call_function
        fn = node.target
        if fn in _ARITH:
            return [("act", where, self._affine(_ARITH[fn], args, kwargs, cur, node))]
        if fn is F.linear:
            a = self._bind(node, args, kwargs, ("input", "weight", "bias"), {"bias": None})
            if a["input"] is not cur:
                raise _refuse(where, "F.linear not applied to the chain")
            w, b = a["weight"], a["bias"]
            for v in (w, b):
                if v is not None and (not isinstance(v, fx.Node) or v.op != "get_attr"):
                    raise _refuse(where, "F.linear with a computed weight or bias")
            if not isinstance(self._attr(w), torch.Tensor) or (
                    b is not None and not isinstance(self._attr(b), torch.Tensor)):
                raise _refuse(where, "F.linear whose weight or bias is not a tensor")
            return [("linear", where, (_join(self.path, w.target),
                                       None if b is None else _join(self.path, b.target)))]
        if fn is F.dropout:
            a = self._bind(node, args, kwargs, ("input", "p", "training", "inplace"),
                           {"p": 0.5, "training": True, "inplace": False})
            if a["training"] and a["p"] > 0:
                raise UnsupportedModelError(
                    f"hessmlp: {where} is dropout in training mode, which is random; call "
                    "model.eval() first")
            return []
        if fn in _FUNCTION_NAMES:
            fname = _FUNCTION_NAMES[fn]
            names, defaults, build = _FUNCS[fname]
            a = self._bind(node, args, kwargs, ("input",) + names, defaults)
            if a["input"] is not cur:
                raise _refuse(where, f"{fname} not applied to the chain")
            for k in names:
                if isinstance(a[k], fx.Node):
                    raise _refuse(where, f"{fname} with a computed argument '{k}'")
            if fname == "gelu":
                return [("act", where, _gelu(a["approximate"], where))]
            return [("act", where, build(a))]
        raise _refuse(where, f"function {getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}")

    def _bind(self, node, args, kwargs, names, defaults):
        try:
            return _bind(args, kwargs, names, defaults)
        except TypeError as e:
            raise _refuse(self._where(node), f"the keyword argument {e}") from None

    def _affine(self, op, args, kwargs, cur, node) -> Act:
        where = self._where(node)
        if op == "mul" and len(args) == 2 and args[0] is cur and args[1] is cur and not kwargs:
            return Act("square")
        if op == "pow":
            if len(args) == 2 and args[0] is cur and not kwargs and not isinstance(args[1], fx.Node) \
                    and not isinstance(args[1], bool) and args[1] in (1, 2):
                return Act("square") if args[1] == 2 else Act("identity")
            raise _refuse(where, "a power other than h ** 2")
        if op in ("neg", "pos"):
            if len(args) != 1 or kwargs:
                raise _refuse(where, "negation with extra arguments")
            return Act("affine", -1.0 if op == "neg" else 1.0, 0.0)
        if kwargs.get("alpha", 1) != 1 or set(kwargs) - {"alpha"} or len(args) != 2:
            raise _refuse(where, f"'{op}' with extra arguments")
        lhs, rhs = args
        if lhs is cur and rhs is cur:
            raise _refuse(where, f"'{op}' of the chain with itself")
        if op == "rsub":  # Tensor.__rsub__(self, other) = other - self
            return Act("affine", -1.0, self._scalar(rhs, node))
        chain_left = lhs is cur
        c = self._scalar(rhs if chain_left else lhs, node)
        if op == "mul":
            return Act("affine", c, 0.0)
        if op == "add":
            return Act("affine", 1.0, c)
        if op == "sub":
            return Act("affine", 1.0, -c) if chain_left else Act("affine", -1.0, c)
        if op == "div":
            if not chain_left:
                raise _refuse(where, "dividing a constant by the chain")
            if c == 0.0:
                raise _refuse(where, "dividing by zero")
            return Act("affine", 1.0 / c, 0.0)
        raise _refuse(where, op)


# The structure of a model is kept on the model itself (per training flag, which fx
# bakes in), so that compiled code reads it as a constant attribute.
_CACHE_ATTR = "_hessmlp_structure"

# torch.compiler.assume_constant_result takes a module argument from torch 2.13 on.
_CONSTANT_OF_MODULE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def _compute_steps(model: nn.Module) -> Tuple[Step, ...]:
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        return tuple(_module_steps(model, "model", ""))
    if type(model) in _DIRECT:
        return tuple(_module_steps(model, "model", ""))
    return tuple(_FxChain(model, type(model).__name__).steps())


def _cached_steps(model: nn.Module) -> Tuple[Step, ...]:
    cache = model.__dict__.setdefault(_CACHE_ATTR, {})
    key = model.training
    traced = not (isinstance(model, nn.Sequential) or type(model) in _DIRECT)
    if traced and key in cache:
        return cache[key]
    # Sequential models are read again on every eager call (cheap), so that edits to them
    # are seen; the cache entry is only replaced when the structure changed.
    steps = _compute_steps(model)
    if cache.get(key) != steps:
        cache[key] = steps
    return cache[key]


_constant_steps = torch.compiler.assume_constant_result(_cached_steps)


def _steps_of(model: nn.Module) -> Tuple[Step, ...]:
    """The structure of ``model``: plain data, read once per model (and training flag)."""
    if not torch.compiler.is_compiling():
        return _cached_steps(model)
    cache = getattr(model, _CACHE_ATTR, None)
    if cache is not None and model.training in cache:
        return cache[model.training]
    if _CONSTANT_OF_MODULE:
        return _constant_steps(model)
    # Older torch: Sequential models are traced through; a model that torch.fx must read
    # needs one eager hessmlp call before compiling (see the README).
    return _compute_steps(model)


# Single modules that are read directly rather than traced.
_DIRECT = (nn.Linear,)


def _get(model: nn.Module, path: str) -> torch.Tensor:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def network_of(model: nn.Module) -> Network:
    """The flat description of ``model``, with its current parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"hessmlp: model must be an nn.Module, got {type(model).__name__}")
    # torch.compile(model) wraps the module; its parameters are the original's.
    model = getattr(model, "_orig_mod", model)
    steps = _steps_of(model)
    pre: List[Tuple[str, Act]] = []
    weights: List[torch.Tensor] = []
    biases: List[Optional[torch.Tensor]] = []
    stages: List[List[Act]] = []
    where: List[str] = []
    for kind, w, item in steps:
        if kind == "linear":
            W, b = _get(model, item[0]), None if item[1] is None else _get(model, item[1])
            weights.append(W)
            biases.append(b)
            stages.append([])
            where.append(w)
        elif not weights:
            pre.append((w, item))
        elif item.name != "identity":
            stages[-1].append(item)
    if not weights:
        raise UnsupportedModelError(
            f"hessmlp: the model has no nn.Linear layer ({type(model).__name__}); hessmlp computes "
            "Hessians of networks built from Linear layers and elementwise functions")
    if pre:
        a, c = 1.0, 0.0
        for w, act in pre:
            if act.name != "affine":
                raise UnsupportedModelError(
                    f"hessmlp: {act.name} at {w}, before the first Linear layer, is not supported: "
                    "only constant scalar scaling and shifts of x may come before it")
            a, c = act.p0 * a, act.p0 * c + act.p1
        # W (a x + c) + b = (a W) x + (b + c W 1)
        W0, b0 = weights[0], biases[0]
        shift = c * W0.sum(dim=1)
        weights[0] = a * W0
        biases[0] = shift if b0 is None else b0 + shift
    for l, s in enumerate(stages):
        # Merge runs of affine maps, then drop no-op ones ("h * 1"); an empty stage is the
        # identity in the kernels.
        merged: List[Act] = []
        for a in s:
            if a.name == "affine" and merged and merged[-1].name == "affine":
                b = merged.pop()
                a = Act("affine", a.p0 * b.p0, a.p0 * b.p1 + a.p1)
            merged.append(a)
        s[:] = [a for a in merged if not (a.name == "affine" and a.p0 == 1.0 and a.p1 == 0.0)]
        if len(s) > MAX_STAGE_FUNCTIONS:
            raise UnsupportedModelError(
                f"hessmlp: {len(s)} elementwise functions follow {where[l]} before the next Linear "
                f"layer; at most {MAX_STAGE_FUNCTIONS} are supported there")
    return Network(weights, biases, stages, where)
