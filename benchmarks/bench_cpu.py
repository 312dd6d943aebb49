"""CPU benchmark: hessmlp's full Hessian against the ways users compute it today.

For each shape: asserts every method agrees with hessmlp first, then times the
medians (torch.utils.benchmark) in this one process and prints the ratios
(baseline time / hessmlp time; above 1 means hessmlp is faster).

    python benchmarks/bench_cpu.py            # all shapes
    python benchmarks/bench_cpu.py --quick    # small batches, short timings
"""
import argparse
import platform

import torch

import hessmlp
from hessmlp.bench import baselines, median_seconds, relative_error

SHAPES = [
    # name, d, hidden, m, batch, activation, output
    ("PINN d=3 128x3 tanh", 3, [128, 128, 128], 1, 4096, "tanh", None),
    ("d=8 64x3 silu m=2", 8, [64, 64, 64], 2, 1024, "silu", None),
    ("forum 784-512-512-10, all outputs", 784, [512, 512], 10, 16, "tanh", None),
    ("forum 784-512-512-10, class 2", 784, [512, 512], 10, 16, "tanh", 2),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batches / 8 and short timings")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    run_time = 0.2 if args.quick else 1.0
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, {args.dtype}")
    for name, d, hidden, m, B, act, output in SHAPES:
        if args.quick:
            B = max(2, B // 8)
        torch.manual_seed(0)
        model = hessmlp.MLP(d, hidden, m, activation=act).to(dtype)
        for q in model.parameters():
            q.requires_grad_(False)
        x = torch.randn(B, d, dtype=dtype) * 0.5
        ours = lambda: hessmlp.hessian(model, x, output=output)  # noqa: E731
        H = ours()
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        print(f"\n{name}: batch {B}, output={output}")
        t_ours = median_seconds(ours, run_time)
        print(f"  {'hessmlp':<30} {t_ours * 1e3:10.2f} ms")
        for bname, fn in baselines(model, x, output).items():
            if bname == "autograd.functional.hessian" and d * B > 2000:
                print(f"  {bname:<30} skipped (its (B*d)^2 cross-sample Hessian would not fit)")
                continue
            err = relative_error(H, fn())
            assert err <= tol, f"{name}: {bname} disagrees with hessmlp (relative error {err:.2e})"
            t = median_seconds(fn, run_time)
            print(f"  {bname:<30} {t * 1e3:10.2f} ms   ratio {t / t_ours:6.1f}x   (rel. diff {err:.1e})")


if __name__ == "__main__":
    main()
