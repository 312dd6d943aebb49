"""Random graph networks for tests (hessmlp/_graph.py): seeded DAGs with every node kind and
activation, fan-out and fan-in: widths 1 to 16, 2 to 6 blocks, d 1 to 5, m 1 to 3."""
import random

import torch
from torch import nn

from hessmlp._graph import GraphBuilder
from hessmlp._spec import network_of

from helpers import ACTIVATIONS

BLOCKS = ("dense", "residual", "gated", "concat", "affine", "select", "product")


def acts_of(make):
    """The Acts hessmlp reads for an activation module."""
    return network_of(nn.Sequential(nn.Linear(1, 1), make())).stages[0]


def random_graph(seed, dtype=torch.float64, requires_grad=False):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    d, m, depth = rng.randint(1, 5), rng.randint(1, 3), rng.randint(2, 6)
    g = GraphBuilder(d)
    params = []

    def tensor(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
        t.requires_grad_(requires_grad)
        params.append(t)
        return t

    def act():
        name, make = ACTIVATIONS[rng.randrange(len(ACTIVATIONS))]
        return name, acts_of(make)

    def dense(h, width, name_acts=None):
        n_in = g.nodes[h].width
        W = tensor(width, n_in, scale=1.2 / n_in ** 0.5)
        b = tensor(width, scale=0.5) if rng.random() < 0.8 else None
        h = g.linear(h, W, b)
        _, acts = name_acts or act()
        return g.stage(h, acts)

    live = [0]
    used = []
    for _ in range(depth):
        kind = BLOCKS[rng.randrange(len(BLOCKS))]
        h = rng.choice(live)
        n = g.nodes[h].width
        if kind == "dense":
            out = dense(h, rng.randint(1, 16))
        elif kind == "residual":  # h + f(h), or alpha h + (1 - alpha) f(h)
            f = dense(h, n)
            if rng.random() < 0.5:
                out = g.add(h, f)
            else:
                alpha = rng.random()
                out = g.add(g.affine(h, alpha), g.affine(f, 1 - alpha))
        elif kind == "gated":  # (1 - z) * U + z * V
            w = rng.randint(1, 16)
            z = dense(h, w)
            u, v = dense(rng.choice(live), w), dense(rng.choice(live), w)
            out = g.add(g.mul(g.affine(z, -1.0, 1.0), u), g.mul(z, v))
        elif kind == "concat":
            out = g.concat(h, rng.choice(live))
        elif kind == "affine":  # per-feature or scalar, constant or "learnable" (a tensor)
            scale = tensor(n, scale=0.5, shift=1.0) if rng.random() < 0.5 else (
                tensor(1, scale=0.3, shift=1.0) if rng.random() < 0.5 else rng.uniform(-2, 2))
            shift = tensor(n, scale=0.5) if rng.random() < 0.5 else rng.uniform(-1, 1)
            out = g.affine(h, scale, shift)
        elif kind == "select":  # slices, index_select, repeats
            out = g.select(h, [rng.randrange(n) for _ in range(rng.randint(1, max(1, n + 1)))])
        else:  # product of two computed tensors, e.g. x0 * (1 - x0) * net(x)
            u = dense(rng.choice(live), n)
            out = g.mul(h, u)
        used.append(kind)
        live.append(out)
    top = g.concat(live[-1], rng.choice(live[:-1])) if rng.random() < 0.5 else live[-1]
    n_top = g.nodes[top].width
    out = g.linear(top, tensor(m, n_top, scale=1.2 / n_top ** 0.5), tensor(m, scale=0.5))
    if rng.random() < 0.3:
        out = g.stage(out, act()[1])
    return g.build(), params, used
