"""The graph form of networks (hessmlp/_graph.py) and its forward jets in plain PyTorch
(hessmlp.reference.graph_jet, the rules of docs/design.md §9) against torch.func."""
import pytest
import torch
from torch import nn

from hessmlp import reference
from hessmlp._graph import GraphBuilder, as_chain, evaluate, from_network
from hessmlp._spec import network_of

from graphs import BLOCKS, acts_of, random_graph
from helpers import ACTIVATIONS, DTYPES, assert_rel_close, random_mlp

MODES = ["full", "diag", "trace", None]
SEEDS = range(40)
f64 = torch.float64


def func_derivatives(graph, x):
    f = lambda xi: evaluate(graph, xi.unsqueeze(0))[0]  # noqa: E731
    return (evaluate(graph, x), torch.func.vmap(torch.func.jacrev(f))(x),
            torch.func.vmap(torch.func.hessian(f))(x))


def check_all_modes(graph, x, dtype, tag):
    value, jac, hess = func_derivatives(graph, x)
    diag = hess.diagonal(dim1=-2, dim2=-1)
    for mode in MODES:
        v, j, h = reference.graph_jet(graph, x, mode or "none")
        assert_rel_close(v, value, dtype, f"value {mode} {tag}")
        assert_rel_close(j, jac, dtype, f"jacobian {mode} {tag}")
        want = {"full": hess, "diag": diag, "trace": diag.sum(-1), None: None}[mode]
        if want is None:
            assert h is None
        else:
            assert_rel_close(h, want, dtype, f"{mode} {tag}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_graphs_against_torch_func(seed, dtype):
    graph, _, used = random_graph(seed, dtype)
    x = torch.randn(3, graph.d, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    check_all_modes(graph, x, dtype, f"seed={seed} blocks={used}")


def test_random_graphs_cover_every_block_kind_and_activation():
    blocks, kinds, acts = set(), set(), set()
    for seed in SEEDS:
        graph, _, used = random_graph(seed)
        blocks.update(used)
        for node in graph.nodes:
            kinds.add(node.kind)
            acts.update(a for a in node.acts)
    assert blocks == set(BLOCKS)
    assert kinds == {"input", "linear", "stage", "affine", "add", "concat", "select", "mul"}
    assert acts >= {a for _, make in ACTIVATIONS for a in acts_of(make)}


@pytest.mark.parametrize("name, make", ACTIVATIONS)
def test_chain_as_graph(name, make):
    """A chain is the special case of a graph: the same jets, and back to the same chain."""
    model = random_mlp(3, [7, 5], 2, make, seed=1)
    net = network_of(model)
    graph = from_network(net, 3)
    x = torch.randn(4, 3, dtype=f64)
    for mode in ("full", "diag", "trace", "none"):
        got = reference.graph_jet(graph, x, mode)
        want = reference.jet_forward(x, net.weights, net.biases, net.stages, mode)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    back = as_chain(graph)
    assert back is not None
    assert all(a is b for a, b in zip(back.weights, net.weights))
    assert back.stages == [list(s) for s in net.stages]


def test_a_graph_that_is_not_a_chain_has_no_chain_form():
    g = GraphBuilder(2)
    h = g.stage(g.linear(0, torch.randn(3, 2, dtype=f64)), acts_of(nn.Tanh))
    g.add(h, g.stage(g.linear(h, torch.randn(3, 3, dtype=f64)), acts_of(nn.Tanh)))
    assert as_chain(g.build()) is None


def test_named_architectures():
    """A few of the issue's architectures, built by hand: residual PINN, IGR-style skip
    concatenation with positional encoding, Fourier features, a hard-constraint output."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=f64) / max(s[-1], 1) ** 0.5  # noqa: E731
    tanh, softplus = acts_of(nn.Tanh), acts_of(lambda: nn.Softplus(beta=10.0))
    sin = acts_of(lambda: __import__("hessmlp").Sine(1.0))

    g = GraphBuilder(3)  # residual blocks
    h = g.stage(g.linear(0, r(8, 3), r(8)), tanh)
    for _ in range(2):
        h = g.add(h, g.stage(g.linear(g.stage(g.linear(h, r(8, 8), r(8)), tanh), r(8, 8)), tanh))
    g.linear(h, r(1, 8))
    residual = g.build()

    g = GraphBuilder(3)  # positional encoding cat([x, sin(2^k x), cos(2^k x)]), skip-concat
    enc = [0]
    for k in range(2):
        enc.append(g.stage(g.affine(0, 2.0 ** k), sin))
        enc.append(g.stage(g.affine(0, 2.0 ** k, torch.pi / 2), sin))
    e = g.concat(*enc)
    h = g.stage(g.linear(e, r(6, 15), r(6)), softplus)
    h = g.stage(g.linear(g.concat(h, e), r(6, 21), r(6)), softplus)
    g.linear(h, r(1, 6))
    sdf = g.build()

    g = GraphBuilder(2)  # Fourier features cat([sin(x B), cos(x B)]) with B a buffer
    B = torch.randn(4, 2, generator=gen, dtype=f64)
    xb = g.linear(0, B)
    f = g.concat(g.stage(xb, sin), g.stage(g.affine(xb, 1.0, torch.pi / 2), sin))
    g.linear(g.stage(g.linear(f, r(8, 8), r(8)), tanh), r(1, 8))
    fourier = g.build()

    g = GraphBuilder(2)  # u = x0 (1 - x0) net(x)
    net = g.linear(g.stage(g.linear(0, r(8, 2), r(8)), tanh), r(1, 8), r(1))
    x0 = g.select(0, [0])
    g.mul(g.mul(x0, g.affine(x0, -1.0, 1.0)), net)
    hard = g.build()

    for name, graph in [("residual", residual), ("sdf", sdf), ("fourier", fourier), ("hard", hard)]:
        x = torch.randn(5, graph.d, dtype=f64)
        check_all_modes(graph, x, f64, name)


def test_builder_checks_widths():
    g = GraphBuilder(3)
    with pytest.raises(ValueError, match="x has 3 features but the first linear expects in_features=4"):
        g.linear(0, torch.zeros(2, 4))
    h = g.linear(0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one width"):
        g.add(0, h)
    with pytest.raises(ValueError, match="differ"):
        g.mul(0, h)
    with pytest.raises(ValueError, match="out of range"):
        g.select(h, [2])
    with pytest.raises(ValueError, match="per feature"):
        g.affine(h, torch.zeros(3))


# ---- the op graph_jet -------------------------------------------------------------------------

def check_op(graph, x, dtype, tag):
    """graph_jet in every mode against torch.func, and against reference.graph_jet."""
    from hessmlp._graph import graph_jet

    value, jac, hess = func_derivatives(graph, x)
    diag = hess.diagonal(dim1=-2, dim2=-1)
    for mode in MODES:
        name = mode or "none"
        v, j, h = graph_jet(graph, x, name)
        assert_rel_close(v, value, dtype, f"value {name} {tag}")
        assert_rel_close(j, jac, dtype, f"jacobian {name} {tag}")
        want = {"full": hess, "diag": diag, "trace": diag.sum(-1), None: None}[mode]
        if want is None:
            assert h.shape == (x.shape[0], graph.m, 0)
        else:
            assert_rel_close(h, want, dtype, f"{name} {tag}")
            assert_rel_close(h, reference.graph_jet(graph, x, name)[2], dtype, f"{name} vs reference {tag}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_op_on_random_graphs(seed, dtype):
    graph, _, used = random_graph(seed, dtype)
    B = [1, 2, 5, 17][seed % 4]
    x = torch.randn(B, graph.d, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    check_op(graph, x, dtype, f"seed={seed} blocks={used}")


def test_op_on_a_chain_matches_mlp_jet():
    model = random_mlp(4, [9, 6], 2, nn.SiLU, seed=3, final_act=True)
    net = network_of(model)
    graph = from_network(net, 4)
    x = torch.randn(7, 4, dtype=f64)
    from hessmlp._graph import graph_jet
    for mode in ("full", "diag", "trace", "none"):
        got = graph_jet(graph, x, mode)
        want = torch.ops.hessmlp.mlp_jet(x, net.weights, net.biases, net.stage_sizes, net.act_codes,
                                         net.act_params, mode, "forward")[:3]
        for a, b in zip(got, want):
            assert_rel_close(a, b, f64, mode)


def test_op_empty_batch_and_non_contiguous_x():
    from hessmlp._graph import graph_jet
    graph, _, _ = random_graph(7)
    v, j, h = graph_jet(graph, torch.zeros(0, graph.d, dtype=f64), "full")
    assert v.shape == (0, graph.m) and j.shape == (0, graph.m, graph.d) and h.shape == (0, graph.m, graph.d, graph.d)
    wide = torch.randn(6, 2 * graph.d, dtype=f64)
    check_op(graph, wide[:, ::2], f64, "non-contiguous x")


GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 5e-4}


def func_outputs(graph, tensors, x, mode):
    """[value, jacobian, mode's part] by torch.func, differentiable w.r.t. tensors and x."""
    from hessmlp._graph import Graph

    def f(ts, xi):
        return evaluate(Graph(graph.nodes, list(ts)), xi.unsqueeze(0))[0]

    ts = tuple(tensors)
    out = [torch.func.vmap(f, in_dims=(None, 0))(ts, x),
           torch.func.vmap(torch.func.jacrev(f, argnums=1), in_dims=(None, 0))(ts, x)]
    if mode != "none":
        hess = torch.func.vmap(torch.func.hessian(f, argnums=1), in_dims=(None, 0))(ts, x)
        diag = hess.diagonal(dim1=-2, dim2=-1)
        out.append({"full": hess, "diag": diag, "trace": diag.sum(-1)}[mode])
    return out


def check_gradients(graph, x, mode, tag, seed=0):
    """Gradients of a random linear functional of graph_jet's outputs w.r.t. x and every
    tensor, against autograd through torch.func."""
    from hessmlp._graph import Graph, graph_jet

    dtype = x.dtype
    ts = [t.detach().clone().requires_grad_() for t in graph.tensors]
    xr = x.detach().clone().requires_grad_()
    ref = func_outputs(graph, ts, xr, mode)
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in ref]
    want = torch.autograd.grad(sum((w * t).sum() for w, t in zip(ws, ref)), [xr, *ts],
                               allow_unused=True)  # (a random graph may have dead branches)
    want = [torch.zeros_like(t) if g is None else g for g, t in zip(want, [xr, *ts])]
    th = [t.detach().clone().requires_grad_() for t in graph.tensors]
    xh = x.detach().clone().requires_grad_()
    outs = graph_jet(Graph(graph.nodes, th), xh, mode)[:len(ref)]
    got = torch.autograd.grad(sum((w * t).sum() for w, t in zip(ws, outs)), [xh, *th])
    for i, (a, e) in enumerate(zip(got, want)):
        scale = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
        err = (a - e).abs().max().item() if e.numel() else 0.0
        assert err <= GRAD_RTOL[dtype] * scale, f"{tag} {mode} grad {'x' if i == 0 else f'tensors[{i - 1}]'}: " \
                                                 f"{err:.3e} > {GRAD_RTOL[dtype]:.0e} * {scale:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_gradients_on_random_graphs(seed, dtype):
    graph, _, used = random_graph(seed, dtype)
    x = torch.randn(4, graph.d, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    for mode in ("full", "diag", "trace", "none"):
        check_gradients(graph, x, mode, f"seed={seed} blocks={used}", seed)


def test_gradients_of_shared_weights_and_squares():
    """A weight used by two nodes (its gradient sums both), a product of a node with itself."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 4, generator=gen, dtype=f64) / 2
    g = GraphBuilder(4)
    h = g.stage(g.linear(0, W), acts_of(nn.Tanh))
    h2 = g.stage(g.linear(h, W), acts_of(nn.SiLU))
    sq = g.mul(h2, h2)
    g.linear(g.add(sq, h), torch.randn(2, 4, generator=gen, dtype=f64))
    graph = g.build()
    assert len(graph.tensors) == 2
    x = torch.randn(5, 4, dtype=f64)
    check_op(graph, x, f64, "shared")
    for mode in ("full", "diag", "trace", "none"):
        check_gradients(graph, x, mode, "shared")


@pytest.mark.parametrize("seed", [1, 4])
def test_gradcheck_graph_jet(seed):
    from hessmlp._graph import Graph, graph_jet
    graph, _, _ = random_graph(seed)
    ts = [t.detach().clone().requires_grad_() for t in graph.tensors]
    x = torch.randn(2, graph.d, dtype=f64, requires_grad=True)
    for mode in ("full", "trace"):
        f = lambda x, *ts: graph_jet(Graph(graph.nodes, list(ts)), x, mode)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, *ts), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_is_refused():
    from hessmlp._graph import Graph, graph_jet
    graph, _, _ = random_graph(2)
    ts = [t.detach().clone().requires_grad_() for t in graph.tensors]
    x = torch.randn(2, graph.d, dtype=f64, requires_grad=True)
    h = graph_jet(Graph(graph.nodes, ts), x, "trace")[2]
    (gx,) = torch.autograd.grad(h.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("change, match", [
    (lambda k, p, c: (["linear"] + k[1:], p, c), "first node must be the input"),
    (lambda k, p, c: (k, p + [1], c), "program entries after the last node"),
    (lambda k, p, c: (k, p[:-2], c), "program ends inside node"),
    (lambda k, p, c: (k[:1] + ["conv"] + k[2:], p, c), "not a node kind"),
    (lambda k, p, c: (k, p, c + [1.0]), "consts after the last node"),
])
def test_op_refuses_bad_programs(change, match):
    from hessmlp._graph import op_arguments
    g = GraphBuilder(2)
    h = g.stage(g.linear(0, torch.randn(3, 2, dtype=f64)), acts_of(nn.Tanh))
    g.mul(h, g.affine(h, 2.0))
    graph = g.build()
    kinds, program, consts = change(*op_arguments(graph))
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.hessmlp.graph_jet(torch.randn(2, 2, dtype=f64), graph.tensors, kinds, program, consts, "full")


def test_op_refuses_wrong_shapes():
    from hessmlp._graph import op_arguments
    g = GraphBuilder(2)
    g.linear(0, torch.randn(3, 2, dtype=f64))
    graph = g.build()
    kinds, program, consts = op_arguments(graph)
    with pytest.raises(ValueError, match=r"weight \[3, 2\] should be \[3, 5\]"):
        torch.ops.hessmlp.graph_jet(torch.randn(2, 5, dtype=f64), graph.tensors, kinds,
                                    [5, 0, 0, 0] + program[4:], consts, "full")
    with pytest.raises(TypeError, match="is Float but x is Double"):
        torch.ops.hessmlp.graph_jet(torch.randn(2, 2, dtype=f64), [graph.tensors[0].float()], kinds,
                                    program, consts, "full")


@pytest.mark.parametrize("directions", ["units", "shared", "per_sample"])
@pytest.mark.parametrize("mode", ["full", "diag", "trace", "cross", "none"])
def test_opcheck_graph_jet(mode, directions):
    """Every opcheck utility on graph_jet and its backward: schema, fake kernel against the
    real one, autograd registration, aot dispatch; with and without a seed."""
    from hessmlp._graph import op_arguments
    graph, _, _ = random_graph(11)
    x = torch.randn(3, graph.d, dtype=f64)
    ts = [t.detach().clone().requires_grad_() for t in graph.tensors]
    u = {"units": None, "shared": torch.randn(2, graph.d, dtype=f64),
         "per_sample": torch.randn(3, 2, graph.d, dtype=f64)}[directions]
    u = None if u is None else u.requires_grad_()
    args = (x.requires_grad_(), ts, *op_arguments(graph), mode, u)
    torch.library.opcheck(torch.ops.hessmlp.graph_jet.default, args)
    value, jac, hess = torch.ops.hessmlp.graph_jet(*[a.detach() if torch.is_tensor(a) else a for a in args])
    torch.library.opcheck(torch.ops.hessmlp.graph_jet_backward.default,
                          (torch.randn_like(value), None, torch.randn_like(hess), x.detach(),
                           [t.detach() for t in ts], *op_arguments(graph), mode,
                           None if u is None else u.detach(),
                           [True] * (1 + len(ts) + (u is not None))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_blocks_of_samples(seed, dtype):
    """Batches of several blocks of samples (the CPU goes block by block through all the
    nodes, blocks in parallel, the last one partial): graph_jet's results as the plain-PyTorch
    reference's (itself checked against torch.func above) and its gradients w.r.t. x and every
    tensor as torch.func's, on the whole batch."""
    from hessmlp import _cost
    from hessmlp._graph import graph_jet

    graph, _, used = random_graph(seed, dtype)
    d = graph.d
    n_max = max(node.width for node in graph.nodes)
    gen = torch.Generator().manual_seed(seed)
    for mode in ("full", "trace"):
        C = 1 + d + _cost.pairs(mode, d)
        rows = max(8, _cost.CPU_BLOCK_BYTES // (C * n_max * (torch.finfo(dtype).bits // 8)))
        B = 2 * rows + 5  # (three blocks, the last of 5 samples, on the CPU)
        x = torch.randn(B, d, dtype=dtype, generator=gen)
        want = [t for t in reference.graph_jet(graph, x, mode) if t is not None]
        got = graph_jet(graph, x, mode)
        for a, b, name in zip(got, want, ("value", "jacobian", mode)):
            assert_rel_close(a, b, dtype, f"seed={seed} {name} B={B} blocks={used}")
        check_gradients(graph, x, mode, f"seed={seed} B={B} blocks={used}", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(12))
def test_directions_on_random_graphs(seed, dtype):
    """graph_jet along seeded directions U (shared or per sample), every mode and 'cross'
    (the pairs with the last direction): U J^T and U H U^T's entries, against torch.func; its
    gradients w.r.t. x, every tensor and U."""
    from hessmlp._graph import graph_jet

    graph, _, used = random_graph(seed, dtype)
    gen = torch.Generator().manual_seed(seed)
    B, d = 5, graph.d
    x = torch.randn(B, d, dtype=dtype, generator=gen)
    k = 1 + seed % 3
    U = torch.randn(*((B,) if seed % 2 else ()), k, d, dtype=dtype, generator=gen)
    J, H = func_derivatives(graph, x)[1:]
    Ub = U if U.dim() == 3 else U.expand(B, k, d)
    UJ = torch.einsum("bmd,bkd->bmk", J, Ub)
    UHU = torch.einsum("bki,bmij,blj->bmkl", Ub, H, Ub)
    want = {"full": UHU, "diag": UHU.diagonal(dim1=-2, dim2=-1),
            "trace": UHU.diagonal(dim1=-2, dim2=-1).sum(-1), "cross": UHU[..., -1]}
    tag = f"seed={seed} blocks={used} U={tuple(U.shape)}"
    for mode, w in want.items():
        _, j, h = graph_jet(graph, x, mode, U)
        assert_rel_close(j, UJ, dtype, f"jacobian {mode} {tag}")
        assert_rel_close(h, w, dtype, f"{mode} {tag}")
    # Gradients, U included (a random linear functional of the cross outputs).
    from hessmlp._graph import Graph

    ts = [t.detach().clone().requires_grad_() for t in graph.tensors]
    xr, Ur = x.clone().requires_grad_(), U.clone().requires_grad_()

    def f(tt, xi):
        return evaluate(Graph(graph.nodes, list(tt)), xi.unsqueeze(0))[0]

    Jr = torch.func.vmap(torch.func.jacrev(f, argnums=1), in_dims=(None, 0))(tuple(ts), xr)
    Hr = torch.func.vmap(torch.func.hessian(f, argnums=1), in_dims=(None, 0))(tuple(ts), xr)
    Ubr = Ur if Ur.dim() == 3 else Ur.expand(B, k, d)
    ref = [torch.einsum("bmd,bkd->bmk", Jr, Ubr), torch.einsum("bki,bmij,bj->bmk", Ubr, Hr, Ubr[:, -1])]
    ws = [torch.randn(t.shape, dtype=dtype, generator=gen) for t in ref]
    g_want = torch.autograd.grad(sum((a * b).sum() for a, b in zip(ws, ref)), [xr, Ur, *ts],
                                 allow_unused=True)
    th = [t.detach().clone().requires_grad_() for t in graph.tensors]
    xh, Uh = x.clone().requires_grad_(), U.clone().requires_grad_()
    out = graph_jet(Graph(graph.nodes, th), xh, "cross", Uh)[1:]
    g_got = torch.autograd.grad(sum((a * b).sum() for a, b in zip(ws, out)), [xh, Uh, *th])
    rtol = 1e-9 if dtype == torch.float64 else 5e-4
    for i, (a, e) in enumerate(zip(g_got, g_want)):
        e = torch.zeros_like(a) if e is None else e
        scale = max(e.abs().max().item(), 1.0)
        assert (a - e).abs().max().item() <= rtol * scale, f"{tag} grad {i}"
