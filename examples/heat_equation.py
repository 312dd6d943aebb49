"""Physics-informed network for the heat equation, with derivatives w.r.t. chosen inputs only.

    u_t = alpha (u_xx + u_yy)   on the unit square, t in [0, 1],
    u = 0 on the square's boundary,   u(x, y, 0) = sin(pi x) sin(pi y),
    exact solution u = exp(-2 pi^2 alpha t) sin(pi x) sin(pi y).

The network's input is (x, y, t). The loss needs u_t and the spatial Laplacian, not u_tt:
hessmlp.jacobian(model, xyt, wrt=[2]) and hessmlp.laplacian(model, xyt, wrt=[0, 1]) compute
exactly those (their jets carry one and two directions instead of three). The boundary and
initial conditions are built into the model (a graph network: products of the input's
coordinates with a tanh MLP),

    u(x, y, t) = sin(pi x) sin(pi y) + 16 t x (1 - x) y (1 - y) N(x, y, t),

so the loss is the mean squared PDE residual alone.

    python examples/heat_equation.py            # Adam, then L-BFGS: relative L2 error ~1e-4
    python examples/heat_equation.py --quick    # a short run (used by the tests)
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import hessmlp


class HeatNet(nn.Module):
    """u = sin(pi x) sin(pi y) + 16 t x (1 - x) y (1 - y) N(x, y, t): the boundary and initial
    conditions hold for every N."""

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        self.net = hessmlp.MLP(3, [width] * depth, 1, activation="tanh")

    def forward(self, xyt):
        x, y, t = xyt[:, 0:1], xyt[:, 1:2], xyt[:, 2:3]
        initial = torch.sin(math.pi * x) * torch.sin(math.pi * y)
        return initial + 16 * t * x * (1 - x) * y * (1 - y) * self.net(xyt)


def exact(xyt: torch.Tensor, alpha: float) -> torch.Tensor:
    x, y, t = xyt.unbind(1)
    return torch.exp(-2 * math.pi ** 2 * alpha * t) * torch.sin(math.pi * x) * torch.sin(math.pi * y)


def pde_loss(model, points, alpha):
    u_t = hessmlp.jacobian(model, points, wrt=[2], output=0)[:, 0]   # du/dt only
    lap = hessmlp.laplacian(model, points, wrt=[0, 1], output=0)     # u_xx + u_yy, no u_tt
    return ((u_t - alpha * lap) ** 2).mean()


def relative_l2(model, grid: torch.Tensor, alpha: float) -> float:
    with torch.no_grad():
        u = model(grid)[:, 0]
        e = exact(grid, alpha)
        return ((u - e).norm() / e.norm()).item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run: a few hundred Adam steps")
    p.add_argument("--alpha", type=float, default=0.1, help="the diffusivity")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=3, help="hidden layers of N")
    p.add_argument("--points", type=int, default=2048, help="collocation points in space-time")
    p.add_argument("--adam-steps", type=int, default=2000)
    p.add_argument("--lbfgs-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=250)
    args = p.parse_args(argv)
    if args.quick:
        args.adam_steps, args.lbfgs_steps, args.print_every, args.points = 200, 0, 100, 512

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = HeatNet(args.width, args.depth)
    points = torch.rand(args.points, 3, generator=g)
    n = 31
    s = torch.linspace(0, 1, n)
    grid = torch.stack(torch.meshgrid(s, s, s, indexing="ij"), dim=-1).reshape(-1, 3)

    history = []
    t0 = time.perf_counter()

    def report(stage, step, loss):
        err = relative_l2(model, grid, args.alpha)
        history.append((stage, step, loss, err))
        print(f"{stage:6s} step {step:5d}  PDE loss {loss:.3e}  rel L2 error {err:.2e}  "
              f"{time.perf_counter() - t0:6.1f} s", flush=True)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.adam_steps, 1), eta_min=1e-4)
    for step in range(args.adam_steps + 1):
        loss = pde_loss(model, points, args.alpha)
        if step % args.print_every == 0 or step == args.adam_steps:
            report("adam", step, loss.item())
        if step == args.adam_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    if args.lbfgs_steps > 0:
        lbfgs = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=args.print_every,
                                  history_size=50, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            lbfgs.zero_grad(set_to_none=True)
            loss = pde_loss(model, points, args.alpha)
            loss.backward()
            return loss

        done = 0
        while done < args.lbfgs_steps:
            lbfgs.step(closure)
            done += args.print_every
            report("lbfgs", done, pde_loss(model, points, args.alpha).item())

    err = relative_l2(model, grid, args.alpha)
    elapsed = time.perf_counter() - t0
    print(f"final relative L2 error {err:.3e} against exp(-2 pi^2 alpha t) sin(pi x) sin(pi y) on a "
          f"{n}^3 grid, {elapsed:.1f} s, {torch.get_num_threads()} threads")
    return {"history": history, "error": err, "seconds": elapsed}


if __name__ == "__main__":
    main()
