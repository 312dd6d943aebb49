"""Pure-PyTorch reference of the closed form that the C++ kernels compute.

Same math, written with plain torch ops on the flat network description:
forward jets (docs/design.md §2) for every mode and reverse-Gram (§3) for the full
Hessian; and forward jets over a graph (§9, hessmlp/_graph.py). The elementwise
functions' derivatives come from autograd applied to
the real torch functions, so the kernels' hand-written derivative formulas are
checked against an independent source. Slow; for tests and debugging.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._spec import Act, Network, network_of

__all__ = ["act_function", "stage_derivatives", "jet_forward", "hessian_reverse", "jet_of_model",
           "graph_jet"]


def act_function(a: Act):
    """The torch function of one elementwise function of the chain."""
    return {
        "identity": lambda z: z,
        "affine": lambda z: a.p0 * z + a.p1,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": lambda z: F.softplus(z, beta=a.p0, threshold=a.p1),
        "silu": F.silu,
        "gelu": lambda z: F.gelu(z, approximate="none"),
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, a.p0),
        "elu": lambda z: F.elu(z, a.p0),
        "sin": lambda z: torch.sin(a.p0 * z),
        "square": torch.square,
    }[a.name]


def stage_derivatives(stage: Sequence[Act], z: torch.Tensor):
    """s, s1, s2, s3 of a stage (its functions applied in order) at z, elementwise, by autograd."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        y = zz
        for a in stage:
            y = act_function(a)(y)
        out = [y]
        cur = y
        for _ in range(3):
            if not cur.requires_grad:
                out.append(torch.zeros_like(z))
                cur = out[-1]
                continue
            (g,) = torch.autograd.grad(cur.sum(), zz, create_graph=True, allow_unused=True)
            g = torch.zeros_like(z) if g is None else g
            out.append(g)
            cur = g
    return [o.detach() for o in out]


def _pairs(mode: str, d: int):
    if mode == "full":
        return [(i, j) for i in range(d) for j in range(i, d)]
    if mode == "diag":
        return [(i, i) for i in range(d)]
    return []


def _phi(mode: str, pairs, T: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The second-order term of two first-order parts T, U (B, n, d) in the mode's layout
    (B, n, P): T_a U_c + T_c U_a per pair (a, c) (full, diag), 2 <T, U> (trace)."""
    if mode == "trace":
        return 2 * (T * U).sum(-1, keepdim=True)
    if not pairs:
        return T.new_zeros(*T.shape[:2], 0)
    i, j = (list(t) for t in zip(*pairs))
    return T[:, :, i] * U[:, :, j] + T[:, :, j] * U[:, :, i]


def _unpacked(mode: str, pairs, value, jac, V):
    B, m, d = jac.shape
    if mode == "full":
        H = value.new_zeros(B, m, d, d)
        for p, (i, j) in enumerate(pairs):
            H[:, :, i, j] = V[:, :, p]
            H[:, :, j, i] = V[:, :, p]
        return value, jac, H
    if mode == "diag":
        return value, jac, V
    if mode == "trace":
        return value, jac, V[:, :, 0]
    return value, jac, None


def graph_jet(graph, x: torch.Tensor, mode: str = "full"):
    """Forward jets over a graph (docs/design.md §9): each node's value v (B, n), first-order
    part T (B, n, d) and second-order part S (B, n, P) in the mode's layout. Returns value
    (B, m), jacobian (B, m, d) and the hessian in mode's shape (None for mode 'none')."""
    from ._graph import affine_parts

    B, d = x.shape
    pairs = _pairs(mode, d)
    P = 1 if mode == "trace" else len(pairs)
    jets = []
    for node in graph.nodes:
        ins = [jets[i] for i in node.inputs]
        if node.kind == "input":
            jet = (x, torch.eye(d, dtype=x.dtype, device=x.device).expand(B, d, d), x.new_zeros(B, d, P))
        elif node.kind == "linear":
            W = graph.tensors[node.tensors[0]]
            b = None if node.tensors[1] < 0 else graph.tensors[node.tensors[1]]
            v, T, S = ins[0]
            jet = (v @ W.T + (0 if b is None else b), torch.einsum("oi,bid->bod", W, T),
                   torch.einsum("oi,bip->bop", W, S))
        elif node.kind == "stage":
            v, T, S = ins[0]
            s, s1, s2, _ = stage_derivatives(node.acts, v)
            phi = _phi(mode, pairs, T, T) / 2
            jet = (s, s1.unsqueeze(-1) * T, s2.unsqueeze(-1) * phi + s1.unsqueeze(-1) * S)
        elif node.kind == "affine":
            a, c = affine_parts(graph, node)
            v, T, S = ins[0]
            a2 = a.reshape(-1, 1) if isinstance(a, torch.Tensor) else a
            jet = (a * v + c, a2 * T, a2 * S)
        elif node.kind == "add":
            jet = tuple(sum(parts) for parts in zip(*ins))
        elif node.kind == "concat":
            jet = tuple(torch.cat(parts, dim=1) for parts in zip(*ins))
        elif node.kind == "select":
            jet = tuple(t[:, list(node.index)] for t in ins[0])
        elif node.kind == "mul":
            (vp, Tp, Sp), (vq, Tq, Sq) = ins
            jet = (vp * vq, vq.unsqueeze(-1) * Tp + vp.unsqueeze(-1) * Tq,
                   vq.unsqueeze(-1) * Sp + vp.unsqueeze(-1) * Sq + _phi(mode, pairs, Tp, Tq))
        else:  # pragma: no cover
            raise ValueError(f"unknown node kind {node.kind!r}")
        jets.append(jet)
    v, T, S = jets[-1]
    return _unpacked(mode, pairs, v, T, S)


def jet_forward(x: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                stages: List[List[Act]], mode: str = "full"):
    """Forward jets. x (B, d) -> value (B, m), jacobian (B, m, d), hessian in mode's shape."""
    B, d = x.shape
    pairs = _pairs(mode, d)
    z = x @ weights[0].T + (0 if biases[0] is None else biases[0])
    T = weights[0].expand(B, *weights[0].shape)                       # (B, n, d)
    S = x.new_zeros(B, weights[0].shape[0], max(len(pairs), 1))       # (B, n, P)
    for l in range(len(weights)):
        if l > 0:
            W, b = weights[l], biases[l]
            z = u @ W.T + (0 if b is None else b)
            T = torch.einsum("oi,bid->bod", W, U)
            S = torch.einsum("oi,bip->bop", W, V)
        s, s1, s2, _ = stage_derivatives(stages[l], z)
        if mode == "trace":
            phi = (T * T).sum(-1, keepdim=True)
        elif pairs:
            i, j = zip(*pairs)
            phi = T[:, :, list(i)] * T[:, :, list(j)]
        else:
            phi = torch.zeros_like(S)
        u = s
        U = s1.unsqueeze(-1) * T
        V = s2.unsqueeze(-1) * phi + s1.unsqueeze(-1) * S
    return _unpacked(mode, pairs, u, U, V)


def hessian_reverse(x: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                    stages: List[List[Act]]) -> torch.Tensor:
    """Reverse-Gram: H[k] = sum_l T_l^T diag(g_l^k s2_l) T_l. x (B, d) -> (B, m, d, d)."""
    B, d = x.shape
    zs, Ts, a = [], [], x
    T = None
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = a @ W.T + (0 if b is None else b)
        T = W.expand(B, *W.shape) if l == 0 else torch.einsum("oi,bid->bod", W, U)
        s, s1, s2, _ = stage_derivatives(stages[l], z)
        zs.append((s1, s2))
        Ts.append(T)
        a, U = s, s1.unsqueeze(-1) * T
    m = weights[-1].shape[0]
    g = torch.eye(m, dtype=x.dtype, device=x.device).expand(B, m, m)   # dy_k / da_L
    H = x.new_zeros(B, m, d, d)
    for l in reversed(range(len(weights))):
        s1, s2 = zs[l]
        w = g * s2.unsqueeze(1)                                         # (B, m, n)
        H = H + torch.einsum("bnd,bkn,bne->bkde", Ts[l], w, Ts[l])
        if l > 0:
            g = (g * s1.unsqueeze(1)) @ weights[l]
    return H


def jet_of_model(model, x: torch.Tensor, mode: str = "full"):
    """jet_forward on a model's flat description (batched x)."""
    net: Network = network_of(model)
    return jet_forward(x, net.weights, net.biases, net.stages, mode)
