"""GPU benchmark: hessmlp against vmap(torch.func.hessian), eager and under torch.compile,
for the full Hessian, the Laplacian and a PINN training step, on the PINN shape
(d=3, 4 tanh layers of 128, m=1), float32, B from 2^14 to 2^20.

Agreement with a float64 reference is asserted before anything is timed. Times are
medians (torch.utils.benchmark, which synchronises CUDA); ratios are baseline /
hessmlp (above 1: hessmlp faster). Achieved FLOP/s counts the closed form's GEMM
work and is compared with the fp32 peak measured here (a large torch.mm, TF32 off).
Writes a markdown table to benchmarks/results/.

    python benchmarks/bench_gpu.py              # on cuda
    python benchmarks/bench_gpu.py --quick      # two batch sizes
    python benchmarks/bench_gpu.py --device cpu --quick --max-log2 10   # a dry run anywhere
"""
import argparse
import os
import platform

import torch
from torch.utils import benchmark

import hessmlp

D, WIDTHS = 3, [128, 128, 128, 128]


def median_s(fn, min_run_time):
    fn()
    # Timer runs on one thread unless told otherwise: time with the threads torch uses.
    return benchmark.Timer(stmt="fn()", globals={"fn": fn},
                           num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def jet_flops(B, d, widths, cols):
    """Multiply-adds x 2 of the forward jet's GEMMs: x W_0^T, then W_l over `cols` columns."""
    f = d * widths[0] + sum(widths[l] * widths[l - 1] * cols for l in range(1, len(widths)))
    return 2.0 * B * f


def peak_flops(device):
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = median_s(lambda: torch.mm(a, b), 0.5)
    return 2.0 * n ** 3 / t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--min-log2", type=int, default=14)
    p.add_argument("--max-log2", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    run_time = 0.2 if args.quick else 0.5
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_flops(device)
    head = (f"# hessmlp on {name}\n\ntorch {torch.__version__}, float32, TF32 off, PINN shape d={D}, "
            f"widths {WIDTHS}, tanh, m=1"
            + (f"; measured fp32 peak {peak / 1e12:.1f} TFLOP/s (torch.mm 8192^3)" if peak else "") + "\n")
    print(head)

    torch.manual_seed(0)
    model64 = hessmlp.MLP(D, WIDTHS, 1, activation="tanh").double().to(device)
    model = hessmlp.MLP(D, WIDTHS, 1, activation="tanh").to(device)
    model.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    params = dict(model.named_parameters())
    plist = list(params.values())

    def u(p_, xi):
        return torch.func.functional_call(model, p_, (xi,))[0]

    func_h = torch.func.vmap(torch.func.hessian(u, argnums=1), in_dims=(None, 0))

    def func_hessian(x):
        return func_h(params, x)

    def func_lap(x):
        return func_h(params, x).diagonal(dim1=-2, dim2=-1).sum(-1)

    def ours_step(x, f):
        lap = hessmlp.laplacian(model, x, output=0)
        return torch.autograd.grad(((lap - f) ** 2).mean(), plist, allow_unused=True)

    def func_step(x, f):
        return torch.autograd.grad(((func_lap(x) - f) ** 2).mean(), plist, allow_unused=True)

    compiled = {}
    if not args.no_compile:
        compiled = {"hessian": torch.compile(func_hessian), "laplacian": torch.compile(func_lap)}

    # Agreement first, against float64, on fresh random points.
    xs = torch.rand(4096, D, device=device) * 2 - 1
    H64 = hessmlp.hessian(model64, xs.double())[:, 0]
    for what, got in (("hessmlp", hessmlp.hessian(model, xs)[:, 0]), ("torch.func", func_hessian(xs))):
        err = ((got.double() - H64).abs().max() / H64.abs().max()).item()
        assert err < 1e-4, f"{what} full Hessian disagrees with float64 ({err:.2e})"
    ref64 = torch.func.vmap(torch.func.hessian(lambda v: model64(v)[0]))(xs[:256].double())
    err = ((H64[:256] - ref64).abs().max() / ref64.abs().max()).item()
    assert err < 1e-10, f"hessmlp float64 disagrees with torch.func float64 ({err:.2e})"
    f = torch.sin(3 * xs).sum(1)
    g1, g2 = ours_step(xs, f), func_step(xs, f)
    for a, b in zip(g1, g2):
        if b is not None:
            assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < 2e-3, "step grads differ"

    rows = []
    hi = min(args.max_log2, 16) if args.quick else args.max_log2
    logs = [args.min_log2, hi] if args.quick else range(args.min_log2, hi + 1, 2)
    for lg in logs:
        B = 2 ** lg
        x = torch.rand(B, D, device=device) * 2 - 1
        f = torch.sin(3 * x).sum(1)
        cases = {
            "hessian": (lambda: hessmlp.hessian(model, x), lambda: func_hessian(x), 1 + D + D * (D + 1) // 2),
            "laplacian": (lambda: hessmlp.laplacian(model, x), lambda: func_lap(x), 1 + D + 1),
            "train step": (lambda: ours_step(x, f), lambda: func_step(x, f), 1 + D + 1),
        }
        for what, (ours, theirs, cols) in cases.items():
            t_ours = median_s(ours, run_time)
            flops = jet_flops(B, D, WIDTHS, cols)
            if what == "train step":
                flops *= 3  # the forward GEMM and the backward's two per layer
            row = {"B": B, "what": what, "hessmlp ms": t_ours * 1e3,
                   "TFLOP/s": flops / t_ours / 1e12}
            for label, fn in (("func eager", theirs), ("func compiled", compiled.get(what))):
                if fn is None:
                    row[label] = None
                    continue
                try:
                    call = fn if label == "func eager" else (lambda fn=fn: fn(x))
                    row[label] = median_s(call, run_time) / t_ours
                except torch.OutOfMemoryError:
                    row[label] = "OOM"
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001  (a baseline that fails to compile)
                    row[label] = type(e).__name__
            rows.append(row)
            print(row, flush=True)

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.1f}x" if isinstance(v, float) else str(v)

    table = ["| B | quantity | hessmlp ms | vs func eager | vs func compiled | TFLOP/s"
             + (" | % of peak |" if peak else " |"),
             "|---|---|---|---|---|---" + ("|---|" if peak else "|")]
    for r in rows:
        line = (f"| 2^{r['B'].bit_length() - 1} | {r['what']} | {r['hessmlp ms']:.3f} | {fmt(r['func eager'])} "
                f"| {fmt(r['func compiled'])} | {r['TFLOP/s']:.2f}")
        line += f" | {100 * r['TFLOP/s'] * 1e12 / peak:.0f}% |" if peak else " |"
        table.append(line)
    text = head + "\n" + "\n".join(table) + "\n"
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    fname = os.path.join(args.out, f"gpu_{name.replace(' ', '_').replace('/', '_')}.md")
    with open(fname, "w") as fh:
        fh.write(text)
    print("written", fname)


if __name__ == "__main__":
    main()
