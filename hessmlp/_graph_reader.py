"""hessmlp's one reader (docs/design.md §9): a module's forward, traced with torch.fx (or an
nn.Sequential, entry by entry), read into plain records: linear layers, stages of elementwise
functions, residual additions, concatenations, products, per-feature or scalar affine maps
(constant or learnable), slices and selections. Records are kept on the model under its
fingerprint (cached_records), and under torch.compile are a constant of the compiled code
(compiled_structure). graph_of resolves them into a Graph with the model's current tensors
(per model a _Plan keeps the built structure: planned_graph); a graph that is a chain
(hessmlp/_graph.py, chain_layout) runs through the op mlp_jet, any other through graph_jet.
"""
from __future__ import annotations

import math
import operator
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._graph import Graph, GraphBuilder, as_chain, chain_layout
from .nn import Sine
from ._spec import (MAX_STAGE_FUNCTIONS, _ARITH, _ARITH_METHODS, _FUNCS, _FUNCTION_NAMES, _CACHE_ATTR, _RESHAPES,
                    Act, Network, _FxChain, _cached, _check_global_hooks, _check_hooks, _get,
                    _join, _module_steps, _refuse, _weight, UnsupportedModelError, check_compiled_key,
                    check_constant, unwrap)

__all__ = ["graph_of", "network_of"]

# A record: (kind, where, inputs (record indices), payload). Tensor specs in payloads: a path,
# ("t", spec) (a transpose), ("weight_norm", ...) (_spec._weight), ("neg", spec), ("recip", spec),
# ("literal", tensor) (a tensor fx computed while tracing), ("expr", e) (a tensor computed from
# parameters and buffers alone). Records are plain data (no fx objects), so that compiled code
# takes them as a constant: e is ("attr", path) | ("literal", tensor) | ("call", function name
# (_FUNCTIONS), args, kwargs) | ("method", name, args, kwargs), args a tuple and kwargs a tuple of (name, value)
# pairs whose values are expressions or plain Python values.
Record = Tuple[str, str, Tuple[int, ...], object]


class _FxGraph(_FxChain):
    def records(self, input_widths: Optional[Tuple[int, ...]] = None) -> List[Record]:
        """input_widths: forward(self, x, t, ...) takes several tensors, of these widths: each is
        a slice of the one input (their concatenation) the Hessian is taken w.r.t."""
        n_inputs = 1 if input_widths is None else len(input_widths)
        inp, nodes = self._walk(n_inputs)
        self.recs: List[Record] = [("input", "", (), None)]
        if n_inputs == 1:
            self.env = {inp: 0}
        else:
            self.env, start = {}, 0
            for p, w in zip(inp, input_widths):
                self.env[p] = self._add("slice", self._where(p), (0,), (start, start + w, 1))
                start += w
        self.derived = set()  # nodes computed from parameters and buffers alone
        for node in nodes:
            if node.op == "output":
                out = node.args[0]
                if out not in self.env:
                    raise _refuse(self._where(node), f"returning {out!r}",
                                  "the forward must return one tensor computed from its input")
                # The output is the last record: bring it there when it is not.
                if self.env[out] != len(self.recs) - 1:
                    self._add("affine", self._where(node), (self.env[out],), (1.0, 0.0))
                break
            if node.op in ("call_function", "call_method") and not any(
                    self._computed(a) or a in self.meta for a in node.all_input_nodes):
                # Parameters and buffers alone (g * v / |v|, n * a): PyTorch computes it before
                # the op, as a tensor the op takes.
                self.derived.add(node)
                continue
            self.env[node] = self._read(node)
        return self.recs + [("const", w, (), item) for _, w, item in self.consts] + [
            ("literal", w, (), t) for w, t in self.literal_reads]

    # ---- helpers
    def _add(self, kind: str, where: str, inputs: Tuple[int, ...], payload=None) -> int:
        self.recs.append((kind, where, tuple(inputs), payload))
        return len(self.recs) - 1

    def _computed(self, v) -> bool:
        return isinstance(v, fx.Node) and v in self.env

    def _tensor_spec(self, v):
        """A parameter or buffer operand (get_attr): its path; a tensor computed from them:
        ("expr", its expression); else None."""
        if isinstance(v, fx.Node) and v in self.derived:
            return ("expr", self._expr(v))
        if isinstance(v, fx.Node) and v.op == "get_attr" and v.target in self.literals and \
                isinstance(self.literals[v.target], torch.Tensor) and self.literals[v.target].numel() > 1 \
                and self.literals[v.target].is_floating_point():
            # A tensor fx computed while tracing (buffers combined: ub - lb), read as a constant.
            # (graph_of traces again on every call; a cached structure will compare its value.)
            return ("literal", self.literals[v.target])
        if isinstance(v, fx.Node) and v.op == "get_attr" and v.target not in self.literals:
            t = self._attr(v)
            if isinstance(t, torch.Tensor):
                return _join(self.path, v.target)
        return None

    def _steps(self, h: int, steps, where: str) -> int:
        """Chain steps (_spec's Step: linear, act, width, dtype) applied after record h."""
        acts: List[Act] = []
        for kind, w, item in steps:
            if kind == "act":
                if item.name != "identity":
                    acts.append(item)
                continue
            if acts:
                h = self._add("stage", w, (h,), tuple(acts))
                acts = []
            if kind == "linear":
                h = self._add("linear", w, (h,), item)
            elif kind in ("width", "dtype"):
                h = self._add("check", w, (h,), (kind, item))
        if acts:
            h = self._add("stage", where, (h,), tuple(acts))
        return h

    def _expr(self, v):
        """The plain expression of a value of parameters and buffers alone (see Record)."""
        if isinstance(v, (tuple, list)):
            return type(v)(self._expr(a) for a in v)
        if isinstance(v, dict):
            return {k: self._expr(a) for k, a in v.items()}
        if not isinstance(v, fx.Node):
            return v
        if v in self.values:
            return self.values[v]
        if v.op == "get_attr":
            if v.target in self.literals:
                return ("literal", self.literals[v.target])
            return ("attr", _join(self.path, v.target))
        if v.op not in ("call_function", "call_method") or v not in self.derived:
            raise _refuse(self._where(v), "a tensor computed from parameters in a way hessmlp cannot "
                          "replay")
        kwargs = tuple((k, self._expr(a)) for k, a in v.kwargs.items())
        if v.op == "call_method":
            return ("method", v.target, self._expr(v.args), kwargs)
        return ("call", _function_name(v.target), self._expr(v.args), kwargs)

    # ---- one fx node
    def _read(self, node: fx.Node) -> int:
        where = self._where(node)
        args, kwargs = list(node.args), dict(node.kwargs)
        computed = [a for a in list(args) + list(kwargs.values()) if self._computed(a)]
        if node.op == "call_module":
            if len(args) != 1 or not self._computed(args[0]) or kwargs:
                raise _refuse(where, "a module call with extra arguments")
            mod = self.model.get_submodule(node.target)
            return self._steps(self.env[args[0]], _module_steps(mod, where, _join(self.path, node.target)),
                               where)
        fn = node.target
        name = fn if node.op == "call_method" else None
        if node.op == "call_method" and name in _ARITH_METHODS:
            return self._arith(_ARITH_METHODS[name], args, kwargs, node)
        if node.op == "call_function" and fn in _ARITH:
            return self._arith(_ARITH[fn], args, kwargs, node)
        if fn in (torch.cat, torch.concat) or name == "cat":
            seq = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim not in (1, -1) or not all(self._computed(a) for a in seq):
                raise _refuse(where, "a concatenation that is not of computed tensors along the "
                              "features (dim=1 or -1)")
            return self._add("concat", where, tuple(self.env[a] for a in seq))
        if fn is operator.getitem and self._computed(args[0]):
            return self._getitem(self.env[args[0]], args[1], where)
        if (fn is torch.narrow or name == "narrow") and self._computed(args[0]):
            a = self._bind(node, args, kwargs, ("input", "dim", "start", "length"), {})
            if a["dim"] not in (1, -1):
                raise _refuse(where, "narrow along another dimension than the features")
            return self._add("slice", where, (self.env[args[0]],), (a["start"], a["start"] + a["length"], 1))
        if fn is torch.cos or name == "cos":
            return self._add("stage", where, (self.env[args[0]],), (Act("affine", 1.0, math.pi / 2), Act("sin", 1.0)))
        if fn in (operator.matmul, torch.matmul, torch.mm) and len(args) == 2 and self._computed(args[0]):
            spec = self._tensor_spec(args[1])
            if spec is None:
                raise _refuse(where, "a matrix product of two tensors computed from the input")
            return self._add("linear", where, (self.env[args[0]],), (("t", spec), None))
        if (fn is torch.index_select or name == "index_select") and self._computed(args[0]):
            a = self._bind(node, args, kwargs, ("input", "dim", "index"), {})
            spec = self._tensor_spec(a["index"])
            if a["dim"] not in (1, -1) or spec is None or spec[0] in ("expr", "literal"):
                raise _refuse(where, "index_select other than of features by an index buffer")
            # (The indices are read once, with the structure.)
            return self._add("select", where, (self.env[args[0]],),
                             tuple(int(i) for i in self._attr(a["index"]).tolist()))
        if len(computed) != 1:
            raise _refuse(where, f"{getattr(fn, '__name__', fn)} of {len(computed)} computed tensors")
        h = self.env[computed[0]]
        if node.op == "call_method":
            fname = name[:-1] if name.endswith("_") else name
            if fname in ("tanh", "sigmoid", "relu", "sin", "square") and len(args) == 1 and not kwargs:
                return self._add("stage", where, (h,), (_FUNCS[fname][2]({}),))
            same = self._identity(node, name, args, kwargs) if name in _RESHAPES else None
            if same is not None:
                return self._steps(h, same, where) if same else h
            raise _refuse(where, f"Tensor.{name}")
        if fn in (torch.flatten, torch.reshape):
            same = self._identity(node, fn.__name__, args, kwargs)
            if same is not None:
                return self._steps(h, same, where) if same else h
        if fn is F.linear:
            a = self._bind(node, args, kwargs, ("input", "weight", "bias"), {"bias": None})
            w, b = (self._tensor_spec(a[k]) if a[k] is not None else None for k in ("weight", "bias"))
            if w is None or (a["bias"] is not None and b is None):
                raise _refuse(where, "F.linear with a weight or bias computed from the input")
            return self._add("linear", where, (h,), (w, b))
        # Chain-reader functions (activations, dropout): their steps from here.
        return self._steps(h, self._node_steps(node, computed[0], args, kwargs), where)

    def _getitem(self, h: int, index, where: str) -> int:
        if not isinstance(index, tuple) or len(index) != 2 or index[0] not in (slice(None), Ellipsis):
            raise _refuse(where, f"indexing with {index!r}", "hessmlp reads h[:, a:b] and h[:, [i, j]]")
        sel = index[1]
        if isinstance(sel, slice) and not any(isinstance(v, fx.Node) for v in (sel.start, sel.stop, sel.step)):
            return self._add("slice", where, (h,), (sel.start, sel.stop, sel.step))
        if isinstance(sel, (list, tuple)) and all(isinstance(i, int) for i in sel):
            return self._add("select", where, (h,), tuple(sel))
        raise _refuse(where, f"indexing with {index!r}",
                      "an integer index drops the feature dimension: write h[:, i:i + 1]")

    def _operand(self, v, node: fx.Node, op: str):
        """A constant operand: a float, or a tensor spec."""
        spec = self._tensor_spec(v)
        if spec is not None and spec[0] in ("expr", "literal"):
            return spec
        if spec is not None and self._attr(v).numel() > 1:
            return spec
        if spec is not None and self._attr(v).requires_grad:
            return spec  # a learnable scalar (an adaptive activation's slope)
        return self._scalar(v, node, op)

    def _arith(self, op: str, args, kwargs, node: fx.Node) -> int:
        where = self._where(node)
        if op in ("neg", "pos"):
            return self._add("affine", where, (self.env[args[0]],), (-1.0 if op == "neg" else 1.0, 0.0))
        if kwargs.get("alpha", 1) != 1 or set(kwargs) - {"alpha"} or len(args) != 2:
            raise _refuse(where, f"'{op}' with extra arguments")
        lhs, rhs = args
        if op == "rsub":
            lhs, rhs, op = rhs, lhs, "sub"
        if op == "pow":
            if not self._computed(lhs) or isinstance(rhs, fx.Node) or rhs not in (1, 2):
                raise _refuse(where, "a power other than h ** 2")
            h = self.env[lhs]
            return h if rhs == 1 else self._add("stage", where, (h,), (Act("square"),))
        if self._computed(lhs) and self._computed(rhs):
            a, b = self.env[lhs], self.env[rhs]
            if op == "add":
                return self._add("add", where, (a, b))
            if op == "sub":
                return self._add("add", where, (a, self._add("affine", where, (b,), (-1.0, 0.0))))
            if op == "mul":
                if a == b:  # h * h: the square, a stage of its own
                    return self._add("stage", where, (a,), (Act("square"),))
                return self._add("mul", where, (a, b))
            raise _refuse(where, "a division by a computed tensor")
        left = self._computed(lhs)
        h = self.env[lhs if left else rhs]
        c = self._operand(rhs if left else lhs, node, op)
        neg = ("neg", c) if not isinstance(c, float) else -c
        if op == "mul":
            return self._add("affine", where, (h,), (c, 0.0))
        if op == "add":
            return self._add("affine", where, (h,), (1.0, c))
        if op == "sub":
            return self._add("affine", where, (h,), (1.0, neg) if left else (-1.0, c))
        if op == "div":
            if not left:
                raise _refuse(where, "dividing a constant by a computed tensor")
            if isinstance(c, float):
                if c == 0.0:
                    raise _refuse(where, "dividing by zero")
                return self._add("affine", where, (h,), (1.0 / c, 0.0))
            return self._add("affine", where, (h,), (("recip", c), 0.0))
        raise _refuse(where, op)


# The functions expressions call, by name: records hold names (strings are constants to
# dynamo; a function object held in a constant is not always callable there).
_FUNCTIONS: dict = {}


def _function_name(fn) -> str:
    name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', repr(fn))}"
    key, n = name, 1
    while _FUNCTIONS.get(key, fn) is not fn:
        n += 1
        key = f"{name}#{n}"
    _FUNCTIONS[key] = fn
    return key


def _evaluate(model: nn.Module, e, top: bool = True):
    """An expression of parameters and buffers alone (see Record), computed with the current
    ones (differentiably)."""
    if isinstance(e, list):
        return [_evaluate(model, a, False) for a in e]
    if isinstance(e, dict):
        return {k: _evaluate(model, a, False) for k, a in e.items()}
    if not isinstance(e, tuple):
        return e
    if not top and not (e and isinstance(e[0], str) and e[0] in _EXPR_KINDS):
        return tuple(_evaluate(model, a, False) for a in e)  # a tuple argument (dims)
    kind = e[0]
    if kind == "attr":
        return _get(model, e[1])
    if kind == "literal":
        return e[1]
    args = [_evaluate(model, a, False) for a in e[2]]
    kwargs = {k: _evaluate(model, a, False) for k, a in e[3]}
    if kind == "method":
        return getattr(args[0], e[1])(*args[1:], **kwargs)
    return _FUNCTIONS[e[1]](*args, **kwargs)


_EXPR_KINDS = ("attr", "literal", "call", "method")


def _tensor(model: nn.Module, spec):
    if isinstance(spec, tuple) and spec[0] == "expr":
        return _evaluate(model, spec[1])
    if isinstance(spec, tuple) and spec[0] == "literal":
        return spec[1]
    if isinstance(spec, tuple) and spec[0] == "t":
        return _tensor(model, spec[1]).t()
    return _weight(model, spec)


def _resolve(model: nn.Module, spec):
    if isinstance(spec, (int, float)):
        return float(spec)
    if isinstance(spec, tuple) and spec[0] == "neg":
        return -_resolve(model, spec[1])
    if isinstance(spec, tuple) and spec[0] == "recip":
        return 1.0 / _resolve(model, spec[1])
    t = _tensor(model, spec)
    if not isinstance(t, torch.Tensor):
        return float(t)
    return t.reshape(-1) if t.dim() > 1 and t.shape[0] == 1 else t


class _Chain:
    """Records of an nn.Sequential: its entries one after the other, a user's module among
    them read as a graph of its own and spliced in."""
    _add = _FxGraph._add
    _steps = _FxGraph._steps

    def __init__(self):
        self.recs: List[Record] = [("input", "", (), None)]
        self.consts: List[Record] = []

    def sequential(self, h: int, seq: nn.Sequential, where: str, path: str) -> int:
        for name, child in seq._modules.items():
            w, p = f"{where}[{name}]", _join(path, name)
            if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
                h = self.sequential(h, child, w, p)
            elif not type(child).__module__.startswith("torch.") and not isinstance(child, Sine):
                _check_hooks(child, w)
                h = self.splice(h, _FxGraph(child, w, p).records())
            else:
                h = self._steps(h, _module_steps(child, w, p), w)
        return h

    def splice(self, h: int, recs: List[Record]) -> int:
        ids = [h]
        for kind, where, inputs, payload in recs[1:]:
            if kind in ("const", "literal"):
                self.consts.append((kind, where, inputs, payload))
                continue
            ids.append(self._add(kind, where, tuple(ids[i] for i in inputs), payload))
        return ids[-1]


def _records(model: nn.Module, input_widths=None) -> List[Record]:
    if input_widths is not None:
        _check_hooks(model, type(model).__name__)
        return _FxGraph(model, type(model).__name__).records(tuple(input_widths))
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        chain = _Chain()
        chain.sequential(0, model, "model", "")
        return chain.recs + chain.consts
    _check_hooks(model, type(model).__name__)
    return _FxGraph(model, type(model).__name__).records()


def _literal(spec) -> bool:
    """Whether a payload holds a tensor fx computed while tracing."""
    if isinstance(spec, torch.Tensor):
        return True
    if isinstance(spec, dict):
        spec = tuple(spec.values())
    return isinstance(spec, (tuple, list)) and any(_literal(s) for s in spec)


def cached_records(model: nn.Module, input_widths=None, read: bool = True) -> Optional[List[Record]]:
    """The records of ``model``, read again when its fingerprint (_spec._fingerprint) or a
    scalar read as a constant changed; never kept when fx computed a tensor while tracing
    (its source is unknown: read every call). read=False: the kept records while they are
    current, else None (cheap: no tracing)."""
    model = unwrap(model)
    if not read and _CACHE_ATTR not in model.__dict__:
        return None
    _check_global_hooks()
    widths = None if input_widths is None else tuple(input_widths)
    keep = lambda recs: not any(_literal(payload) for _, _, _, payload in recs)  # noqa: E731
    return _cached(model, _CACHE_ATTR, widths,
                   lambda recs: (item for kind, _, _, item in recs if kind == "const"),
                   (lambda: _records(model, input_widths)) if read else None, keep)


def graph_of(model: nn.Module, d: int, input_widths=None, records=None) -> Graph:
    """The graph network of ``model`` for inputs of d features, with its current tensors;
    input_widths: the widths of the forward's several tensor inputs (d their sum); records:
    cached_records' (read here when not given)."""
    model = unwrap(model)
    if records is None:
        records = cached_records(model, input_widths)
    return _build(model, d, records)[0]


def _build(model: nn.Module, d: int, records):
    """(the graph of records with the model's current tensors, and per tensor of it how it
    was read: (resolver, spec) for _value)."""
    g = GraphBuilder(d)
    ids: List[int] = []
    read = {}  # id(tensor) -> (resolver, spec)

    def tensor(spec):
        t = _tensor(model, spec)
        read.setdefault(id(t), (_tensor, spec))
        return t

    def operand(spec):
        v = _resolve(model, spec)
        if isinstance(v, torch.Tensor):
            read.setdefault(id(v), (_resolve, spec))
        return v

    for kind, where, inputs, payload in records:
        ins = [ids[i] for i in inputs]
        if kind == "input":
            ids.append(0)
        elif kind == "linear":
            W, b = tensor(payload[0]), None if payload[1] is None else tensor(payload[1])
            ids.append(g.linear(ins[0], W, b, where=where))
        elif kind == "stage":
            ids.append(g.stage(ins[0], payload, where=where))
        elif kind == "affine":
            ids.append(g.affine(ins[0], operand(payload[0]), operand(payload[1]), where=where))
        elif kind == "add":
            ids.append(g.add(*ins, where=where))
        elif kind == "concat":
            ids.append(g.concat(*ins, where=where))
        elif kind == "mul":
            ids.append(g.mul(*ins, where=where))
        elif kind == "select":
            ids.append(g.select(ins[0], payload, where=where))
        elif kind == "slice":
            n = g.nodes[ins[0]].width
            ids.append(g.select(ins[0], range(n)[slice(*payload)], where=where))
        elif kind == "check":
            what, value = payload
            n = g.nodes[ins[0]].width
            if what == "width" and value != n:
                raise UnsupportedModelError(
                    f"hessmlp: the reshape to (-1, {value}) at {where} is not the identity on this "
                    f"model's ({n} features there): hessmlp reads reshapes only where they change "
                    "nothing")
            if what == "dtype":
                g.dtypes.append((where, value))
            ids.append(ins[0])
        elif kind == "const":
            if torch.compiler.is_compiling():
                check_constant(model, where, payload)
            ids.append(-1)
        elif kind == "literal":
            ids.append(-1)
    graph = g.build()
    return graph, [read[id(t)] for t in graph.tensors]


class _Plan:
    """A graph network's structure for one model, records and input width (kept while they
    are the same): its nodes, how to read each of its tensors, their shapes, and whether it
    is a chain (its ChainLayout, or None). Each call reads the tensors again and checks their
    shapes, but for the parameters and buffers read by their path alone (fixed: the object
    itself, which the records' fingerprint holds by identity)."""
    __slots__ = ("records", "d", "nodes", "specs", "shapes", "dtypes", "chain", "fixed")

    def __init__(self, model, records, d, graph, specs):
        self.records, self.d = records, d
        self.nodes, self.specs, self.dtypes = graph.nodes, specs, graph.dtypes
        self.shapes = [t.shape for t in graph.tensors]
        self.chain = chain_layout(graph.nodes)
        self.fixed = [t if resolver is _tensor and isinstance(spec, str) and _registered(model, spec, t)
                      else None for t, (resolver, spec) in zip(graph.tensors, specs)]


def _registered(model: nn.Module, path: str, t) -> bool:
    """Whether path names a parameter or buffer registered on its module (so that the
    fingerprint holds it by identity), and t is it."""
    owner, _, name = path.rpartition(".")
    try:
        mod = _get(model, owner) if owner else model
    except AttributeError:
        return False
    if not isinstance(mod, nn.Module):
        return False
    d = mod.__dict__
    return d["_parameters"].get(name) is t or d["_buffers"].get(name) is t


# Per model (weakly): its plans, by input width and input widths.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def planned_graph(model: nn.Module, d: int, input_widths, records):
    """(graph_of(model, d, input_widths, records), its chain_layout or None), from the model's
    plan for these records when it has one (eager only): the tensors read again (but the
    fixed ones), their shapes compared with the plan's (a tensor of another shape builds the
    graph again, with its checks)."""
    plans = _PLANS.get(model)
    if plans is None:
        plans = _PLANS.setdefault(model, {})
    key = (d, input_widths)
    plan = plans.get(key)
    if plan is not None and plan.records is records:
        tensors = [resolver(model, spec) if f is None else f
                   for f, (resolver, spec) in zip(plan.fixed, plan.specs)]
        if all(t.shape == s for t, s in zip(tensors, plan.shapes)):
            return Graph(plan.nodes, tensors, plan.dtypes), plan.chain
    graph, specs = _build(model, d, records)
    plan = _Plan(model, records, d, graph, specs)
    plans[key] = plan
    return graph, plan.chain


def fixed_tensors(model: nn.Module, d: int, input_widths, records):
    """The tensors of the model's plan for these records (planned_graph's) when every one is
    a registered parameter or buffer read by its path (held by identity by the records'
    fingerprint), else None."""
    plans = _PLANS.get(model)
    plan = None if plans is None else plans.get((d, input_widths))
    if plan is None or plan.records is not records or any(f is None for f in plan.fixed):
        return None
    return list(plan.fixed)


def structure(model: nn.Module, input_widths=None):
    """The records of ``model`` (cached_records), refused when they have no linear node."""
    records = cached_records(model, input_widths)
    if not any(kind == "linear" for kind, *_ in records):
        raise UnsupportedModelError(
            f"hessmlp: the model has no nn.Linear layer ({type(model).__name__}); hessmlp computes "
            "Hessians of networks built from Linear layers and elementwise functions")
    return records


def _input_width(model: nn.Module, records) -> Optional[int]:
    """d for records whose input reaches a linear node through width-preserving nodes only (a
    chain's): that node's in_features; else None."""
    for kind, _, _, payload in records[1:]:
        if kind == "linear":
            return _tensor(model, payload[0]).shape[1]
        if kind not in ("stage", "affine", "check", "const", "literal"):
            break
    return None


def network_of(model: nn.Module) -> Network:
    """The chain form of ``model`` (Linear layers and stages of elementwise functions), with its
    current parameters; a graph network (residuals, concatenations, products) is refused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"hessmlp: model must be an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    records = structure(model)
    d = _input_width(model, records)
    net = None if d is None else as_chain(graph_of(model, d, records=records))
    if net is None:
        raise UnsupportedModelError(
            f"hessmlp: {type(model).__name__} is not a chain of Linear layers with at most "
            f"{MAX_STAGE_FUNCTIONS} elementwise functions between them (it has residuals, "
            "concatenations, products, learnable operands or longer runs of functions): hessmlp's "
            "functions compute it as a graph network; network_of describes chains only")
    return net


def _compiled(model: nn.Module, input_widths=None):
    records = structure(model, input_widths)
    for _, where, _, payload in records:
        if _literal(payload):
            raise UnsupportedModelError(
                f"hessmlp: at {where} the forward uses a tensor that is neither a parameter nor a "
                "buffer of the model (a plain tensor attribute, or one the forward makes from a "
                "buffer's entries): compiled code cannot follow its value. Register it as a "
                "buffer (self.register_buffer('name', tensor)) or as a parameter, or call hessmlp "
                "outside torch.compile")
    return records


_constant_structure = torch.compiler.assume_constant_result(_compiled)


def compiled_structure(model: nn.Module, input_widths=None):
    """The records under torch.compile: a constant of the compiled code, which dynamo guards on
    (the model's key, _spec.check_compiled_key) and checks (scalars read as constants)."""
    model = unwrap(model)
    check_compiled_key(model)
    return _constant_structure(model, input_widths)
