"""The graph form of a network (docs/design.md §9): a DAG of nodes over the input x.

A chain Linear -> stage -> Linear -> ... is the special case of a graph whose nodes
each take the one before. Node kinds, each node a feature vector per sample:

  input    x itself (node 0, width d)
  linear   W h + b                       tensors (W, b or -1)
  stage    elementwise functions of h    acts (composed in order, as a chain's stage)
  affine   a * h + c, a and c each a scalar or a per-feature vector, constant or learnable:
           tensors (a or -1, c or -1), consts (a, c) where the tensor is -1
  add      the sum of its inputs (same widths)
  concat   its inputs' features side by side
  select   features index[j] of its input (slicing, index_select, repeats)
  mul      the elementwise product of its two inputs (same widths)

The structure (Node) is plain data; the tensors it refers to are in Graph.tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._spec import ACT_CODES, MAX_STAGE_FUNCTIONS, Act, Network

__all__ = ["KINDS", "Node", "Graph", "GraphBuilder", "evaluate", "from_network", "as_chain",
           "op_arguments", "graph_jet", "ChainLayout", "chain_layout", "chain_network"]

KINDS = ("input", "linear", "stage", "affine", "add", "concat", "select", "mul")


@dataclass(frozen=True)
class Node:
    kind: str
    inputs: Tuple[int, ...]
    width: int
    tensors: Tuple[int, ...] = ()      # indices into Graph.tensors; -1: none
    acts: Tuple[Act, ...] = ()         # stage
    consts: Tuple[float, ...] = ()     # affine: (a, c) where its tensor is -1
    index: Tuple[int, ...] = ()        # select
    where: str = ""                    # the user's module or line, for messages


@dataclass
class Graph:
    """Nodes in topological order, nodes[0] the input; the output is the last node. dtypes:
    (where, dtype) of conversions in the forward (h.float()), which hold only when x has that
    dtype (the public functions check them)."""
    nodes: List[Node]
    tensors: List[torch.Tensor]
    dtypes: List[Tuple[str, torch.dtype]] = field(default_factory=list)

    @property
    def d(self) -> int:
        return self.nodes[0].width

    @property
    def m(self) -> int:
        return self.nodes[-1].width

    def consumers(self) -> List[List[int]]:
        out: List[List[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                out[j].append(i)
        return out


class GraphBuilder:
    """Builds a Graph node by node, checking widths as it goes. Each method returns the
    new node's index."""

    def __init__(self, d: int):
        if d < 0:
            raise ValueError(f"hessmlp: the input width must be >= 0, got {d}")
        self.nodes: List[Node] = [Node("input", (), d)]
        self.tensors: List[torch.Tensor] = []
        self.dtypes: List[Tuple[str, torch.dtype]] = []

    def _tensor(self, t: Optional[torch.Tensor]) -> int:
        if t is None:
            return -1
        for i, u in enumerate(self.tensors):
            if u is t:
                return i
        self.tensors.append(t)
        return len(self.tensors) - 1

    def _width(self, h: int) -> int:
        if not 0 <= h < len(self.nodes):
            raise ValueError(f"hessmlp: node {h} does not exist yet")
        return self.nodes[h].width

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def linear(self, h: int, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               where: str = "") -> int:
        n_in = self._width(h)
        if weight.dim() != 2:
            raise ValueError(f"hessmlp: {where or 'linear'}: weight of shape {tuple(weight.shape)} is "
                             "not a matrix")
        if weight.shape[1] != n_in:
            if h == 0:
                raise ValueError(f"hessmlp: x has {n_in} features but {where or 'the first linear'} "
                                 f"expects in_features={weight.shape[1]}")
            src = h  # (the node that sets the input's width: back through stages and affine maps)
            while self.nodes[src].kind in ("stage", "affine") and self.nodes[src].inputs:
                src = self.nodes[src].inputs[0]
            what = "x" if src == 0 else (self.nodes[src].where or f"node {src} ({self.nodes[src].kind})")
            raise ValueError(f"hessmlp: {where or 'linear'} expects in_features={weight.shape[1]} but "
                             f"{what} produces {n_in} features")
        if weight.shape[0] == 0:
            raise ValueError(f"hessmlp: {where or 'linear'} has out_features=0; every Linear layer "
                             "needs at least one output feature")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"hessmlp: {where or 'linear'}: bias {tuple(bias.shape)} for "
                             f"{weight.shape[0]} outputs")
        return self._add(Node("linear", (h,), weight.shape[0],
                              (self._tensor(weight), self._tensor(bias)), where=where))

    def stage(self, h: int, acts: Sequence[Act], where: str = "") -> int:
        """The functions composed in order: one node per MAX_STAGE_FUNCTIONS of them."""
        acts = tuple(acts)
        n = self._width(h)
        for k in range(0, max(len(acts), 1), MAX_STAGE_FUNCTIONS):
            h = self._add(Node("stage", (h,), n, acts=acts[k:k + MAX_STAGE_FUNCTIONS], where=where))
        return h

    def affine(self, h: int, scale=1.0, shift=0.0, where: str = "") -> int:
        """scale * h + shift; scale and shift each a float or a tensor of 1 or width entries."""
        n = self._width(h)
        refs, consts = [], []
        for name, v in (("scale", scale), ("shift", shift)):
            if isinstance(v, torch.Tensor):
                if v.numel() not in (1, n) or v.dim() > 1:
                    raise ValueError(f"hessmlp: {where or 'affine'}: {name} {tuple(v.shape)} is "
                                     f"neither a scalar nor one entry per feature ({n})")
                refs.append(self._tensor(v))
                consts.append(0.0)
            else:
                refs.append(-1)
                consts.append(float(v))
        return self._add(Node("affine", (h,), n, tuple(refs), consts=tuple(consts), where=where))

    def _broadcast(self, hs: Sequence[int], where: str) -> Tuple[int, ...]:
        """Inputs of one width: a width-1 input among wider ones repeated (as PyTorch broadcasts
        (B, 1) against (B, n))."""
        n = max(self._width(h) for h in hs)
        return tuple(self.select(h, (0,) * n, where=where) if self._width(h) == 1 and n > 1 else h
                     for h in hs)

    def add(self, *hs: int, where: str = "") -> int:
        hs = self._broadcast(hs, where) if hs else hs
        widths = {self._width(h) for h in hs}
        if len(hs) < 2 or len(widths) != 1:
            raise ValueError(f"hessmlp: {where or 'add'}: needs two or more inputs of one width, "
                             f"got widths {[self._width(h) for h in hs]}")
        return self._add(Node("add", tuple(hs), widths.pop(), where=where))

    def concat(self, *hs: int, where: str = "") -> int:
        if not hs:
            raise ValueError("hessmlp: concat needs inputs")
        return self._add(Node("concat", tuple(hs), sum(self._width(h) for h in hs), where=where))

    def select(self, h: int, index: Sequence[int], where: str = "") -> int:
        n = self._width(h)
        index = tuple(int(i) for i in index)
        if not index or any(not 0 <= i < n for i in index):
            raise ValueError(f"hessmlp: {where or 'select'}: index {index} out of range for {n} "
                             "features")
        return self._add(Node("select", (h,), len(index), index=index, where=where))

    def mul(self, p: int, q: int, where: str = "") -> int:
        p, q = self._broadcast((p, q), where)
        if self._width(p) != self._width(q):
            raise ValueError(f"hessmlp: {where or 'mul'}: widths {self._width(p)} and "
                             f"{self._width(q)} differ")
        return self._add(Node("mul", (p, q), self._width(p), where=where))

    def build(self) -> Graph:
        return Graph(list(self.nodes), list(self.tensors), list(self.dtypes))


def _tensor(graph: Graph, i: int) -> Optional[torch.Tensor]:
    return None if i < 0 else graph.tensors[i]


def affine_parts(graph: Graph, node: Node):
    """(scale, shift) of an affine node: each a float or a tensor."""
    a, c = (_tensor(graph, i) for i in node.tensors)
    return (node.consts[0] if a is None else a), (node.consts[1] if c is None else c)


def evaluate(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """The graph's value at x (B, d), with plain torch ops (differentiable)."""
    from .reference import act_function

    vals: List[torch.Tensor] = []
    for node in graph.nodes:
        ins = [vals[i] for i in node.inputs]
        if node.kind == "input":
            v = x
        elif node.kind == "linear":
            W, b = (_tensor(graph, i) for i in node.tensors)
            v = ins[0] @ W.T + (0 if b is None else b)
        elif node.kind == "stage":
            v = ins[0]
            for a in node.acts:
                v = act_function(a)(v)
        elif node.kind == "affine":
            a, c = affine_parts(graph, node)
            v = a * ins[0] + c
        elif node.kind == "add":
            v = ins[0]
            for u in ins[1:]:
                v = v + u
        elif node.kind == "concat":
            v = torch.cat(ins, dim=-1)
        elif node.kind == "select":
            v = ins[0][..., list(node.index)]
        elif node.kind == "mul":
            v = ins[0] * ins[1]
        else:  # pragma: no cover
            raise ValueError(f"unknown node kind {node.kind!r}")
        vals.append(v)
    return vals[-1]


def from_network(net: Network, d: int) -> Graph:
    """The chain of a Network as a graph: linear, stage, linear, stage, ..."""
    g = GraphBuilder(d)
    h = 0
    for W, b, acts, where in zip(net.weights, net.biases, net.stages, net.where):
        h = g.linear(h, W, b, where=where)
        if acts:
            h = g.stage(h, acts, where=where)
    return g.build()


class ChainLayout(NamedTuple):
    """A chain's form of a graph's nodes (chain_layout): per Linear layer the indices of its
    weight and bias (-1: none) in Graph.tensors, its stage and its node's where; the scalar
    affine map a x + c before the first layer."""
    weights: Tuple[int, ...]
    biases: Tuple[int, ...]
    stages: Tuple[Tuple[Act, ...], ...]
    where: Tuple[str, ...]
    pre: Tuple[float, float]


def chain_layout(nodes: Sequence[Node]) -> Optional[ChainLayout]:
    """The chain form of a graph's nodes, else None: each node takes the one before; linear
    nodes, between them stages and affine maps by constant scalars (merged into one stage of
    at most MAX_STAGE_FUNCTIONS functions); before the first linear node only affine maps by
    constant scalars."""
    weights: List[int] = []
    biases: List[int] = []
    stages: List[List[Act]] = []
    where: List[str] = []
    pre_a, pre_c = 1.0, 0.0
    for i, node in enumerate(nodes[1:], start=1):
        if node.inputs != (i - 1,):
            return None
        if node.kind == "linear":
            weights.append(node.tensors[0])
            biases.append(node.tensors[1])
            stages.append([])
            where.append(node.where)
            continue
        if node.kind == "affine" and node.tensors == (-1, -1):
            acts = [Act("affine", *node.consts)]
        elif node.kind == "stage":
            acts = [a for a in node.acts if a.name != "identity"]
        else:
            return None
        if weights:
            stages[-1] += acts
            continue
        for a in acts:
            if a.name != "affine":
                return None  # (a function of x before the first Linear)
            pre_a, pre_c = a.p0 * pre_a, a.p0 * pre_c + a.p1
    if not weights:
        return None
    for k, acts in enumerate(stages):
        # Runs of affine maps merged, then no-op ones ("h * 1") dropped: an empty stage is the
        # identity in the kernels.
        merged: List[Act] = []
        for a in acts:
            if a.name == "affine" and merged and merged[-1].name == "affine":
                b = merged.pop()
                a = Act("affine", a.p0 * b.p0, a.p0 * b.p1 + a.p1)
            merged.append(a)
        stages[k] = [a for a in merged if not (a.name == "affine" and a.p0 == 1.0 and a.p1 == 0.0)]
        if len(stages[k]) > MAX_STAGE_FUNCTIONS:
            return None  # (the graph op composes longer runs)
    return ChainLayout(tuple(weights), tuple(biases), tuple(tuple(s) for s in stages), tuple(where),
                       (pre_a, pre_c))


def chain_network(layout: ChainLayout, tensors: Sequence[torch.Tensor]) -> Network:
    """The Network of a chain layout with these tensors: an affine map before the first layer
    folded into it, W (a x + c) + b = (a W) x + (b + c W 1)."""
    weights = [tensors[i] for i in layout.weights]
    biases = [None if i < 0 else tensors[i] for i in layout.biases]
    a, c = layout.pre
    if (a, c) != (1.0, 0.0):
        W0, b0 = weights[0], biases[0]
        shift = c * W0.sum(dim=1)
        weights[0] = a * W0
        biases[0] = shift if b0 is None else b0 + shift
    return Network(weights, biases, [list(s) for s in layout.stages], list(layout.where))


def as_chain(graph: Graph) -> Optional[Network]:
    """The Network of a graph that is a chain (chain_layout), else None."""
    layout = chain_layout(graph.nodes)
    return None if layout is None else chain_network(layout, graph.tensors)


def op_arguments(graph: Graph):
    """The graph as the op graph_jet takes it (csrc/graph.h): kinds, program, consts."""
    kinds: List[str] = []
    program: List[int] = []
    consts: List[float] = []
    for node in graph.nodes:
        extra: Tuple[int, ...] = ()
        if node.kind == "stage":
            extra = tuple(ACT_CODES[a.name] for a in node.acts)
            consts += [float(p) for a in node.acts for p in (a.p0, a.p1)]
        elif node.kind == "affine":
            consts += [float(c) for c in node.consts]
        elif node.kind == "select":
            extra = node.index
        kinds.append(node.kind)
        program += [node.width, len(node.inputs), *node.inputs, len(node.tensors), *node.tensors,
                    len(extra), *extra]
    return kinds, program, consts


def graph_jet(graph: Graph, x: torch.Tensor, mode: str = "full", seed: Optional[torch.Tensor] = None):
    """value (B, m), jacobian (B, m, k) and the mode's second-order part of the graph at x
    (B, d) by the op graph_jet ('none': an empty (B, m, 0) tensor), along the k directions of
    seed ((k, d) or (B, k, d); None: the d unit vectors)."""
    from . import _ops  # noqa: F401  (the library and its fake kernels)

    return torch.ops.hessmlp.graph_jet(x, graph.tensors, *op_arguments(graph), mode, seed)
