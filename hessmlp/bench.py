"""python -m hessmlp.bench: check hessmlp against torch.func on a PINN-shaped MLP and time both.

Prints the largest relative errors and the median times (torch.utils.benchmark)
with their ratios. Agreement is asserted before anything is timed.
"""
from __future__ import annotations

import argparse
import platform
from typing import Callable, Dict, List, Optional

import torch
from torch.utils import benchmark

import hessmlp

__all__ = ["baselines", "median_seconds", "relative_error", "main"]


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


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--min-run-time", type=float, default=0.5)
    args = p.parse_args(argv)

    print(f"hessmlp {hessmlp.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"PINN-shaped MLP: d=3, 3 hidden layers of 128, tanh, m=1, batch {args.batch}\n")
    header = f"{'quantity':<12} {'dtype':<8} {'max rel err':>12} {'hessmlp ms':>11} {'torch.func ms':>14} {'speedup':>8}"
    print(header)
    print("-" * len(header))
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
        for name, (ours, theirs, ref) in rows.items():
            ref = theirs() if ref is None else ref
            err = relative_error(ours(), ref)
            assert err <= tol, f"{name} {dtype}: hessmlp disagrees with torch.func (relative error {err:.2e})"
            t_ours = median_seconds(ours, args.min_run_time)
            t_theirs = median_seconds(theirs, args.min_run_time)
            print(f"{name:<12} {str(dtype).replace('torch.', ''):<8} {err:>12.2e} {t_ours * 1e3:>11.2f} "
                  f"{t_theirs * 1e3:>14.2f} {t_theirs / t_ours:>7.1f}x")


if __name__ == "__main__":
    main()
