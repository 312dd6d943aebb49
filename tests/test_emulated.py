"""The emulated CUDA build (hessmlp._C_emulated: the kernels and launchers of csrc/cuda run on
the CPU, see csrc/emulated/cuda_emulation.h) against hessmlp's CPU kernels and torch.func, op
by op; the launchers' grid-stride loops, empty work, launch checks; and the emulation itself.

Built and run by .ci/cuda_emulated, which also runs the whole suite through these kernels
(tests/conftest.py). Skipped where the emulated build is absent (the README's test command).
"""
import itertools

import pytest
import torch
from torch import nn

import hessmlp
from hessmlp._spec import network_of

import conftest
from helpers import ACTIVATIONS, DTYPES, RTOL, assert_rel_close, func_jet, func_reference, random_mlp

NATIVE_BACKEND = True  # (conftest: this module compares the emulated kernels with the native)

AVAILABLE = conftest.load_emulated()
if not AVAILABLE:
    pytestmark = pytest.mark.skip(reason="the emulated CUDA build is absent: bash .ci/cuda_emulated")

ACT = dict(ACTIVATIONS)
MODES = ["full", "diag", "trace", "none"]
METHODS = ["forward", "reverse"]
MASKS = [list(m) for m in itertools.product([False, True], repeat=3) if any(m)]
f64 = torch.float64


def emulated():
    return torch.ops.hessmlp_emulated


def native():
    return torch.ops.hessmlp


@pytest.fixture(autouse=True)
def _real_grid_and_fresh_stats():
    if not AVAILABLE:
        yield
        return
    previous = emulated().set_grid_cap(0)
    emulated().launch_stats(True)
    yield
    emulated().set_grid_cap(previous)


def flat(model):
    """The op's network arguments of model, detached (the raw ops have no autograd here)."""
    net = network_of(model)
    return ([w.detach() for w in net.weights], [None if b is None else b.detach() for b in net.biases],
            net.stage_sizes, net.act_codes, net.act_params)


def non_contiguous(x):
    """x's values in a tensor whose rows are not contiguous."""
    wide = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype).normal_()
    wide[:, ::2] = x
    out = wide[:, ::2]
    assert not out.is_contiguous()
    return out


def part(hess, mode):
    diag = hess.diagonal(dim1=-2, dim2=-1)
    return {"full": hess, "diag": diag, "trace": diag.sum(-1)}[mode]


def check_same(got, want, dtype, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if isinstance(a, (list, tuple)):
            check_same(a, b, dtype, f"{what}[{i}]")
        else:
            assert_rel_close(a, b, dtype, f"{what}[{i}]")


def test_same_schemas_as_hessmlp():
    for op in conftest.OPS:
        mine = str(getattr(emulated(), op).default._schema)
        theirs = str(getattr(native(), op).default._schema)
        assert mine == theirs.replace("hessmlp::", "hessmlp_emulated::"), (mine, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [a for a, _ in ACTIVATIONS])
def test_forward_against_cpu_kernels_and_torch_func(act, dtype):
    for seed, (d, widths, m, bias, final_act, B) in enumerate([
            (4, [23, 17], 3, True, False, 37), (2, [9], 1, False, True, 1), (5, [1, 6], 2, True, True, 8)]):
        model = random_mlp(d, widths, m, ACT[act], bias=bias, dtype=dtype, seed=seed, final_act=final_act)
        x = non_contiguous(torch.randn(B, d, dtype=dtype))
        value, jac, hess = func_reference(model, x)
        args = flat(model)
        tag = f"{act} d={d} widths={widths} m={m} bias={bias} final_act={final_act} B={B}"
        for mode, method in itertools.product(MODES, METHODS):
            got = emulated().mlp_jet(x, *args, mode, method)
            want = native().mlp_jet(x, *args, mode, method)
            check_same(got[:3], want[:3], dtype, f"vs CPU kernels {mode} {method} {tag}")
            assert_rel_close(got[0], value, dtype, f"value {mode} {method} {tag}")
            assert_rel_close(got[1], jac, dtype, f"jacobian {mode} {method} {tag}")
            if mode != "none":
                assert_rel_close(got[2], part(hess, mode), dtype, f"{mode} {method} {tag}")
        for mode in MODES:  # the state saved for the backward
            got = emulated().mlp_jet(x, *args, mode, "forward", True)[3]
            want = native().mlp_jet(x, *args, mode, "forward", True)[3]
            assert len(got) == len(widths) + 1
            check_same(got, want, dtype, f"state {mode} {tag}")


@pytest.mark.parametrize("shape", [(3, [19, 8], 2, 11), (17, [33], 1, 5)], ids=["d3", "d17"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [a for a, _ in ACTIVATIONS])
def test_backward_against_cpu_kernels_and_torch_func(act, dtype, mode, shape):
    d, widths, m, B = shape
    model = random_mlp(d, widths, m, ACT[act], dtype=dtype, seed=5, final_act=True)
    x = non_contiguous(torch.randn(B, d, dtype=dtype))
    args = flat(model)
    g = torch.Generator().manual_seed(1)
    outs = emulated().mlp_jet(x, *args, mode, "forward", True)
    grads = [torch.randn(t.shape, generator=g, dtype=dtype) for t in outs[:3]]
    state = outs[3]

    # torch.func: gradients of sum(grads * outputs) w.r.t. x and every parameter.
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    xr = x.clone().requires_grad_()
    ref = func_jet(model, params, xr, None if mode == "none" else mode)
    ref_grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(grads, ref)), [xr, *params.values()])
    tol = {f64: 1e-9, torch.float32: 5e-4}[dtype]

    for gv, gj, gh in [(0, 1, 2), (None, None, 2), (0, None, None), (None, 1, None)]:
        gs = [None if i is None else grads[i] for i in (gv, gj, gh)]
        for mask in MASKS:
            for st in (state, []):
                got = emulated().mlp_jet_backward(*gs, x, *args, mode, st, mask)
                want = native().mlp_jet_backward(*gs, x, *args, mode, st, mask)
                tag = f"{act} {mode} grads={(gv, gj, gh)} mask={mask} saved={bool(st)}"
                check_same([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], dtype, tag)
                for i, asked in enumerate(mask):
                    if not asked:
                        assert all(t.numel() == 0 for t in ([got[0]] if i == 0 else got[i]))
        if gv is not None and gh is not None:
            got = emulated().mlp_jet_backward(*gs, x, *args, mode, state, [True, True, True])
            flat_got = [got[0]] + [t for w, b in zip(got[1], got[2]) for t in (w, b)]
            for name, a, e in zip(["x", *params], flat_got, ref_grads):
                scale = max(e.abs().max().item(), 1.0)
                err = (a - e).abs().max().item()
                assert err <= tol * scale, f"{act} {mode} vs torch.func grad {name}: {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", list(range(1, 21)))
def test_widths_and_input_sizes(d, dtype):
    """d = 1 .. 20 (reverse-Gram's kernel up to 16, batched GEMMs above), widths 1 .. 70,
    depths 1 .. 4, odd batches, with and without biases, every activation: against the CPU
    kernels and torch.func."""
    g = torch.Generator().manual_seed(d)
    pick = lambda seq: seq[torch.randint(len(seq), (1,), generator=g).item()]  # noqa: E731
    depth = 1 if d % 7 == 0 else 2 + d % 3
    widths = [pick([1, 2, 7, 33, 64, 70]) for _ in range(depth - 1)]
    m, B, bias, final_act = pick([1, 2, 3]), pick([1, 2, 9, 31]), d % 3 != 0, d % 2 == 0
    act, make = ACTIVATIONS[d % len(ACTIVATIONS)]
    model = random_mlp(d, widths, m, make, bias=bias, dtype=dtype, seed=d, final_act=final_act)
    x = torch.randn(B, d, dtype=dtype)
    args = flat(model)
    tag = f"d={d} widths={widths} m={m} B={B} bias={bias} final_act={final_act} {act}"
    for mode, method in itertools.product(MODES, METHODS):
        check_same(emulated().mlp_jet(x, *args, mode, method)[:3],
                   native().mlp_jet(x, *args, mode, method)[:3], dtype, f"{mode} {method} {tag}")
    hess = func_reference(model, x)[2]
    for method in METHODS:
        assert_rel_close(emulated().mlp_jet(x, *args, "full", method)[2], hess, dtype, f"{method} {tag}")
    # One output (hessmlp's output=k: the last Linear's row k).
    k = m - 1
    w, b = args[0], args[1]
    one = ([*w[:-1], w[-1][k:k + 1]], [*b[:-1], None if b[-1] is None else b[-1][k:k + 1]], *args[2:])
    assert_rel_close(emulated().mlp_jet(x, *one, "full", "reverse")[2][:, 0], hess[:, k], dtype,
                     f"output={k} {tag}")


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_launches_nothing(mode):
    model = random_mlp(3, [8], 2, nn.Tanh)
    args = flat(model)
    x = torch.zeros(0, 3, dtype=f64)
    for method in METHODS:
        got = emulated().mlp_jet(x, *args, mode, method, True)
        want = native().mlp_jet(x, *args, mode, method, True)
        assert [t.shape for t in got[:3]] == [t.shape for t in want[:3]]
        assert [t.shape for t in got[3]] == [t.shape for t in want[3]]
    g = [torch.zeros(0, 2, dtype=f64), None, None]
    gx, gw, gb = emulated().mlp_jet_backward(*g, x, *args, mode, [], [True, True, True])
    assert gx.shape == (0, 3) and all(t.abs().sum() == 0 for t in (*gw, *gb))
    assert emulated().stage_derivs(torch.zeros(0, dtype=f64), [2], [0.0, 0.0]).shape == (4, 0)
    assert emulated().launch_stats()[0] == 0


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_grid_stride_loops(cap):
    """With the launchers' grids capped, each thread covers several items: the same results,
    to the bit, as with a grid for every item."""
    model = random_mlp(4, [33, 20], 3, nn.SiLU, seed=2, final_act=True)
    args = flat(model)
    B = 301  # B * 33 neurons, B * 3 outputs, B * 3 * 10 Gram entries: all over cap * 256
    x = torch.randn(B, 4, dtype=f64)
    g = torch.Generator().manual_seed(0)

    def run_all():
        out = []
        for mode, method in itertools.product(MODES, METHODS):
            out += list(emulated().mlp_jet(x, *args, mode, method)[:3])
        for mode in MODES:
            r = emulated().mlp_jet(x, *args, mode, "forward", True)
            gs = [torch.randn(t.shape, generator=torch.Generator().manual_seed(3), dtype=f64) for t in r[:3]]
            gx, gw, gb = emulated().mlp_jet_backward(*gs, x, *args, mode, r[3], [True, True, True])
            out += [gx, *gw, *gb]
        out.append(emulated().stage_derivs(torch.randn(B, 33, generator=g, dtype=f64), [5, 1], [0, 0, 2.0, 0.5]))
        return out

    full = run_all()
    launches, blocks, threads, max_grid, _, items, max_items = emulated().launch_stats(True)
    assert max_items == 1  # a thread for every item: as many blocks as the work needs
    assert max_grid > cap
    emulated().set_grid_cap(cap)
    g.manual_seed(0)
    capped = run_all()
    launches2, blocks2, threads2, max_grid2, _, items2, max_items2 = emulated().launch_stats(True)
    assert launches2 == launches and max_grid2 == cap and threads2 < threads
    # Each item once, and threads that go round the loop.
    per_block = threads2 // blocks2  # (csrc/cuda/kernels.cuh's kThreads)
    assert items2 == items and max_items2 >= -(-B * 33 // (cap * per_block)) > 1
    for i, (a, b) in enumerate(zip(capped, full)):
        assert torch.equal(a, b), f"result {i} differs with a grid cap of {cap}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stage_derivs_against_cpu_kernel(dtype):
    z = torch.linspace(-6, 6, 1001, dtype=dtype)
    for name, make in ACTIVATIONS:
        net = network_of(nn.Sequential(nn.Linear(1, 1), make(), nn.Linear(1, 1)))
        codes, params = net.act_codes, net.act_params
        if not codes:
            continue
        assert_rel_close(emulated().stage_derivs(z, codes, params), native().stage_derivs(z, codes, params),
                         dtype, name)


def test_whole_suite_switch_runs_the_emulated_kernels():
    """conftest.emulated_kernels (the whole suite's rerun in .ci/cuda_emulated) sends
    hessmlp's public functions, and their backward, to the emulated kernels, and gives the
    CPU kernels back afterwards."""
    model = random_mlp(3, [16], 2, nn.Tanh, seed=4)
    x = torch.randn(40, 3, dtype=f64, requires_grad=True)
    with conftest.emulated_kernels(grid_cap=2):
        h = hessmlp.hessian(model, x, method="forward")
        assert emulated().launch_stats()[0] > 0
        h.square().sum().backward()
        assert emulated().launch_stats(True)[3] == 2
    assert_rel_close(h.detach(), emulated().mlp_jet(x.detach(), *flat(model), "full", "forward")[2], f64, "hessian")
    emulated().launch_stats(True)
    hessmlp.hessian(model, x.detach())
    assert emulated().launch_stats()[0] == 0


# ---- the emulation itself -------------------------------------------------------------------

@pytest.mark.parametrize("blocks, threads, active, n", [
    (1, 1, 1, 5), (3, 64, 16, 1000), (4, 128, 128, 100), (2, 96, 32, 7), (5, 32, 8, 0), (1, 1024, 512, 4097)])
def test_shared_memory_and_barriers(blocks, threads, active, n):
    """A kernel with shared memory, __syncthreads and threads that return before the
    barriers: each block's sum, as the CUDA execution model gives it."""
    x = torch.randn(n, dtype=f64)
    got = emulated().block_sums(x, blocks, threads, active, True).view(blocks, active)
    idx = torch.arange(n)
    want = torch.stack([x[(idx // active) % blocks == b].sum() for b in range(blocks)])
    torch.testing.assert_close(got, want.unsqueeze(1).expand(blocks, active), rtol=1e-12, atol=1e-12)
    assert emulated().launch_stats()[4] == 1


@pytest.mark.parametrize("fail_thread", [0, 5, 15])
def test_a_throwing_thread_ends_the_launch(fail_thread):
    """One thread of a block throws while the others wait at a barrier: the launch ends
    with that error (the emulation does not hang), and the next launch runs."""
    x = torch.randn(1000, dtype=f64)
    with pytest.raises(RuntimeError, match=f"thread {fail_thread} fails"):
        emulated().block_sums(x, 3, 64, 16, True, fail_thread)
    got = emulated().block_sums(x, 1, 64, 16, True)
    torch.testing.assert_close(got, x.sum().expand(16), rtol=1e-12, atol=1e-12)


def test_barrier_in_a_serial_launch_is_refused():
    with pytest.raises(RuntimeError, match="launch it with HM_LAUNCH_SHARED"):
        emulated().block_sums(torch.randn(10, dtype=f64), 1, 32, 32, False)


@pytest.mark.parametrize("blocks, threads", [(0, 32), (1, 0), (1, 1025)])
def test_invalid_launch_configurations_are_reported(blocks, threads):
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emulated().block_sums(torch.randn(10, dtype=f64), blocks, threads, 1, True)
    # The launch check clears the error, as cudaGetLastError does.
    emulated().block_sums(torch.randn(10, dtype=f64), 1, 32, 1, True)


@pytest.mark.parametrize("cap", [0, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_jet_against_cpu_kernels(dtype, cap):
    """graph_jet and its backward (products and their adjoint: csrc/cuda/graph.cu; the stage
    adjoint) on random graphs, with a full and a capped grid."""
    from graphs import random_graph
    from hessmlp._graph import op_arguments

    emulated().set_grid_cap(cap)
    for seed in range(12):
        graph, _, used = random_graph(seed, dtype)
        x = non_contiguous(torch.randn(9, graph.d, dtype=dtype))
        args = (x, graph.tensors, *op_arguments(graph))
        # Directions: the unit vectors, 2 shared ones, or 3 per sample.
        u = [None, torch.randn(2, graph.d, dtype=dtype), torch.randn(9, 3, graph.d, dtype=dtype)][seed % 3]
        needs = [True] * (1 + len(graph.tensors) + (u is not None))
        for mode in MODES + ["cross"]:
            tag = f"seed={seed} {mode} blocks={used} directions={None if u is None else tuple(u.shape)}"
            out = emulated().graph_jet(*args, mode, u)
            check_same(out, native().graph_jet(*args, mode, u), dtype, tag)
            gs = [torch.randn(t.shape, dtype=dtype) for t in out]
            for gv, gj, gh in [gs, (None, None, gs[2]), (gs[0], None, None)]:
                check_same(emulated().graph_jet_backward(gv, gj, gh, *args, mode, u, needs),
                           native().graph_jet_backward(gv, gj, gh, *args, mode, u, needs), dtype,
                           f"backward {tag}")
