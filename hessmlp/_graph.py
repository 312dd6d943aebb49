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

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ._spec import ACT_CODES, Act, Network

__all__ = ["KINDS", "Node", "Graph", "GraphBuilder", "evaluate", "from_network", "as_chain",
           "op_arguments", "graph_jet"]

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
    """Nodes in topological order, nodes[0] the input; the output is the last node."""
    nodes: List[Node]
    tensors: List[torch.Tensor]

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
        if weight.dim() != 2 or weight.shape[1] != n_in:
            raise ValueError(f"hessmlp: {where or 'linear'}: weight {tuple(weight.shape)} does not "
                             f"take {n_in} features")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"hessmlp: {where or 'linear'}: bias {tuple(bias.shape)} for "
                             f"{weight.shape[0]} outputs")
        return self._add(Node("linear", (h,), weight.shape[0],
                              (self._tensor(weight), self._tensor(bias)), where=where))

    def stage(self, h: int, acts: Sequence[Act], where: str = "") -> int:
        return self._add(Node("stage", (h,), self._width(h), acts=tuple(acts), where=where))

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

    def add(self, *hs: int, where: str = "") -> int:
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
        if self._width(p) != self._width(q):
            raise ValueError(f"hessmlp: {where or 'mul'}: widths {self._width(p)} and "
                             f"{self._width(q)} differ")
        return self._add(Node("mul", (p, q), self._width(p), where=where))

    def build(self) -> Graph:
        return Graph(list(self.nodes), list(self.tensors))


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


def as_chain(graph: Graph) -> Optional[Network]:
    """The Network of a graph that is a chain (each node takes the one before: linear nodes,
    each followed by at most one stage), else None."""
    weights, biases, stages, where = [], [], [], []
    for i, node in enumerate(graph.nodes[1:], start=1):
        if node.inputs != (i - 1,):
            return None
        if node.kind == "linear":
            W, b = (_tensor(graph, t) for t in node.tensors)
            weights.append(W)
            biases.append(b)
            stages.append([])
            where.append(node.where)
        elif node.kind == "stage" and weights and not stages[-1]:
            stages[-1] = list(node.acts)
        else:
            return None
    if not weights:
        return None
    return Network(weights, biases, stages, where)


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


def graph_jet(graph: Graph, x: torch.Tensor, mode: str = "full"):
    """value (B, m), jacobian (B, m, d) and the mode's second-order part of the graph at x
    (B, d) by the op graph_jet ('none': an empty (B, m, 0) tensor)."""
    from . import _ops  # noqa: F401  (the library and its fake kernels)

    return torch.ops.hessmlp.graph_jet(x, graph.tensors, *op_arguments(graph), mode)
