"""What hessmlp reads of an nn.Module, shared by its one reader (hessmlp/_graph_reader.py):

  - the flat chain description the op mlp_jet takes (Network, Act, ACT_CODES);
  - single modules as steps (_module_steps: nn.Linear, activations, weight norm, dropout);
  - the torch.fx trace and its helpers (_FxChain: where a node is in the user's code, scalar
    constants, elementwise functions, reshapes that are the identity);
  - the model's fingerprint and the structure cache kept on the model (_fingerprint,
    _cached), and under torch.compile the key dynamo guards on (check_compiled_key).

Elementwise functions between two Linear layers (and after the last one) form a "stage"; the
C++ kernels compose each stage by the chain rule. Constant scalar affine maps (``30.0 * h``,
``h / 2 + 1``) are elementwise functions too; before the first Linear of a chain they are
folded into its weight and bias (hessmlp/_graph.py, chain_network).
"""
from __future__ import annotations

import inspect
import operator
import os
import re
import threading
import traceback
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _C  # (the C walk of _fingerprint)

from .nn import Sine

try:  # the hook of the legacy torch.nn.utils.weight_norm
    from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm
except ImportError:  # pragma: no cover
    class _WeightNorm:  # type: ignore[no-redef]
        pass

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
    # What the model's reshapes and conversions assume of the input, checked against x
    # (api._check_network): ("width", where, n, layer: the features after Linear layer, -1 for
    # x) and ("dtype", where, dtype, layer).
    checks: List[tuple] = field(default_factory=list)

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


# Where every refusal points for the list of what hessmlp reads.
_SEE = "See 'Supported models' in hessmlp's README for what it reads."

_CHAIN_ADVICE = ("build this part from what hessmlp reads: Linear layers, elementwise functions, "
                 "sums, concatenations, slices, products and scalings (hessmlp.MLP, ResidualMLP, "
                 "FourierFeatures and ModifiedMLP are ready ones)")


# Advice where a model is read as a graph network rather than a chain (a residual, a
# concatenation, a product, a learnable or per-feature operand).
_GRAPH_ADVICE_SHORT = "hessmlp reads such a model as a graph network (docs/design.md §9)"
_GRAPH_ADVICE = (_GRAPH_ADVICE_SHORT + ", which needs at least one nn.Linear layer")


def _refuse(where: str, what: str, advice: str = _CHAIN_ADVICE) -> UnsupportedModelError:
    advice = advice[:1].upper() + advice[1:] if not advice.startswith("hessmlp") else advice
    return UnsupportedModelError(f"hessmlp: {what} at {where} is not supported. {advice}. {_SEE}")


# ---------------------------------------------------------------- modules

def _is(m: nn.Module, cls) -> bool:
    # Subclasses count only when they keep the base class's forward.
    return isinstance(m, cls) and type(m).forward is cls.forward


def _legacy_weight_norm(m: nn.Module):
    """The hook of torch.nn.utils.weight_norm (the legacy, hook-based one) on m, or None."""
    for h in m._forward_pre_hooks.values():
        if isinstance(h, _WeightNorm):
            return h
    return None


def _check_hooks(m: nn.Module, where: str) -> None:
    """hessmlp reads a module's weights and never calls it: a hook would be skipped, and an
    instance-level forward would not be read."""
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise _refuse(where, f"an uninitialised {type(m).__name__}",
                      "run one forward of the model first, so that its shapes are known")
    if "forward" in m.__dict__:
        raise _refuse(where, "a forward set on the instance (module.forward = ...)",
                      "hessmlp reads the forward of the module's class; define the forward in a "
                      "class (a subclass of nn.Module)")
    wn = _legacy_weight_norm(m)
    pre = [h for h in m._forward_pre_hooks.values() if h is not wn]
    for kind, hooks, register in (("forward pre-hook", pre, "register_forward_pre_hook"),
                                  ("forward hook", list(m._forward_hooks.values()),
                                   "register_forward_hook")):
        if not hooks:
            continue
        name = getattr(hooks[0], "__qualname__", type(hooks[0]).__name__)
        advice = f"remove the hook (call .remove() on the handle {register} returned)"
        if "SpectralNorm" in name:
            advice = ("use torch.nn.utils.parametrizations.spectral_norm instead of the hook-based "
                      "torch.nn.utils.spectral_norm")
        raise _refuse(where, f"a {kind} ({name}), which hessmlp would not run,", advice)
    if wn is not None and not _is(m, nn.Linear):
        raise _refuse(where, f"torch.nn.utils.weight_norm on a {type(m).__name__}",
                      "hessmlp reads it on nn.Linear; use torch.nn.utils.parametrizations.weight_norm")
    if wn is not None and wn.name != "weight":
        raise _refuse(where, f"torch.nn.utils.weight_norm of {wn.name!r}",
                      "hessmlp reads the weight norm of 'weight' only")


def _module_steps(m: nn.Module, where: str, path: str) -> List[Step]:
    _check_hooks(m, where)
    if _is(m, nn.Linear):
        wn = _legacy_weight_norm(m)
        # The legacy weight norm recomputes .weight only inside forward: read it from g and v.
        weight = _join(path, "weight") if wn is None else \
            ("weight_norm", _join(path, "weight_v"), _join(path, "weight_g"), wn.dim)
        return [("linear", where, (weight, None if m.bias is None else _join(path, "bias")))]
    if _is(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return []  # the identity on (B, n)
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
        # Every entry, a module used twice included (named_children() lists it once).
        for name, child in m._modules.items():
            steps += _module_steps(child, f"{where}[{name}]", _join(path, name))
        return steps
    if not type(m).__module__.startswith("torch."):  # (the graph reader traces them through)
        raise _refuse(where, f"the module {type(m).__name__} called with its own forward")
    if type(m).__module__ == "torch.nn.modules.activation":
        raise _refuse(where, f"the activation {type(m).__name__}",
                      "it is not one of the elementwise functions hessmlp reads")
    raise _refuse(where, f"{type(m).__name__}",
                  "hessmlp reads no normalisation layers, convolutions or attention (their "
                  "derivatives couple the samples or features in ways it does not compute): "
                  "leave the layer out, or " + _CHAIN_ADVICE + "; a fixed input normalisation "
                  "(x - mu) / sigma with buffers is read")


def _gelu(approximate: str, where: str) -> Act:
    if approximate == "none":
        return Act("gelu")
    if approximate == "tanh":
        return Act("gelu_tanh")
    raise UnsupportedModelError(f"hessmlp: GELU at {where} has approximate={approximate!r}; "
                                "expected 'none' or 'tanh'")


# ---------------------------------------------------------------- torch.fx

# torch.fx patches nn.Module.__call__ and __getattr__ for the whole process while it traces:
# hessmlp traces one model at a time, and calls from other threads during a trace pass
# through the patch to PyTorch's own (see _Tracer).
_TRACE_LOCK = threading.RLock()  # (re-entrant: a forward may call hessmlp itself)


def _inline_scripted_functions(model: nn.Module) -> List[tuple]:
    """TorchScript functions (@torch.jit.script def swish) that the forwards of model's modules
    call by a global name: replaced there by the Python function they were compiled from, for
    the trace (fx cannot pass its proxies to TorchScript); returns what to restore."""
    patched = []
    seen = set()
    for m in model.modules():
        forward = getattr(type(m), "forward", None)
        g = getattr(forward, "__globals__", None)
        if g is None or id(g) in seen:
            continue
        seen.add(id(g))
        for k, v in list(g.items()):
            fn = getattr(v, "_torchdynamo_inline", None) if isinstance(v, torch.jit.ScriptFunction) else None
            if callable(fn):
                patched.append((g, k, v))
                g[k] = fn
    return patched


class _Tracer(fx.Tracer):
    def __init__(self, proxy_buffers: bool = False):
        super().__init__()
        self.proxy_buffer_attributes = proxy_buffers
        self.record_stack_traces = True  # refusals name the user's source line
        self._owner = threading.get_ident()

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._owner:  # another thread's module call
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

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


_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>[^\n]*)')


def _user_line(stack_trace: Optional[str]) -> Optional[str]:
    """The innermost frame of a traced node's stack that is the user's code: 'file:line: code'."""
    if not stack_trace:
        return None
    last = None
    for f in _FRAME.finditer(stack_trace):
        path = os.path.abspath(f["file"])
        if not path.startswith((_TORCH_DIR, _THIS_DIR)) and "<" not in f["file"]:
            last = f
    if last is None:
        return None
    return f"{os.path.basename(last['file'])}:{last['line']}: {last['code'].strip()}"


# Tensor metadata reads: not a computation (x.shape[0], x.dtype, x.device, x.size(0)).
_META_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")
# Tensor methods and functions that are the identity on the (B, n) activations of a chain
# (with the checks in _FxChain._identity).
_RESHAPES = ("view", "reshape", "flatten", "to", "float", "double", "type_as", "contiguous",
             "clone", "detach_")


class _FxChain:
    def __init__(self, model: nn.Module, name: str, path: str = ""):
        self.model = model
        self.name = name
        self.path = path  # of model within the model hessmlp was given
        if type(model).forward is nn.Module.forward:
            what = name if name == type(model).__name__ else f"{name} ({type(model).__name__})"
            raise UnsupportedModelError(f"hessmlp: {what} has no forward method. {_SEE}")
        # Arguments after x that have defaults (mods=None, scale=2.0) are traced at their default.
        try:
            params = list(inspect.signature(type(model).forward).parameters.values())[2:]
        except (TypeError, ValueError):
            params = []
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        before = set(model.__dict__)
        try:
            with _TRACE_LOCK:
                patched = _inline_scripted_functions(model)
                try:
                    # Buffers as get_attr nodes, so that what the forward computes from them
                    # alone (ub - lb) is read as a computation, replayed with their values
                    # of each call, not as a tensor fx computed once; a forward that iterates
                    # over a buffer or branches on it is traced with them as plain tensors.
                    self.graph = _Tracer(proxy_buffers=True).trace(model, concrete_args=concrete or None)
                except Exception:
                    for k in set(model.__dict__) - before:
                        del model.__dict__[k]
                    self.graph = _Tracer().trace(model, concrete_args=concrete or None)
                finally:
                    for g, k, v in patched:
                        g[k] = v
        except Exception as e:  # fx raises many types for data-dependent control flow
            line = _user_line("".join(traceback.format_tb(e.__traceback__)))
            at = f" at {line}" if line else ""
            if isinstance(e, fx.proxy.TraceError) or "symbolically traced" in str(e):
                why = ("a forward that branches on the values of its input (if x.sum() > 0, loops "
                       "over x's entries) has no single graph")
            else:
                why = "reading it as a graph failed there"
            raise UnsupportedModelError(
                f"hessmlp: could not trace {name}.forward with torch.fx{at} ({type(e).__name__}: "
                f"{e}): {why}. Write the forward without branching on tensor values (one graph "
                f"of calls for every input), or as an nn.Sequential. {_SEE}") from e
        finally:
            # Tensor literals of the forward (torch.tensor(2.0)) become attributes of the model
            # while fx traces: keep them here, not on the user's model.
            self.literals = {k: model.__dict__.pop(k) for k in set(model.__dict__) - before}
        self.meta: set = set()  # nodes that only read metadata of a tensor (x.shape, x.dtype)
        self.consts: List[Step] = []  # tensors read as constants: ("const", where, (path, value))
        self.values: dict = {}  # constant nodes (torch.tensor(2.0, dtype=x.dtype)) -> their value
        # Scalars read from tensors fx computed while tracing (a buffer's entries, iterated
        # over): (where, the tensor); their source is unknown, so they are read every call.
        self.literal_reads: List[Tuple[str, torch.Tensor]] = []

    def _where(self, node: fx.Node) -> str:
        """The innermost user module holding node, and the user's source line."""
        if node.op == "call_module":
            path, cls = node.target, type(self.model.get_submodule(node.target))
        else:
            stack = node.meta.get("nn_module_stack") or {}
            path, cls = list(stack.values())[-1] if stack else ("", type(self.model))
            if isinstance(cls, str):  # some torch versions keep the class name
                cls = type(cls, (), {})
        qual = f"{self.name}.{path}" if path else self.name
        if path or self.name != cls.__name__:
            where = f"{cls.__name__} ({qual})"  # e.g. Swish (model[1]), Swish (Net.act)
        else:
            where = f"{qual}.forward"  # the model itself
        line = _user_line(node.meta.get("stack_trace"))
        return f"{where}, {line}" if line else where

    def _attr(self, node: fx.Node):
        if node.target in self.literals:
            return self.literals[node.target]
        obj = self.model
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj

    def _is_computed(self, v) -> bool:
        return isinstance(v, fx.Node) and v.op not in ("get_attr",) and v not in self.meta

    def _scalar(self, v, node: fx.Node, op: str = "") -> float:
        if isinstance(v, fx.Node) and v in self.values:
            return self.values[v]
        if isinstance(v, fx.Node) and v.op == "get_attr" and v.target in self.literals:
            t = self.literals[v.target]  # a tensor literal of the forward (torch.tensor(2.0))
            if t.numel() == 1 and t.dtype != torch.bool and not t.is_complex():
                self.literal_reads.append((self._where(node), t))
                return float(t.item())
            raise _refuse(self._where(node), f"a tensor literal of shape {tuple(t.shape)} and "
                          f"dtype {t.dtype}", "hessmlp reads real scalar constants there")
        if isinstance(v, fx.Node):
            if v.op != "get_attr":
                raise self._two_tensors(node, op)
            t = self._attr(v)
            if not isinstance(t, torch.Tensor) or t.numel() != 1:
                raise _refuse(self._where(node), f"an operation with the tensor '{v.target}' of "
                              f"shape {tuple(getattr(t, 'shape', ()))}",
                              "hessmlp reads scalar constants between Linear layers, not per-feature "
                              "ones yet")
            if t.requires_grad:
                raise self._learnable(node, v.target)
            value = float(t.item())
            # Read as a constant: the structure is read again when it changes (eager), and
            # compiled code checks it (network_of).
            self.consts.append(("const", self._where(node), (_join(self.path, v.target), value)))
            return value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _refuse(self._where(node), f"an operand of type {type(v).__name__}")
        return float(v)

    def _learnable(self, node: fx.Node, name: str) -> UnsupportedModelError:
        return _refuse(self._where(node), f"a learnable scalar '{name}' (an adaptive activation)",
                       _GRAPH_ADVICE_SHORT + "; or freeze it with "
                       "requires_grad_(False) to treat it as a constant")

    def _two_tensors(self, node: fx.Node, op: str) -> UnsupportedModelError:
        if op in ("add", "sub", "rsub"):
            what = "two branches merged by a sum (a residual or skip connection, h + f(h))"
        elif op in ("mul", "div"):
            what = "a product of two computed tensors (gating, x * sigmoid(beta * x))"
        else:
            what = f"'{op}' of two computed tensors"
        return _refuse(self._where(node), what, _GRAPH_ADVICE)

    def _constant_value(self, node: fx.Node) -> Optional[float]:
        """torch.tensor(2.0) / torch.as_tensor(2.0), with any dtype or device (x.dtype): a
        scalar constant."""
        if node.op != "call_function" or node.target not in (torch.tensor, torch.as_tensor):
            return None
        if len(node.args) != 1 or isinstance(node.args[0], bool) or \
                not isinstance(node.args[0], (int, float)):
            return None
        if set(node.kwargs) - {"dtype", "device"} or any(
                isinstance(v, fx.Node) and v not in self.meta for v in node.kwargs.values()):
            return None
        return float(node.args[0])

    def _is_learnable_scalar(self, v: fx.Node) -> bool:
        if v.op != "get_attr":
            return False
        t = self._attr(v)
        return isinstance(t, torch.Tensor) and t.numel() == 1 and t.requires_grad

    def _is_meta(self, node: fx.Node) -> bool:
        """x.shape, x.shape[0], x.dtype, x.device, x.size(...): reads of metadata."""
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
            return node.args[1] in _META_ATTRS
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is operator.getitem:
            return isinstance(node.args[0], fx.Node) and node.args[0] in self.meta
        return False

    def _walk(self, n_inputs: int = 1):
        """(the input node, or the list of n_inputs > 1 input nodes; the nodes that compute
        something, the output node last): the placeholders of arguments traced at their
        defaults, metadata reads and constants (self.meta, self.values) left out."""
        nodes = list(self.graph.nodes)
        # Placeholders of arguments traced at their defaults (they carry that default), and
        # the checks fx adds for them.
        fixed = {n for n in nodes if n.op == "placeholder" and n.args}
        for n in nodes:
            if n.op == "call_function" and n.all_input_nodes and \
                    all(a in fixed for a in n.all_input_nodes):
                fixed.add(n)
        nodes = [n for n in nodes if n not in fixed]
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != n_inputs:
            names = ", ".join(n.target for n in inputs)
            if n_inputs > 1:
                raise UnsupportedModelError(
                    f"hessmlp: {self.name}.forward takes {len(inputs)} tensor inputs ({names}) but x "
                    f"has {n_inputs} parts; pass one tensor per input, as a tuple")
            raise UnsupportedModelError(
                f"hessmlp: {self.name}.forward takes {len(inputs)} inputs ({names}); hessmlp "
                "differentiates w.r.t. exactly one tensor input. Concatenate the inputs into one x "
                f"outside the model (forward(self, x) with x = torch.cat([x, t], -1)). {_SEE}")
        work = []
        for node in nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if self._is_meta(node):
                self.meta.add(node)
                continue
            value = self._constant_value(node)
            if value is not None:
                self.values[node] = value
                continue
            work.append(node)
            if node.op == "output":
                break
        return (inputs[0] if n_inputs == 1 else inputs), work

    def _identity(self, node, name, args, kwargs) -> Optional[List[Step]]:
        """[] (or a width check) when a reshape or conversion is the identity on (B, n)
        activations; None when it is not one of those."""
        rest = [a for a in args[1:]]
        if name in ("contiguous", "clone", "detach_") or (name == "flatten" and (
                rest in ([1], [1, -1]) or kwargs in ({"start_dim": 1}, {"start_dim": 1, "end_dim": -1}))):
            return []
        if name in ("view", "reshape") and not kwargs:
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if len(shape) == 2:
                batch, width = shape
                batch_ok = batch == -1 or (isinstance(batch, fx.Node) and batch in self.meta)
                if batch_ok and (width == -1 or (isinstance(width, fx.Node) and width in self.meta)):
                    return []  # (-1, -1) or (B, h.shape[1]): the identity
                if batch_ok and isinstance(width, int) and not isinstance(width, bool):
                    return [("width", self._where(node), width)]
            return None
        if name in ("float", "double") and not rest and not kwargs:
            return [("dtype", self._where(node), torch.float32 if name == "float" else torch.float64)]
        if name == "type_as" and len(rest) == 1 and isinstance(rest[0], fx.Node):
            return []  # the same dtype as another tensor of the model: x's (checked by the op)
        if name == "to":
            ops = rest + list(kwargs.values())
            if all(isinstance(o, fx.Node) and o in self.meta for o in ops):
                return []  # .to(x.dtype), .to(x.device)
            if len(ops) == 1 and isinstance(ops[0], torch.dtype):
                return [("dtype", self._where(node), ops[0])]
            if len(ops) == 1 and isinstance(ops[0], (torch.device, str)):
                return []  # a device move: hessmlp checks that every tensor is on x's device
        return None

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
            same = self._identity(node, name, args, kwargs) if name in _RESHAPES else None
            if same is not None:
                return same
            raise _refuse(where, f"Tensor.{name}" + (" with these arguments" if name in _RESHAPES else ""),
                          "hessmlp reads elementwise functions between Linear layers; a reshape "
                          "is accepted where it is the identity on (B, n) activations")
        # call_function
        fn = node.target
        if fn in (torch.flatten, torch.reshape) and args and args[0] is cur:
            same = self._identity(node, fn.__name__, args, kwargs)
            if same is not None:
                return same
        if fn in _ARITH:
            return [("act", where, self._affine(_ARITH[fn], args, kwargs, cur, node))]
        if fn is F.linear:
            a = self._bind(node, args, kwargs, ("input", "weight", "bias"), {"bias": None})
            if a["input"] is not cur:
                raise _refuse(where, "F.linear not applied to the chain")
            w, b = a["weight"], a["bias"]
            for v in (w, b):
                if v is not None and (not isinstance(v, fx.Node) or v.op != "get_attr"):
                    raise _refuse(where, "F.linear with a weight or bias computed in forward",
                                  "pass a parameter, or use torch.nn.utils.parametrizations on an "
                                  "nn.Linear")
            if not isinstance(self._attr(w), torch.Tensor) or (
                    b is not None and not isinstance(self._attr(b), torch.Tensor)):
                raise _refuse(where, "F.linear whose weight or bias is not a tensor")
            return [("linear", where, (_join(self.path, w.target),
                                       None if b is None else _join(self.path, b.target)))]
        if fn in (operator.matmul, torch.matmul, torch.mm) and len(args) == 2 and not kwargs:
            w = args[1]
            if args[0] is cur and isinstance(w, fx.Node) and w.op == "get_attr" and \
                    isinstance(self._attr(w), torch.Tensor) and self._attr(w).dim() == 2:
                return [("linear", where, (("t", _join(self.path, w.target)), None))]
            raise _refuse(where, "a matrix product with a computed tensor",
                          "hessmlp reads h @ W with W a parameter or buffer, or a tensor computed "
                          "from them (a Linear without bias)")
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
            raise _refuse(where, f"'{op}' of a tensor with itself",
                          "only h * h (a square) is read that way")
        if op == "rsub":  # Tensor.__rsub__(self, other) = other - self
            if lhs is cur:
                return Act("affine", -1.0, self._scalar(rhs, node, op))
            return Act("affine", 1.0, -self._scalar(lhs, node, op))
        chain_left = lhs is cur
        c = self._scalar(rhs if chain_left else lhs, node, op)
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


# The structure of a model is kept on the model itself with the fingerprint it was read
# under, and read again whenever the fingerprint differs, so that it follows the model as it is
# now: submodules replaced, added or removed, hyperparameters changed (Softplus.beta, a float
# attribute a forward uses), hooks, train/eval, a copy. Compiled code reads it as a constant
# attribute; dynamo guards on what the fingerprint reads.
_CACHE_ATTR = "_hessmlp_structure"  # (hessmlp/_graph_reader.py's records)

# (torch.compiler.assume_constant_result takes a module argument from torch 2.13 on, the
# oldest torch hessmlp supports.)

# nn.Module's own bookkeeping (parameters, buffers, children and hooks are fingerprinted apart).
_MODULE_ATTRS = frozenset(nn.Module().__dict__) | {_CACHE_ATTR}
_PLAIN = (bool, int, float, str, complex, type(None), torch.dtype, torch.device)


def _frozen(v, depth: int = 0):
    """A comparable stand-in for an attribute's value: plain values themselves (NaN as a
    string, so that it equals itself), tensors by identity and version (a forward may use them
    as constants), other objects by identity and their plain attributes (a config's)."""
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and depth < 2 and len(v) <= 64:
        return (type(v), tuple(_frozen(e, depth + 1) for e in v))
    if isinstance(v, torch.Tensor):
        return (torch.Tensor, id(v), v._version, v.requires_grad)
    return (type(v), id(v), _held_plain(v))


# Plain attributes of a user's module class (Siren.w0 = 30.0) that a forward may read, per class.
def _class_attrs(cls: type) -> tuple:
    if cls.__module__.startswith("torch."):
        return ()
    attrs = tuple((k, _frozen(v)) for c in cls.__mro__ if not c.__module__.startswith("torch.")
                 and c is not object for k, v in vars(c).items()
                 if not k.startswith("__") and isinstance(v, _PLAIN))
    return attrs


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)


_PLAIN_TYPES = frozenset((bool, int, str, type(None)))


def _fingerprint(model: nn.Module) -> tuple:
    """The walk of _fingerprint_py in C (hessmlp._C._fingerprint), where it can: the same
    information, several times faster."""
    key = _C._fingerprint(model, _MODULE_ATTRS, _frozen, _class_attrs, torch.jit.ScriptModule)
    return _fingerprint_py(model) if key is None else key


def _fingerprint_matches(model: nn.Module, key: tuple) -> bool:
    """_fingerprint(model) == key, compared by the C walk as it goes (nothing built while they
    agree: the common case of a call on an unchanged model)."""
    return _C._fingerprint_matches(model, key, _MODULE_ATTRS, _frozen, _class_attrs,
                                   torch.jit.ScriptModule)


def _fingerprint_py(model: nn.Module) -> tuple:
    """What the structure read from ``model`` depends on, cheaply (no tracing): every module's
    identity, class, training flag, plain attributes and hooks, the names and identities of
    its parameters, buffers and children, and the values (by version) of the tensors that may
    be read as constants: buffers and parameters that do not require grad. (Parameters that
    require grad count by identity alone: an optimizer's step keeps the structure; replacing
    one is a new structure, as the calls' plans keep the parameters themselves.)"""
    out = []
    todo = [model]
    module_attrs, plain, frozen = _MODULE_ATTRS, _PLAIN_TYPES, _frozen
    while todo:
        m = todo.pop()
        if isinstance(m, torch.jit.ScriptModule):
            raise _scripted(model, m)
        d = m.__dict__
        attrs = tuple((k, v if type(v) in plain else frozen(v)) for k, v in d.items()
                      if k not in module_attrs)
        params = tuple((k, None if p is None else (id(p), None) if p.requires_grad
                        else (id(p), p._version)) for k, p in d["_parameters"].items())
        buffers = tuple((k, None if b is None else (id(b), b._version))
                        for k, b in d["_buffers"].items())
        pre, post = d["_forward_pre_hooks"], d["_forward_hooks"]
        hooks = (tuple(map(id, pre.values())) if pre else (),
                 tuple(map(id, post.values())) if post else ())
        children = d["_modules"]
        cls = type(m)
        out.append((id(m), cls, () if cls.__module__.startswith("torch.") else _class_attrs(cls),
                    m.training, attrs, params, buffers, hooks, tuple(children)))
        todo.extend(c for c in children.values() if c is not None)
    return tuple(out)


def _scripted(model: nn.Module, m: nn.Module) -> UnsupportedModelError:
    name = next((n for n, c in model.named_modules() if c is m), "")
    what = f"model.{name}" if name else "the model"
    return UnsupportedModelError(
        f"hessmlp: {what} is a TorchScript module (torch.jit.script or torch.jit.trace): its "
        "forward is compiled TorchScript, which hessmlp does not read. Pass the Python module it "
        "was made from (they share their parameters). Scripted functions (@torch.jit.script "
        f"def f) called from a Python forward are read. {_SEE}")


def _check_global_hooks() -> None:
    from torch.nn.modules import module as _module
    hooks = [h for d in (_module._global_forward_hooks, _module._global_forward_pre_hooks)
             for h in d.values()]
    if hooks:
        name = getattr(hooks[0], "__qualname__", type(hooks[0]).__name__)
        raise UnsupportedModelError(
            f"hessmlp: a global module forward hook ({name}, from "
            "torch.nn.modules.module.register_module_forward_hook or its pre-hook variant) is "
            "set: it may change every module's output, and hessmlp would not run it. Remove it "
            f"(.remove() on its handle) around hessmlp's calls. {_SEE}")


def _cached(model: nn.Module, attr: str, widths, consts, compute=None, keep=lambda value: True):
    """A structure kept on the model in attr with the key it was read under (the model's
    fingerprint and the input widths): the kept one while the key is the same and every
    (path, value) of consts(it), the scalars read as constants, still holds (compared by
    value: writes through .data keep the version); else compute() (None: no computing, None
    back), kept when keep(it)."""
    cache = model.__dict__.get(attr)
    if cache is not None and cache[0][1] == widths and _fingerprint_matches(model, cache[0][0]) and all(
            _same(float(_get(model, path).item()), value) for path, value in consts(cache[1])):
        return cache[1]
    if compute is None:
        return None
    key = (_fingerprint(model), widths)
    value = compute()
    if keep(value):
        model.__dict__[attr] = (key, value)
    return value


@torch.compiler.assume_constant_result
def _class_attr_names(cls: type) -> tuple:
    """The names of the plain attributes of a user's module class (a constant for dynamo)."""
    return tuple(k for k, _ in _class_attrs(cls))


def _held_plain(v) -> tuple:
    """The plain attributes of an object a module holds (a config): part of the fingerprint
    eager (_frozen) and compiled (_compiled_key)."""
    if isinstance(v, _PLAIN + (torch.Tensor, nn.Module, type, tuple, list, dict)) or callable(v) \
            or not isinstance(getattr(v, "__dict__", None), dict):
        return ()
    return tuple((k, e) for k, e in v.__dict__.items() if isinstance(e, _PLAIN))


def _compiled_key(model: nn.Module) -> tuple:
    """The part of the fingerprint that dynamo traces and guards on (check_compiled_key compares it with
    its value at trace time, so that dynamo reads all of it): a compiled function is
    compiled again when a submodule is replaced, a hyperparameter, a plain attribute of a
    module, of its class or of a config it holds, or the training flag changes, or a hook comes
    or goes. (Buffers read as constants are checked in the graph instead: network_of.)"""
    out = []
    for m in model.modules():
        attrs, held = [], []
        for k, v in m.__dict__.items():
            if k in _MODULE_ATTRS:
                continue
            if isinstance(v, _PLAIN):
                attrs.append((k, v))
            else:
                held.append((k, _held_plain(v)))
        cls = type(m)
        out.append((cls, m.training, len(m._forward_pre_hooks), len(m._forward_hooks),
                    tuple(attrs), tuple(held),
                    tuple((k, getattr(cls, k)) for k in _class_attr_names(cls))))
    return tuple(out)


_constant_key = torch.compiler.assume_constant_result(lambda model: _compiled_key(model))


def check_compiled_key(model: nn.Module) -> None:
    """Under torch.compile, before a structure is taken as a constant: comparing the traced key
    with its value at trace time makes dynamo read (and guard on) every entry; they are equal
    when traced."""
    if _compiled_key(model) != _constant_key(model):
        raise RuntimeError("hessmlp: the model changed while it was being compiled")


def check_constant(model: nn.Module, where: str, item) -> None:
    """Under torch.compile: a tensor the structure read as the constant item = (path, value) at
    where still holds it when the compiled code runs (else it stops rather than use an old one)."""
    path, value = item
    t = _get(model, path)
    torch._assert_async(t.isnan() if value != value else t == value,
                        f"hessmlp: the tensor '{path}' read as a constant at {where} changed since "
                        "this code was compiled; call torch.compiler.reset()")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside the wrappers that share its parameters: torch.compile(model)
    (an OptimizedModule), nn.DataParallel and DistributedDataParallel (their .module)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            # (a registered child: its dict, not getattr, which raises and catches inside
            # nn.Module.__getattr__ for every other module)
            mods = model.__dict__.get("_modules")
            inner = mods.get("_orig_mod") if isinstance(mods, dict) else getattr(model, "_orig_mod", None)
            if not isinstance(inner, nn.Module):
                return model
            model = inner


def _get(model: nn.Module, path: str) -> torch.Tensor:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _weight(model: nn.Module, spec) -> torch.Tensor:
    """A Linear's weight: a path, or ("weight_norm", v path, g path, dim) for the legacy weight
    norm, computed here as its hook does (differentiably w.r.t. g and v)."""
    if isinstance(spec, str):
        return _get(model, spec)
    if spec[0] == "t":  # h @ W: the weight of a Linear is W^T
        return _get(model, spec[1]).t()
    _, v, g, dim = spec
    return torch._weight_norm(_get(model, v), _get(model, g), dim)


def network_of(model: nn.Module) -> Network:
    """The chain form of ``model`` (hessmlp/_graph_reader.py's network_of)."""
    from ._graph_reader import network_of as chain_of

    return chain_of(model)
