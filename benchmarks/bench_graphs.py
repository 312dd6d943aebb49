"""Graph networks (docs/design.md §9) against the torch.func routes, on the CPU (or --device).

Rows: a residual PINN (d=3, 4 blocks of 128, tanh), an SDF network (d=3, positional encoding
with 6 frequencies, 8 layers of 256 with softplus(beta=100), the encoding concatenated again
at layer 4, as IGR / NeuS write it) and a Fourier-feature PINN (d=2, 64 random features,
3x128 tanh); for each: the Laplacian, the full Hessian, and a training step of a Laplacian
loss (forward and backward w.r.t. every parameter). Baselines: vmap(torch.func.hessian) and,
for the step, autograd through it. Agreement with the float64 torch.func result is asserted
before timing; times are medians over interleaved rounds (hessmlp.bench.interleaved),
ratios baseline / hessmlp (above 1: hessmlp faster), float32. Writes a markdown table.

    python benchmarks/bench_graphs.py                 # benchmarks/results/graphs_<device>.md
    python benchmarks/bench_graphs.py --quick         # smaller batches, fewer rounds
"""
import argparse
import math
import os
import platform

import torch
from torch import nn

import hessmlp
from hessmlp.bench import relative_error, timed_row, write_rows


class SkipSDF(nn.Module):
    def __init__(self, freqs=6, width=256, depth=8, skip=4):
        super().__init__()
        self.enc = hessmlp.FourierFeatures(3, "positional", frequencies=freqs, include_input=True)
        e = self.enc.out_features
        self.skip = skip
        dims = [e] + [width] * depth
        self.layers = nn.ModuleList()
        for i in range(depth):
            out = dims[i + 1] - (e if i + 1 == skip else 0)
            self.layers.append(nn.Linear(dims[i], out))
        self.out = nn.Linear(width, 1)
        self.act = nn.Softplus(beta=100)

    def forward(self, x):
        e = self.enc(x)
        h = e
        for i, layer in enumerate(self.layers):
            if i == self.skip:
                h = torch.cat([h, e], dim=-1) / math.sqrt(2)
            h = self.act(layer(h))
        return self.out(h)


def models():
    torch.manual_seed(0)
    return [
        ("residual PINN", hessmlp.ResidualMLP(3, width=128, blocks=4), 3),
        ("SDF skip-concat", SkipSDF(), 3),
        ("Fourier PINN", nn.Sequential(hessmlp.FourierFeatures(2, features=64, sigma=1.0),
                                       hessmlp.MLP(128, [128, 128, 128], 1)), 2),
    ]


def func_hessian(model, x):
    return torch.func.vmap(torch.func.hessian(lambda v: model(v.unsqueeze(0))[0]))(x)


def graph_rows(B, rounds, run_time, device="cpu", say=print):
    """hessmlp.bench.timed_row's rows for each network and case, agreement asserted first."""
    device = torch.device(device)
    rows = []
    for name, model, d in models():
        model = model.to(device)
        x = torch.rand(B, d, device=device) * 2 - 1
        # Agreement in float64 first, then time in float32.
        m64 = model.double()
        ref = func_hessian(m64, x.double()[:64]).detach()
        err = relative_error(hessmlp.hessian(m64, x.double()[:64]), ref)
        assert err < 1e-10, f"{name}: hessmlp differs from torch.func by {err:.2e}"
        model = m64.float()
        params = [q for q in model.parameters() if q.requires_grad]
        cases = {
            "laplacian": (lambda: hessmlp.laplacian(model, x),
                          lambda: func_hessian(model, x).diagonal(dim1=-2, dim2=-1).sum(-1)),
            "full Hessian": (lambda: hessmlp.hessian(model, x), lambda: func_hessian(model, x)),
        }

        # A training step: a Laplacian loss and its gradients w.r.t. every parameter.
        # (The output layer's bias does not reach the Laplacian: torch.func leaves it out.)
        def step_ours():
            return torch.autograd.grad((hessmlp.laplacian(model, x) ** 2).mean(), params,
                                       allow_unused=True)

        def step_func():
            lap = func_hessian(model, x).diagonal(dim1=-2, dim2=-1).sum(-1)
            return torch.autograd.grad((lap ** 2).mean(), params, allow_unused=True)

        cases["train step"] = (step_ours, step_func)
        for what, (ours, theirs) in cases.items():
            with torch.set_grad_enabled(what == "train step"):
                a, b = ours(), theirs()
                if what == "train step":
                    dense = lambda g, q: (torch.zeros_like(q) if g is None else g).double()  # noqa: E731
                    e = max(relative_error(dense(u, q), dense(v, q)) for u, v, q in zip(a, b, params))
                else:
                    e = relative_error(a.double(), b.double())
                assert e < 1e-3, f"{name} {what}: float32 results differ by {e:.2e}"
                rows.append(timed_row(f"{name}: {what}", "torch.func", B, ours, theirs, rounds,
                                      run_time, say))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    B = 256 if args.quick else 1024
    rounds, run_time = (3, 0.2) if args.quick else (5, 0.5)
    rows = graph_rows(B, rounds, run_time, device, lambda s: print(s, flush=True))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"graphs_{device.type}.md")
    write_rows(path, f"Graph networks, {device.type}: hessmlp against vmap(torch.func.hessian)",
               "Agreement with torch.func asserted first (float64, 1e-10). Ratio: torch.func / "
               "hessmlp, medians of interleaved rounds.", rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
