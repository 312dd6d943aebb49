"""Physics-informed network for the Poisson equation, trained through hessmlp.laplacian.

    -Laplacian(u) = f   on the unit square,   u = 0 on its boundary,
    f(x, y) = 2 pi^2 sin(pi x) sin(pi y),  exact solution u = sin(pi x) sin(pi y).

The loss is the mean squared PDE residual at interior collocation points plus the
mean squared value at boundary points. hessmlp.laplacian gives the exact Laplacian of
the network at every point in one call, and its backward gives the exact gradient
of the loss w.r.t. every weight: no loops over points or input dimensions, no
double backward through autograd.

    python examples/pinn_poisson.py            # Adam, then L-BFGS: relative L2 error < 1e-2
    python examples/pinn_poisson.py --quick    # a short run (used by the tests)
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import hessmlp


def exact(xy: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * xy[:, 0]) * torch.sin(math.pi * xy[:, 1])


def source(xy: torch.Tensor) -> torch.Tensor:
    return 2 * math.pi ** 2 * exact(xy)


def boundary_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points on the boundary of the unit square, spread over its four sides."""
    t = torch.rand(n, generator=generator)
    side = torch.randint(0, 4, (n,), generator=generator)
    x = torch.where(side == 0, 0.0, torch.where(side == 1, 1.0, t))
    y = torch.where(side == 2, 0.0, torch.where(side == 3, 1.0, t))
    return torch.stack([torch.where(side < 2, x, t), torch.where(side < 2, t, y)], dim=1)


def loss_terms(model, interior, boundary, f_interior, boundary_weight):
    residual = -hessmlp.laplacian(model, interior, output=0) - f_interior
    u_b = model(boundary)[:, 0]
    pde = (residual ** 2).mean()
    bc = (u_b ** 2).mean()
    return pde + boundary_weight * bc, pde, bc


def relative_l2(model, grid: torch.Tensor) -> float:
    with torch.no_grad():
        u = model(grid)[:, 0]
        e = exact(grid)
        return ((u - e).norm() / e.norm()).item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run: a few hundred Adam steps")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=3, help="hidden layers")
    p.add_argument("--interior", type=int, default=1024, help="interior collocation points")
    p.add_argument("--boundary", type=int, default=256, help="boundary points")
    p.add_argument("--adam-steps", type=int, default=2000)
    p.add_argument("--lbfgs-steps", type=int, default=1500)
    p.add_argument("--boundary-weight", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=250)
    args = p.parse_args(argv)
    if args.quick:
        args.adam_steps, args.lbfgs_steps, args.print_every = 300, 0, 100

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = hessmlp.MLP(2, [args.width] * args.depth, 1, activation="tanh")
    interior = torch.rand(args.interior, 2, generator=g)
    boundary = boundary_points(args.boundary, g)
    f_interior = source(interior)
    n = 101
    s = torch.linspace(0, 1, n)
    grid = torch.stack(torch.meshgrid(s, s, indexing="ij"), dim=-1).reshape(-1, 2)

    history = []
    t0 = time.perf_counter()

    def report(stage, step, loss, pde, bc):
        err = relative_l2(model, grid)
        history.append((stage, step, loss, err))
        print(f"{stage:6s} step {step:5d}  loss {loss:.3e}  (pde {pde:.2e}, boundary {bc:.2e})  "
              f"rel L2 error {err:.2e}  {time.perf_counter() - t0:6.1f} s", flush=True)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.adam_steps, 1), eta_min=1e-4)
    for step in range(args.adam_steps + 1):
        loss, pde, bc = loss_terms(model, interior, boundary, f_interior, args.boundary_weight)
        if step % args.print_every == 0 or step == args.adam_steps:
            report("adam", step, loss.item(), pde.item(), bc.item())
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
            loss, _, _ = loss_terms(model, interior, boundary, f_interior, args.boundary_weight)
            loss.backward()
            return loss

        done = 0
        while done < args.lbfgs_steps:
            lbfgs.step(closure)
            done += args.print_every
            loss, pde, bc = loss_terms(model, interior, boundary, f_interior, args.boundary_weight)
            report("lbfgs", done, loss.item(), pde.item(), bc.item())

    err = relative_l2(model, grid)
    elapsed = time.perf_counter() - t0
    print(f"final relative L2 error {err:.3e} against sin(pi x) sin(pi y) on a {n}x{n} grid, "
          f"{elapsed:.1f} s, {torch.get_num_threads()} threads")
    return {"history": history, "error": err, "seconds": elapsed}


if __name__ == "__main__":
    main()
