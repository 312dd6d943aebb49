"""The CPU benchmark suite: hessmlp against what users run today, and against its own GEMM floor.

    python benchmarks/suite.py            # everything (a few minutes on 2 cores)
    python benchmarks/suite.py --quick    # smaller sizes and shorter timings
    python benchmarks/suite.py --targets-only   # the targets table alone, printed

Every case first asserts that hessmlp agrees with torch.func (float64 at 1e-9 and the
timed float32 at 1e-4, relative to the largest entry), then times medians with
torch.utils.benchmark (blocked_autorange) in this one process; a call, its baseline and its
GEMM floor are timed in interleaved rounds, so that drifts of the machine's speed (large on
shared cloud CPUs) fall on all three alike. Ratios are baseline
time / hessmlp time (above 1: hessmlp faster); in the targets table each ratio is the median
over the rounds of the ratio within one round. The GEMM floor of a call is the time of
the same torch.mm / torch.bmm calls on the same shapes as its products with the weight
matrices (docs/design.md §5), timed here too. Writes benchmarks/results/cpu.md and PNG plots
(with matplotlib; pip install .[bench]) with the machine, torch version and threads.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import subprocess
import sys
import textwrap

import torch
from torch.utils import benchmark

import hessmlp
from hessmlp import _cost, bench

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
F32, F64 = torch.float32, torch.float64


# ---------------------------------------------------------------- helpers

def median_s(fn, run_time):
    fn()
    # Timer runs on one thread unless told otherwise: time with the threads torch uses.
    return benchmark.Timer(stmt="fn()", globals={"fn": fn},
                           num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=run_time).median


def _median(v):
    return sorted(v)[len(v) // 2]


interleaved_rounds = bench.interleaved_rounds


def interleaved(fns, run_time, rounds=5):
    """Median times of fns measured side by side (interleaved_rounds): each function's time is
    the median of its rounds."""
    return [_median(v) for v in interleaved_rounds(fns, run_time, rounds)]


def side_by_side(ours, baseline, floor, run_time, rounds=9):
    """hessmlp's call, its baseline and its GEMM floor in interleaved rounds. Returns the
    median times and the ratios baseline / ours and ours / floor as medians over the rounds
    of the ratios within a round (the three timed back to back: a drift of the machine's
    speed between rounds cancels)."""
    t_o, t_b, t_f = interleaved_rounds([ours, baseline, floor], run_time, rounds)
    return (_median(t_o), _median(t_b), _median(t_f),
            _median([b / o for o, b in zip(t_o, t_b)]), _median([o / f for o, f in zip(t_o, t_f)]))


def rel_err(a, b):
    scale = max(b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def make(d, widths, m, act="tanh", dtype=F32, seed=0):
    torch.manual_seed(seed)
    model = hessmlp.MLP(d, widths, m, activation=act).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def func_hessian(model, x, output=None):
    f = (lambda v: model(v)) if output is None else (lambda v: model(v)[..., output])
    return torch.func.vmap(torch.func.hessian(f))(x)


def check(what, ours, ref, tol):
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: hessmlp disagrees with torch.func (relative error {err:.2e})"
    return err


def agree(model64, model32, x, mode, output=None):
    """float64 against torch.func on a slice, float32 at the timed size on a slice."""
    H64 = func_hessian(model64, x[:64].double(), output)
    H32 = func_hessian(model32, x[:64], output)
    for model, xx, H, tol in ((model64, x[:64].double(), H64, 1e-9), (model32, x[:64], H32, 1e-4)):
        got = hessmlp.jet(model, xx, hessian=mode, output=output)
        ref = {"full": H, "diag": H.diagonal(dim1=-2, dim2=-1),
               "trace": H.diagonal(dim1=-2, dim2=-1).sum(-1)}[mode]
        check(f"{mode} {xx.dtype}", got.hessian, ref, tol)


def gemm_floor_fn(B, d, widths, mode, method, dtype, train=False):
    """The products with the weight matrices that hessmlp's call performs, as one function
    (for the suite's models, whose last Linear has no activation after it)."""
    P = {"full": d * (d + 1) // 2, "diag": d, "trace": 1, "none": 0}[mode]
    m = widths[-1]
    C = 1 + d + (P if method == "forward" else 0)
    shapes = [(B, d, widths[0])] + [(B * C, widths[l - 1], widths[l]) for l in range(1, len(widths))]
    bmats = []
    if method == "reverse":
        # A linear last stage: the output layer takes the value column alone, and the
        # Jacobian comes from the backward pass (csrc/jet_driver.cpp, value_only_top).
        if len(widths) >= 2:
            shapes[-1] = (B, widths[-2], widths[-1])
            shapes.append((B * m, widths[0], d))
        shapes += [(B * m, widths[l], widths[l - 1]) for l in range(len(widths) - 1, 0, -1)]
        if mode == "full" and d > _cost.GRAM_LOOP_MAX_D:
            # One triangle of blocks of each layer's Gram (csrc/jet_driver.cpp, gram_blocks).
            bs = (d + 3) // 4
            for l, n in enumerate(widths[:-1] if len(widths) >= 2 else widths):  # (no Gram term
                # for the linear last stage)
                for i0 in range(0, d, bs):
                    ni = min(bs, d - i0)
                    if l == 0:  # T_0 = W_0, shared by all samples
                        bmats.append((torch.randn(B * m * ni, n, dtype=dtype),
                                      torch.randn(n, d - i0, dtype=dtype)))
                    else:
                        bmats.append((torch.randn(B, m * ni, n, dtype=dtype),
                                      torch.randn(B, n, d - i0, dtype=dtype)))
    if train:  # the backward: weight gradient and input adjoint per layer
        shapes += [(widths[l], B * C, widths[l - 1]) for l in range(1, len(widths))]
        shapes += [(B * C, widths[l], widths[l - 1]) for l in range(1, len(widths))]
        shapes += [(widths[0], B, d), (B, widths[0], d)]
    mats = [(torch.randn(a, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for a, k, n in shapes]

    def run():
        for a, w in mats:
            torch.mm(a, w)
        for a, w in bmats:
            torch.matmul(a, w)

    # The floating-point operations of those products: the call's own FLOPs, for its rate.
    run.flops = sum(2 * a * k * n for a, k, n in shapes) + sum(
        2 * a.shape[-2] * a.shape[-1] * w.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        for a, w in bmats)
    return run


def train_step_fns(model, x, f):
    params = dict(model.named_parameters())
    plist = list(params.values())

    def grads(loss):
        gs = torch.autograd.grad(loss, plist, allow_unused=True)
        return [torch.zeros_like(q) if g is None else g for g, q in zip(gs, plist)]

    def ours():
        return grads(((hessmlp.laplacian(model, x, output=0) - f) ** 2).mean())

    def func():
        def u(p, xi):
            return torch.func.functional_call(model, p, (xi,))[0]
        H = torch.func.vmap(torch.func.hessian(u, argnums=1), in_dims=(None, 0))(params, x)
        return grads(((H.diagonal(dim1=-2, dim2=-1).sum(-1) - f) ** 2).mean())

    return ours, func


def percall_rows(run_time, B=8):
    """Markdown rows: a small PINN's Laplacian and Laplacian-loss training step against its
    plain forward and forward + backward (an MSE loss), at a batch where fixed per-call costs
    dominate; the target is at most 2x. Checked against torch.func first."""
    torch.manual_seed(0)
    model = hessmlp.MLP(2, [32] * 3, 1)
    x = torch.rand(B, 2) * 2 - 1
    f = torch.sin(3 * x).sum(1, keepdim=True)
    m64 = copy.deepcopy(model).double()
    H = func_hessian(m64, x.double())
    check("per-call Laplacian", hessmlp.laplacian(m64, x.double()),
          H.diagonal(dim1=-2, dim2=-1).sum(-1), 1e-9)
    params = list(model.parameters())[:-1]  # (the Laplacian does not depend on the output bias)

    def lap():
        return hessmlp.laplacian(model, x)

    def fwd():
        return model(x)

    def lap_ng():
        with torch.no_grad():
            return hessmlp.laplacian(model, x)

    def fwd_ng():
        with torch.no_grad():
            return model(x)

    def step():
        return torch.autograd.grad(((hessmlp.laplacian(model, x) - f) ** 2).mean(), params)

    def fwd_bwd():
        return torch.autograd.grad(((model(x) - f) ** 2).mean(), params)

    out = []
    for name, ours, bname, base in (
            ("Laplacian (parameters require grad)", lap, "forward", fwd),
            ("Laplacian under no_grad", lap_ng, "forward under no_grad", fwd_ng),
            ("training step: Laplacian loss + gradients", step, "forward + backward (MSE loss)",
             fwd_bwd)):
        t_o, t_b = interleaved_rounds([ours, base], 3 * run_time, rounds=9)
        ratio = _median([o / b for o, b in zip(t_o, t_b)])
        out.append(f"| {name} | {_median(t_o) * 1e3:.3f} | {bname} | {_median(t_b) * 1e3:.3f} | "
                   f"{ratio:.2f} | <= 2 {'met' if ratio <= 2 else 'missed'} |")
    return out


def peak_memory(d, widths, m, B, mode):
    """Peak resident memory of one no-grad call in a fresh process, over what it must hold."""
    code = textwrap.dedent(f"""
        import torch, hessmlp
        torch.manual_seed(0)
        model = hessmlp.MLP({d}, {widths}, {m})
        x = torch.randn({B}, {d})
        with torch.no_grad():
            hessmlp.jet(model, x[:8], hessian={mode!r})
            def status(key):
                for line in open("/proc/self/status"):
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
            open("/proc/self/clear_refs", "w").write("5")
            before = status("VmRSS:")
            r = hessmlp.jet(model, x, hessian={mode!r})
            print(status("VmHWM:") - before)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, check=True).stdout.split()
        return int(out[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


# ---------------------------------------------------------------- the suite

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller batches and sweeps, short timings")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--targets-only", action="store_true",
                   help="time the targets table only and print it (writes nothing)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    rt = 0.15 if args.quick else 0.5
    q = 4 if args.quick else 1  # batch divisor
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say("# hessmlp CPU benchmark suite")
    say()
    peak = bench.fma_peak()
    say(f"{datetime.date.today()}, {bench.cpu_description()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, hessmlp {hessmlp.__version__}, float32 timings"
        f"{' (--quick)' if args.quick else ''}. Ratios: baseline time / hessmlp time.")
    say()

    # ---- targets (issue 5)
    say("## Targets")
    say()
    say("| case | hessmlp ms | baseline | baseline ms | ratio | target | GEMM floor ms | time / floor | target "
        "| GFLOP/s | / peak | target |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    d, widths, B = 3, [128] * 4, 4096 // q
    ws = widths + [1]
    m32, m64 = make(d, widths, 1), make(d, widths, 1, dtype=F64)
    x = torch.rand(B, d) * 2 - 1
    for mode in ("full", "trace", "diag"):
        agree(m64, m32, x, mode)
    # Each target's hessmlp call, baseline and GEMM floor are timed side by side (interleaved).
    rt3 = 3 * rt
    rows = []
    method = _cost.choose_method(d, ws, "full")
    floor = gemm_floor_fn(B, d, ws, "full", method, F32)
    res = side_by_side(lambda: hessmlp.hessian(m32, x), lambda: func_hessian(m32, x), floor, rt3)
    t_func_h = res[1]
    rows.append((f"PINN full Hessian (d=3, 4x128 tanh, B={B}, {method})", "vmap(func.hessian)", 3.5,
                 1.3) + res + (floor.flops, 0.6))
    for mode, name in (("trace", "Laplacian"), ("diag", "Hessian diagonal")):
        fn = (lambda: hessmlp.laplacian(m32, x)) if mode == "trace" else (lambda: hessmlp.hessian_diag(m32, x))
        post = ((lambda H: H.diagonal(dim1=-2, dim2=-1).sum(-1)) if mode == "trace"
                else (lambda H: H.diagonal(dim1=-2, dim2=-1)))
        meth = _cost.choose_method(d, ws, mode)
        floor = gemm_floor_fn(B, d, ws, mode, meth, F32)
        res = side_by_side(fn, lambda: post(func_hessian(m32, x)), floor, rt3)
        rows.append((f"PINN {name} ({meth})", "func.hessian then " + mode, 4.0, None) + res
                    + (floor.flops, 0.6))
    mt = make(d, widths, 1)
    for p_ in mt.parameters():
        p_.requires_grad_(True)
    f = torch.sin(3 * x).sum(1)
    ours, func = train_step_fns(mt, x, f)
    for a, b in zip(ours(), func()):
        assert rel_err(a, b) < 2e-3, "training-step gradients disagree with torch.func"
    floor = gemm_floor_fn(B, d, ws, "trace", "forward", F32, train=True)
    res = side_by_side(ours, func, floor, rt3)
    rows.append(("PINN training step (Laplacian loss + backward)", "torch.func route", 5.0, None) + res
                + (floor.flops, 0.5))
    # the forum's case
    fd, fw, fm, fB = 784, [512, 512], 10, 16
    f32, f64_ = make(fd, fw, fm), make(fd, fw, fm, dtype=F64)
    fx = torch.randn(fB, fd) * 0.5
    for output in (None, 2):
        Href = func_hessian(f64_, fx[:2].double(), output)
        check("forum float64", hessmlp.hessian(f64_, fx[:2].double(), output=output), Href, 1e-9)
        meth = _cost.choose_method(fd, fw + [fm if output is None else 1], "full")
        floor = gemm_floor_fn(fB, fd, fw + [fm if output is None else 1], "full", meth, F32)
        res = side_by_side(lambda: hessmlp.hessian(f32, fx, output=output),
                           lambda: func_hessian(f32, fx, output), floor, rt3)
        label = "all 10 outputs" if output is None else "class 2"
        rows.append((f"forum 784-512-512-10, B=16, {label} ({meth})", "vmap(func.hessian)", None,
                     1.5) + res + (floor.flops, None))
    peak = max(peak, bench.fma_peak())  # (the probe before and after the targets: the best)
    for name, bname, target, ftarget, t, tb, floor, ratio, fratio, flops, ptarget in rows:
        ok = "" if target is None else ("met" if ratio >= target else "missed")
        fok = "" if ftarget is None else ("met" if fratio <= ftarget else "missed")
        frac = flops / t / peak if peak else float("nan")
        pok = "" if ptarget is None else ("met" if frac >= ptarget else "missed")
        say(f"| {name} | {t * 1e3:.2f} | {bname} | {tb * 1e3:.2f} | {ratio:.2f}x | "
            f"{'' if target is None else f'>= {target}x '}{ok} | {floor * 1e3:.2f} | {fratio:.2f} | "
            f"{'' if ftarget is None else f'<= {ftarget} '}{fok} | {flops / t / 1e9:.0f} | {frac:.2f} | "
            f"{'' if ptarget is None else f'>= {ptarget} '}{pok} |")
    say()
    say("Times: medians over 9 interleaved rounds. Ratios: medians over the rounds of the ratio "
        "within each round (the call, its baseline and its floor timed back to back). GFLOP/s: "
        "the call's own floating-point operations (those of its products with the weight "
        f"matrices, as its GEMM floor counts them) over its time; peak: {peak / 1e9:.0f} GFLOP/s, "
        "this machine's fp32 FMA rate measured in this run by hessmlp's probe (independent FMA "
        "chains on the widest vectors, one per thread; hessmlp.bench.fma_peak), the best of "
        "the probes before and after the table.")
    say()

    # ---- per-call overhead (issue 15)
    say("## Per-call overhead: a small PINN (d=2, 3x32 tanh, m=1, B=8)")
    say()
    say("| call | ms | baseline | baseline ms | call / baseline | target |")
    say("|---|---|---|---|---|---|")
    for r in percall_rows(rt):
        say(r)
    say()
    say("Medians over 9 interleaved rounds; the ratio is the median of the ratios within a round.")
    say()
    if args.targets_only:
        return

    # ---- graph networks (issue 13)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_graphs import graph_rows

    say("## Graph networks against vmap(torch.func.hessian)")
    say()
    say("Residual PINN (d=3, 4 blocks of 128, tanh), SDF (d=3, positional encoding with 6 "
        "frequencies, 8x256 softplus(beta=100), the encoding concatenated again at layer 4), "
        "Fourier-feature PINN (d=2, 64 random features, 3x128 tanh). Agreement with torch.func "
        "asserted first (float64, 1e-10); train step: a Laplacian loss and its gradients w.r.t. "
        "every parameter.")
    say()
    say(bench.ROW_HEADER)
    for r in graph_rows(1024 // q, 5, rt, say=lambda s: print(s, flush=True)):
        say(bench.row_markdown(r))
    say()

    # ---- peers (issue 15)
    from bench_peers import PEER_HEADER, peer_markdown, peer_rows

    say("## Peers: hessmlp against every other exact route")
    say()
    say("Each peer's result is checked against hessmlp's first (float32, 1e-3); times in "
        "interleaved rounds; the ratio is peer time / hessmlp time (above 1: hessmlp faster). "
        "Peers are optional extras (pip install .[peers]); one not installed is noted, not timed.")
    say()
    say(PEER_HEADER)
    prows, notes = peer_rows(args.quick, run_time=rt * 2, say=lambda s: print(s, flush=True))
    for r in prows:
        say(peer_markdown(r))
    say()
    for n in notes:
        say(f"- {n}")
    say()

    # ---- operators (issue 14)
    from bench_operators import operator_rows

    say("## Operators: only the directions the equation needs")
    say()
    say("tanh MLP 4x128, m = 1. Each hessmlp operator against the routes that compute more and "
        "throw it away. Agreement asserted first (float64 against torch.func, 1e-10).")
    say()
    say(bench.ROW_HEADER)
    for r in operator_rows(2048 // q, 5, rt, say=lambda s: print(s, flush=True)):
        say(bench.row_markdown(r))
    say()

    # ---- baselines for the PINN full Hessian
    say(f"## PINN full Hessian (B={B}): every baseline")
    say()
    say("| route | ms | hessmlp speedup |")
    say("|---|---|---|")
    t_ours = median_s(lambda: hessmlp.hessian(m32, x), rt)
    say(f"| hessmlp.hessian | {t_ours * 1e3:.2f} | 1.0x |")
    say(f"| vmap(torch.func.hessian) | {t_func_h * 1e3:.2f} | {t_func_h / t_ours:.1f}x |")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(lambda v: func_hessian(m32, v))
        check("compiled torch.func", compiled(x)[:, 0], func_hessian(m32, x)[:, 0], 1e-4)
        tc = median_s(lambda: compiled(x), rt)
        say(f"| torch.compile(vmap(torch.func.hessian)) | {tc * 1e3:.2f} | {tc / t_ours:.1f}x |")
    except Exception as e:  # noqa: BLE001  (report a baseline that does not compile)
        say(f"| torch.compile(vmap(torch.func.hessian)) | fails: {type(e).__name__} | - |")
    xs = x[:256 // q]
    t_small = median_s(lambda: hessmlp.hessian(m32, xs), rt)

    def afh():
        H = torch.autograd.functional.hessian(lambda v: m32(v)[:, 0].sum(), xs, vectorize=True)
        return H.diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    check("autograd.functional", afh(), func_hessian(m32, xs)[:, 0], 1e-4)
    ta = median_s(afh, rt)

    def loop():
        xx = xs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(m32(xx)[:, 0].sum(), xx, create_graph=True)
        return torch.stack([torch.autograd.grad(g[:, i].sum(), xx, retain_graph=True)[0]
                            for i in range(d)], 1)

    check("row loop", loop(), func_hessian(m32, xs)[:, 0], 1e-4)
    tl = median_s(loop, rt)
    say(f"| autograd.functional.hessian(vectorize=True), B={xs.shape[0]} | {ta * 1e3:.2f} | "
        f"{ta / t_small:.1f}x (against hessmlp at that B) |")
    say(f"| row-by-row autograd.grad loop, B={xs.shape[0]} | {tl * 1e3:.2f} | {tl / t_small:.1f}x |")
    say()

    # ---- sweeps
    sweeps = {}

    def sweep(name, configs):
        say(f"## Sweep: {name}")
        say()
        say("| config | full: hessmlp ms | vs func | / GEMM floor | Laplacian: hessmlp ms | vs func | / GEMM floor |")
        say("|---|---|---|---|---|---|---|")
        out = []
        for label, dd, ww, BB in configs:
            mm = make(dd, ww, 1)
            xx = torch.rand(BB, dd) * 2 - 1
            H = func_hessian(mm, xx[:32])
            check(f"sweep {label}", hessmlp.hessian(mm, xx[:32]), H, 1e-4)
            meth = _cost.choose_method(dd, ww + [1], "full")
            th, tf, fh = interleaved([lambda: hessmlp.hessian(mm, xx), lambda: func_hessian(mm, xx),
                                      gemm_floor_fn(BB, dd, ww + [1], "full", meth, F32)], 2 * rt, 3)
            tlap, tfl, fl = interleaved(
                [lambda: hessmlp.laplacian(mm, xx),
                 lambda: func_hessian(mm, xx).diagonal(dim1=-2, dim2=-1).sum(-1),
                 gemm_floor_fn(BB, dd, ww + [1], "trace", _cost.choose_method(dd, ww + [1], "trace"), F32)],
                2 * rt, 3)
            say(f"| {label} | {th * 1e3:.2f} | {tf / th:.2f}x | {th / fh:.2f} | {tlap * 1e3:.2f} | "
                f"{tfl / tlap:.2f}x | {tlap / fl:.2f} |")
            out.append((label, tf / th, th / fh, tfl / tlap, tlap / fl))
        say()
        sweeps[name] = out

    Bs = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]
    sweep("batch size (d=3, 4x128 tanh)", [(f"B={b}", 3, [128] * 4, b) for b in Bs])
    Ws = [32, 128, 512] if args.quick else [32, 64, 128, 256, 512]
    sweep("width (d=3, 4 layers, B=1024)", [(f"width={w}", 3, [w] * 4, 1024 // q) for w in Ws])
    Ds = [1, 3, 8] if args.quick else [1, 2, 3, 4, 6, 8, 12, 16]
    sweep("input dimension d (4x128, B=1024)", [(f"d={dd}", dd, [128] * 4, 1024 // q) for dd in Ds])

    # ---- method crossover
    say("## Method crossover: forward jets against reverse-Gram (3x128 tanh, float32)")
    say()
    say("| mode | m | d | forward us/sample | reverse us/sample | faster | auto picks |")
    say("|---|---|---|---|---|---|---|")
    for mode in ("full", "diag", "trace"):
        for mo in (1, 4):
            for dd in ([2, 4, 16] if args.quick else [1, 2, 3, 4, 6, 8, 16, 32, 48]):
                if mode != "full" and dd > 16:
                    continue
                mm = make(dd, [128] * 3, mo)
                BB = max(32, 4096 // dd // q)
                xx = torch.rand(BB, dd)
                tf, tr = (t / BB for t in interleaved(
                    [lambda: hessmlp.jet(mm, xx, hessian=mode, method="forward"),
                     lambda: hessmlp.jet(mm, xx, hessian=mode, method="reverse")], rt, 3))
                say(f"| {mode} | {mo} | {dd} | {tf * 1e6:.2f} | {tr * 1e6:.2f} | "
                    f"{'forward' if tf < tr else 'reverse'} | {_cost.choose_method(dd, [128] * 3 + [mo], mode)} |")
    say()

    # ---- memory
    say("## Peak memory of one full-Hessian call (no grad, fresh process)")
    say()
    say("What the call must hold: x, the parameters and the outputs, and the state of the samples in")
    say("flight (each thread's block of samples: every layer's columns for reverse-Gram, which it")
    say("keeps for its way back; three buffers of columns for forward jets).")
    say()
    say("| case | method | peak MiB | inputs + outputs MiB | + state in flight MiB | peak / that |")
    say("|---|---|---|---|---|---|")
    threads = torch.get_num_threads()
    for dd, ww, mo, BB in ((3, [128] * 4, 1, 65536 // q), (8, [256] * 3, 2, 16384 // q)):
        meth = _cost.choose_method(dd, ww + [mo], "full")
        peak = peak_memory(dd, ww, mo, BB, "full")
        io = 4 * (BB * dd + sum(a * b + b for a, b in zip([dd] + ww, ww + [mo])) + BB * mo * (1 + dd + dd * dd))
        rows = _cost.cpu_block_rows(dd, ww + [mo], "full", 4, meth) or BB
        C = 1 + dd if meth == "reverse" else 1 + dd + dd * (dd + 1) // 2
        if meth == "reverse":
            state = rows * (sum((C + 2) * n for n in ww + [mo]) + 2 * C * max(ww) + 2 * mo * max(ww))
            state = threads * state + BB * mo * dd * (dd + 1) // 2  # and the packed triangle
        else:
            state = threads * 3 * rows * C * max(ww)
        must = io + 4 * state
        label = f"d={dd}, {len(ww)}x{ww[0]}, m={mo}, B={BB}"
        if peak is None:
            say(f"| {label} | {meth} | not measured | {io / 2**20:.1f} | {must / 2**20:.1f} | - |")
        else:
            say(f"| {label} | {meth} | {peak / 2**20:.1f} | {io / 2**20:.1f} | {must / 2**20:.1f} | "
                f"{peak / must:.2f} |")
    say()

    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, "cpu.md")
    with open(md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("written", md)
    if not args.no_plots:
        plot(sweeps, args.out)


def plot(sweeps, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install .[bench]): no plots")
        return
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5 * len(sweeps), 7), squeeze=False)
    for j, (name, rows) in enumerate(sweeps.items()):
        labels = [r[0] for r in rows]
        xs = range(len(rows))
        ax = axes[0][j]
        ax.plot(xs, [r[1] for r in rows], "o-", label="full Hessian")
        ax.plot(xs, [r[3] for r in rows], "s-", label="Laplacian")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("speedup over torch.func")
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=7)
        ax.legend(fontsize=7)
        ax = axes[1][j]
        ax.plot(xs, [r[2] for r in rows], "o-", label="full Hessian")
        ax.plot(xs, [r[4] for r in rows], "s-", label="Laplacian")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("time / GEMM floor")
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "cpu_sweeps.png")
    fig.savefig(path, dpi=110)
    print("written", path)


if __name__ == "__main__":
    main()
