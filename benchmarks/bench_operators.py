"""Operators that ask only for what the equation needs (docs/design.md §10), on the CPU (or
--device), against the routes that compute more and throw it away.

Rows (float32, a tanh MLP of 4 hidden layers of 128, m = 1):
  - the spatial Laplacian of u(x, y, z, t) (d = 4): laplacian(wrt=[0, 1, 2]) against (a)
    hessmlp's whole Hessian diagonal, then the sum over x, y, z, and (b) torch.func's Hessian,
    then that sum;
  - a 10-dimensional heat equation's Laplacian (d = 11, wrt the 10 spatial inputs), against
    the same two routes;
  - tr(A H) with a rank-2 A (d = 10): laplacian(matrix=A) against hessmlp's full Hessian then
    the sum with A, and torch.func's;
  - H v (d = 10): hvp against torch.func's jvp of the gradient, and hessmlp's full Hessian
    times v.
Agreement is asserted first (float64 against torch.func, 1e-10); times are medians over
interleaved rounds (hessmlp.bench.interleaved); ratio = baseline / hessmlp.

    python benchmarks/bench_operators.py            # benchmarks/results/operators_<device>.md
    python benchmarks/bench_operators.py --quick
"""
import argparse
import os

import torch

import hessmlp
from hessmlp.bench import relative_error, timed_row, write_rows


def func_hessian(model, x):
    return torch.func.vmap(torch.func.hessian(lambda v: model(v.unsqueeze(0))[0]))(x)


def _spatial(model, x, wrt):
    idx = torch.tensor(wrt)
    return (lambda: hessmlp.laplacian(model, x, wrt=wrt),
            {"hessmlp diag, summed": lambda: hessmlp.hessian_diag(model, x)[..., idx].sum(-1),
             "torch.func Hessian, summed":
                 lambda: func_hessian(model, x).diagonal(dim1=-2, dim2=-1)[..., idx].sum(-1)})


def _trace_with(model, x, A):
    return (lambda: hessmlp.laplacian(model, x, matrix=A),
            {"hessmlp full Hessian, tr(A H)": lambda: (hessmlp.hessian(model, x) * A).sum((-1, -2)),
             "torch.func Hessian, tr(A H)": lambda: (func_hessian(model, x) * A).sum((-1, -2))})


def _hvp(model, x, v):
    def func_hvp():
        # Forward over reverse per sample: jvp of the gradient along v (torch.func's route).
        g = lambda xi: torch.func.grad(lambda z: model(z.unsqueeze(0))[0, 0])(xi)  # noqa: E731
        return torch.func.vmap(lambda xi: torch.func.jvp(g, (xi,), (v,))[1])(x)

    return (lambda: hessmlp.hvp(model, x, v, output=0),
            {"torch.func jvp(grad)": func_hvp,
             "hessmlp full Hessian @ v": lambda: hessmlp.hessian(model, x, output=0) @ v})


def operator_rows(B, rounds, run_time, device="cpu", say=print):
    """hessmlp.bench.timed_row's rows for each case and baseline, agreement asserted first."""
    device = torch.device(device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    L = torch.randn(10, 2, generator=gen)
    cases = [
        ("spatial Laplacian of u(x, y, z, t), d=4, wrt 3", 4, lambda m, x: _spatial(m, x, [0, 1, 2])),
        ("10-d heat equation Laplacian, d=11, wrt 10", 11, lambda m, x: _spatial(m, x, list(range(10)))),
        ("tr(A H), A of rank 2, d=10", 10, lambda m, x: _trace_with(m, x, (L @ L.T).to(x))),
        ("H v, d=10", 10, lambda m, x: _hvp(m, x, L[:, 0].to(x))),
    ]
    rows = []
    with torch.no_grad():
        for name, d, make in cases:
            model = hessmlp.MLP(d, [128] * 4, 1, activation="tanh").to(device)
            x = torch.rand(B, d, device=device) * 2 - 1
            m64, x64 = model.double(), x.double()[:32]
            ours64, base64 = make(m64, x64)
            for what, base in base64.items():
                e = relative_error(ours64(), base())
                assert e < 1e-10, f"{name}: hessmlp differs from {what} by {e:.2e} (float64)"
            model = m64.float()
            ours, bases = make(model, x)
            for what, base in bases.items():
                e = relative_error(ours().double(), base().double())
                assert e < 1e-3, f"{name}: float32 results differ from {what} by {e:.2e}"
                rows.append(timed_row(name, what, B, ours, base, rounds, run_time, say))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    B = 512 if args.quick else 2048
    rounds, run_time = (3, 0.2) if args.quick else (5, 0.5)
    rows = operator_rows(B, rounds, run_time, args.device, lambda s: print(s, flush=True))
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device).type
    path = os.path.join(args.out, f"operators_{device}.md")
    write_rows(path, f"Operators, {device}: only the directions the equation needs",
               "tanh MLP 4x128, m = 1; agreement asserted first (float64 against torch.func, "
               "1e-10). Ratio: baseline / hessmlp, medians of interleaved rounds.", rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
