"""python -m hessmlp.bench: check hessmlp against torch.func on a PINN-shaped MLP and time both.

Prints the largest relative errors, then the median times (torch.utils.benchmark) of
hessmlp and torch.func in interleaved rounds with the median ratio and its spread over the
rounds, the thread count, and a one-line verdict. A row that disagrees with torch.func is not
timed; the exit status is 1 if any row disagrees.
"""
from __future__ import annotations

import argparse
import platform
from typing import Callable, Dict, List, Optional

import torch
from torch.utils import benchmark

import hessmlp

__all__ = ["baselines", "median_seconds", "interleaved", "interleaved_rounds", "relative_error", "fma_peak",
           "cpu_description", "main"]


def interleaved_rounds(fns, run_time: float, rounds: int = 5) -> List[List[float]]:
    """Times of fns measured side by side: ``rounds`` rounds of blocked_autorange, one per
    function in turn, so that a drift in the machine's speed falls on all of them alike.
    Returns each function's list of round medians (seconds)."""
    for fn in fns:
        fn()
    # (Timer runs on one thread unless told otherwise: time with the threads torch uses.)
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for fn in fns]
    per: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, t in enumerate(timers):
            per[k].append(t.blocked_autorange(min_run_time=run_time / rounds).median)
    return per


def fma_peak(seconds: float = 0.25, dtype: torch.dtype = torch.float32) -> float:
    """The machine's floating-point rate in FLOP/s, measured: independent chains of fused
    multiply-adds on the widest vectors of the instruction set hessmlp's CPU products use
    (hessmlp._cpu_isa), one chain set per thread torch uses, for about ``seconds``. The best of
    three runs. 0.0 where there are no AVX2 / AVX-512 kernels (not x86-64)."""
    like = torch.empty(0, dtype=dtype)
    try:
        secs, flops = torch.ops.hessmlp._fma_peak(like, 100_000).tolist()
    except RuntimeError:
        return 0.0
    iters = max(100_000, int(100_000 * seconds / max(secs, 1e-9)))
    best = 0.0
    for _ in range(3):
        secs, flops = torch.ops.hessmlp._fma_peak(like, iters).tolist()
        best = max(best, flops / secs)
    return best


def cpu_description() -> str:
    """The CPU's vendor, model name, family and model numbers (from /proc/cpuinfo where there
    is one), and the instruction set of hessmlp's CPU products."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    vendor = info.get("vendor_id", "")
    fam = f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else ""
    isa = torch.ops.hessmlp._cpu_isa(torch.empty(0))[0]
    return ", ".join(p for p in (vendor, name, fam, f"hessmlp products: {isa}") if p)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(max|b|, 1)."""
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    return (a - b).abs().max().item() / scale if b.numel() else 0.0


def median_seconds(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    # Timer runs on one thread unless told otherwise: time with the threads torch uses.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def baselines(model, x, output: Optional[int] = None) -> Dict[str, Callable[[], torch.Tensor]]:
    """Ways users compute the full Hessian today; each returns (B, m, d, d) or (B, d, d) with output=k."""
    f = (lambda v: model(v)) if output is None else (lambda v: model(v)[..., output])
    m = model(x[:1]).shape[-1]

    def func_hessian():
        return torch.func.vmap(torch.func.hessian(f))(x)

    def autograd_functional():
        # One scalar function per output (samples summed, they are independent):
        # (B, d, B, d), of which the diagonal blocks are the per-sample Hessians.
        ks = range(m) if output is None else [output]
        Hs = []
        for k in ks:
            H = torch.autograd.functional.hessian(lambda v: model(v)[:, k].sum(), x, vectorize=True)
            Hs.append(H.diagonal(dim1=0, dim2=2).permute(2, 0, 1))
        return torch.stack(Hs, 1) if output is None else Hs[0]

    def row_loop():
        # The forum's loop: one autograd.grad per Hessian row (per output).
        xx = x.detach().requires_grad_(True)
        y = f(xx)
        outs = [y[:, k] for k in range(m)] if output is None else [y]
        Hs = []
        for yk in outs:
            (g,) = torch.autograd.grad(yk.sum(), xx, create_graph=True)
            rows = [torch.autograd.grad(g[:, i].sum(), xx, retain_graph=True)[0] for i in range(x.shape[1])]
            Hs.append(torch.stack(rows, 1))
        return torch.stack(Hs, 1) if output is None else Hs[0]

    return {"vmap(torch.func.hessian)": func_hessian,
            "autograd.functional.hessian": autograd_functional,
            "row-by-row autograd.grad": row_loop}


def _pinn(dtype, B):
    torch.manual_seed(0)
    model = hessmlp.MLP(3, [128, 128, 128], 1, activation="tanh").to(dtype)
    x = torch.rand(B, 3, dtype=dtype) * 2 - 1
    return model, x


def interleaved(ours: Callable[[], object], theirs: Callable[[], object], rounds: int,
                min_run_time: float):
    """Medians of both over ``rounds`` interleaved rounds, and the ratio theirs / ours of each
    round (the machine's drift between rounds cancels within one): (ours s, theirs s, ratios)."""
    t_ours, t_theirs, ratios = [], [], []
    for _ in range(rounds):
        a = median_seconds(ours, min_run_time)
        b = median_seconds(theirs, min_run_time)
        t_ours.append(a)
        t_theirs.append(b)
        ratios.append(b / a)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(t_ours), med(t_theirs), ratios


def timed_row(case: str, baseline: str, B: int, ours: Callable[[], object],
              theirs: Callable[[], object], rounds: int, min_run_time: float, say=print) -> tuple:
    """One benchmark row, ours against a baseline over interleaved rounds: (case, baseline, B,
    ours ms, baseline ms, ratio baseline / ours, lowest and highest round ratio); says it."""
    t_ours, t_theirs, ratios = interleaved(ours, theirs, rounds, min_run_time)
    row = (case, baseline, B, t_ours * 1e3, t_theirs * 1e3, t_theirs / t_ours, min(ratios), max(ratios))
    say(f"{case} vs {baseline}, B={B}: hessmlp {row[3]:.2f} ms, baseline {row[4]:.2f} ms, ratio "
        f"{row[5]:.2f} (rounds {row[6]:.2f}-{row[7]:.2f})")
    return row


ROW_HEADER = ("| case | baseline | B | hessmlp ms | baseline ms | ratio | rounds |\n"
              "|---|---|---|---|---|---|---|")


def row_markdown(row: tuple) -> str:
    """A timed_row as a line of a markdown table under ROW_HEADER."""
    return (f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.2f} | {row[4]:.2f} | {row[5]:.2f}x | "
            f"{row[6]:.2f}-{row[7]:.2f} |")


def write_rows(path: str, title: str, about: str, rows) -> None:
    """A markdown file of timed rows: the title, the machine, what the rows are, the table."""
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32. {about}\n\n")
        f.write(ROW_HEADER + "\n" + "".join(row_markdown(r) + "\n" for r in rows))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing block")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row")
    args = p.parse_args(argv)

    print(f"hessmlp {hessmlp.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; timed with {torch.get_num_threads()} "
          f"threads (torch.get_num_threads()), {args.rounds} interleaved rounds per row")
    print(f"PINN-shaped MLP: d=3, 3 hidden layers of 128, tanh, m=1, batch {args.batch}\n")
    header = (f"{'quantity':<12} {'dtype':<8} {'max rel err':>12} {'hessmlp ms':>11} "
              f"{'torch.func ms':>14} {'speedup':>8} {'spread over rounds':>20}")
    print(header)
    print("-" * len(header))
    disagree = []
    rows_done = 0
    for dtype in (torch.float32, torch.float64):
        model, x = _pinn(dtype, args.batch)
        with torch.no_grad():
            for p_ in model.parameters():
                p_.requires_grad_(False)
        ref_H = torch.func.vmap(torch.func.hessian(model))(x)
        rows = {
            "hessian": (lambda: hessmlp.hessian(model, x), lambda: torch.func.vmap(torch.func.hessian(model))(x),
                        ref_H),
            "laplacian": (lambda: hessmlp.laplacian(model, x),
                          lambda: torch.func.vmap(torch.func.hessian(model))(x).diagonal(dim1=-2, dim2=-1).sum(-1),
                          ref_H.diagonal(dim1=-2, dim2=-1).sum(-1)),
            "jacobian": (lambda: hessmlp.jacobian(model, x), lambda: torch.func.vmap(torch.func.jacrev(model))(x),
                         None),
        }
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        name_of = str(dtype).replace("torch.", "")
        for name, (ours, theirs, ref) in rows.items():
            ref = theirs() if ref is None else ref
            err = relative_error(ours(), ref)
            rows_done += 1
            if not err <= tol:  # agreement first: a row that disagrees is not timed
                disagree.append(f"{name} {name_of} ({err:.1e} > {tol:.0e})")
                print(f"{name:<12} {name_of:<8} {err:>12.2e}   DISAGREES with torch.func: not timed")
                continue
            t_ours, t_theirs, ratios = interleaved(ours, theirs, args.rounds, args.min_run_time)
            spread = f"{min(ratios):.1f}x - {max(ratios):.1f}x"
            print(f"{name:<12} {name_of:<8} {err:>12.2e} {t_ours * 1e3:>11.2f} "
                  f"{t_theirs * 1e3:>14.2f} {sorted(ratios)[len(ratios) // 2]:>7.1f}x {spread:>20}")
    print()
    if disagree:
        print(f"verdict: {len(disagree)} of {rows_done} rows DISAGREE with torch.func: "
              + ", ".join(disagree))
        return 1
    print(f"verdict: all {rows_done} rows agree with torch.func (float32 within 1e-4, float64 "
          "within 1e-10, relative to each result's scale)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
