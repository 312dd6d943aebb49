"""Training-step benchmark: a PINN step (Laplacian, loss, backward) with hessmlp against
the same step written with torch.func and with the usual autograd.grad loop.

One step = the Laplacian of u at B collocation points, loss = mean((Laplacian u - f)^2),
and the gradients of the loss w.r.t. every parameter. For each shape the gradients of
every route are first checked against hessmlp's (float64, relative 1e-9, and float32),
then the medians are timed in this one process (torch.utils.benchmark) and the ratios
printed (baseline time / hessmlp time; above 1 means hessmlp is faster).

    python benchmarks/bench_train.py            # all shapes
    python benchmarks/bench_train.py --quick    # smaller batches, short timings
"""
import argparse
import platform

import torch

import hessmlp
from hessmlp.bench import median_seconds

SHAPES = [
    # name, d, hidden, activation, batch
    ("examples/pinn_poisson.py: d=2, 3x32 tanh", 2, [32, 32, 32], "tanh", 1024),
    ("PINN d=3, 3x128 tanh", 3, [128, 128, 128], "tanh", 4096),
    ("PINN d=3, 4x128 tanh", 3, [128, 128, 128, 128], "tanh", 4096),
    ("u(x, t) d=4, 4x64 silu", 4, [64, 64, 64, 64], "silu", 2048),
]


def _problem(d, hidden, act, B, dtype):
    torch.manual_seed(0)
    model = hessmlp.MLP(d, hidden, 1, activation=act).to(dtype)
    x = torch.rand(B, d, dtype=dtype)
    f = torch.sin(3 * x).sum(1)
    return model, x, f


def routes(model, x, f):
    """Each route returns the list of parameter gradients of the same loss."""
    params = dict(model.named_parameters())
    names, plist = list(params), list(params.values())

    def grads(loss):
        # The last bias does not reach the Laplacian: autograd through torch.func says None.
        gs = torch.autograd.grad(loss, plist, allow_unused=True)
        return [torch.zeros_like(q) if g is None else g for g, q in zip(gs, plist)]

    def ours():
        lap = hessmlp.laplacian(model, x, output=0)
        return grads(((lap - f) ** 2).mean())

    def func():
        def u(p, xi):
            return torch.func.functional_call(model, p, (xi,))[0]
        H = torch.func.vmap(torch.func.hessian(u, argnums=1), in_dims=(None, 0))(params, x)
        lap = H.diagonal(dim1=-2, dim2=-1).sum(-1)
        return grads(((lap - f) ** 2).mean())

    def loop():
        xx = x.detach().requires_grad_(True)
        u = model(xx)[:, 0]
        (g,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0][:, i]
                  for i in range(x.shape[1]))
        return grads(((lap - f) ** 2).mean())

    return ours, {"vmap(torch.func.hessian) + trace": func, "autograd.grad loop (create_graph)": loop}


def _max_rel(a, b):
    return max(((p - q).abs().max() / max(q.abs().max().item(), 1e-30)).item() for p, q in zip(a, b))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batches / 8 and short timings")
    args = p.parse_args()
    run_time = 0.2 if args.quick else 1.0
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          "float32 timings")
    for name, d, hidden, act, B in SHAPES:
        if args.quick:
            B = max(8, B // 8)
        # Agreement first: float64 (tight) and float32 (the timed dtype).
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
            model, x, f = _problem(d, hidden, act, min(B, 256), dtype)
            ours, others = routes(model, x, f)
            ref = ours()
            for bname, fn in others.items():
                err = _max_rel(ref, fn())
                assert err <= tol, f"{name}: {bname} gradients disagree with hessmlp ({dtype}: {err:.2e})"
        model, x, f = _problem(d, hidden, act, B, torch.float32)
        ours, others = routes(model, x, f)
        print(f"\n{name}: batch {B}")
        t_ours = median_seconds(ours, run_time)
        print(f"  {'hessmlp.laplacian':<36} {t_ours * 1e3:10.2f} ms")
        for bname, fn in others.items():
            t = median_seconds(fn, run_time)
            print(f"  {bname:<36} {t * 1e3:10.2f} ms   ratio {t / t_ours:6.1f}x")


if __name__ == "__main__":
    main()
