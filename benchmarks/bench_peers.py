"""hessmlp against every peer on the suite's peer cases, side by side in one process.

    python benchmarks/bench_peers.py [--quick]    # writes benchmarks/results/peers_cpu.md

Peers (optional extras, pip install .[peers]; each one missing is skipped with a note):
torch.func (vmap of hessian; eager and under torch.compile), JAX (jit of vmap of jax.hessian),
folx (JAX's forward Laplacian), hessQuik (its own networks, given the same weights), and
jet-for-pytorch where it installs (it needs Python >= 3.12). Every peer's result is first
checked against hessmlp's (float32, 1e-3 relative to the largest entry; the training steps'
gradients too), then all of a case's routes are timed in interleaved rounds; a ratio is the
median over the rounds of peer time / hessmlp time within the round (above 1: hessmlp faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import hessmlp
from hessmlp import bench

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOL = 1e-3


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _mlp(d: int, widths: List[int], m: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [d] + widths + [m]
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _linears(model):
    return [mod for mod in model if isinstance(mod, nn.Linear)]


def _err(a, b) -> float:
    a = torch.as_tensor(a).detach().float().reshape(-1)
    b = torch.as_tensor(b).detach().float().reshape(-1)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- the routes of a case

class Case:
    """One peer case: what is computed (kind: 'laplacian', 'hessian' (all outputs or one),
    'train' (a Laplacian loss's gradients w.r.t. every parameter)) for a tanh MLP."""

    def __init__(self, name: str, d: int, widths: List[int], m: int, B: int, kind: str,
                 output: Optional[int] = None):
        self.name, self.kind, self.output = name, kind, output
        self.model = _mlp(d, widths, m)
        self.x = torch.rand(B, d) * 2 - 1
        self.f = torch.sin(3 * self.x).sum(1)
        # The training steps' gradients: every parameter but the output bias (the Laplacian
        # does not depend on it; torch.compile cannot materialize its zero gradient).
        self.params = list(self.model.parameters())[:-1]

    # -- hessmlp and torch.func
    def hessmlp(self) -> Callable[[], object]:
        model, x, out = self.model, self.x, self.output
        if self.kind == "laplacian":
            return lambda: hessmlp.laplacian(model, x, output=0)
        if self.kind == "hessian":
            def run():
                with torch.no_grad():
                    return hessmlp.hessian(model, x, output=out)
            return run
        f, params = self.f, self.params
        return lambda: torch.autograd.grad(
            ((hessmlp.laplacian(model, x, output=0) - f) ** 2).mean(), params)

    def func(self) -> Callable[[], object]:
        model, x, out, kind = self.model, self.x, self.output, self.kind
        named = dict(model.named_parameters())

        def H(p, xs, output):
            g = (lambda v: torch.func.functional_call(model, p, (v,))) if output is None else (
                lambda v: torch.func.functional_call(model, p, (v,))[output])
            return torch.func.vmap(torch.func.hessian(g))(xs)

        if kind == "laplacian":
            return lambda: H(named, x, 0).diagonal(dim1=-2, dim2=-1).sum(-1)
        if kind == "hessian":
            def run():
                with torch.no_grad():
                    return H({k: v.detach() for k, v in named.items()}, x, out)
            return run
        f, params = self.f, self.params
        return lambda: torch.autograd.grad(
            ((H(named, x, 0).diagonal(dim1=-2, dim2=-1).sum(-1) - f) ** 2).mean(), params)

    # -- JAX and folx
    def jax_routes(self) -> Dict[str, Callable[[], object]]:
        import jax
        import jax.numpy as jnp

        params = [(jnp.asarray(lin.weight.detach().numpy()), jnp.asarray(lin.bias.detach().numpy()))
                  for lin in _linears(self.model)]
        x = jnp.asarray(self.x.numpy())
        f = jnp.asarray(self.f.numpy())

        def mlp(p, v):
            for W, b in p[:-1]:
                v = jnp.tanh(W @ v + b)
            W, b = p[-1]
            return W @ v + b

        def lap_hessian(p, v):
            return jnp.trace(jax.hessian(lambda u: mlp(p, u)[0])(v))

        routes = {}
        if self.kind == "hessian":
            out = self.output
            g = (lambda p, v: mlp(p, v)) if out is None else (lambda p, v: mlp(p, v)[out])
            fn = jax.jit(jax.vmap(jax.hessian(g, argnums=1), in_axes=(None, 0)))
            routes["JAX jit(vmap(hessian))"] = lambda: fn(params, x).block_until_ready()
            return routes
        lap_h = jax.vmap(lap_hessian, in_axes=(None, 0))
        lap_f = None
        if _have("folx"):
            import folx

            def lap_folx_one(p, v):
                return folx.forward_laplacian(lambda u: mlp(p, u)[0], sparsity_threshold=0)(v).laplacian

            lap_f = jax.vmap(lap_folx_one, in_axes=(None, 0))
        if self.kind == "laplacian":
            fh = jax.jit(lap_h)
            routes["JAX jit(vmap(trace(hessian)))"] = lambda: fh(params, x).block_until_ready()
            if lap_f is not None:
                ff = jax.jit(lap_f)
                routes["folx forward_laplacian (jit, vmap)"] = lambda: ff(params, x).block_until_ready()
            return routes

        def grads(lap):
            g = jax.jit(jax.grad(lambda p: jnp.mean((lap(p, x) - f) ** 2)))

            def run():
                out = g(params)
                jax.block_until_ready(out)
                # as torch's order: weight, bias per layer (but the output bias)
                return [a for W, b in out for a in (W, b)][:-1]
            return run

        routes["JAX jit(grad(loss of trace(hessian)))"] = grads(lap_h)
        if lap_f is not None:
            routes["folx jit(grad(loss of forward_laplacian))"] = grads(lap_f)
        return routes

    # -- hessQuik
    def hessquik(self):
        import hessQuik.activations as act
        import hessQuik.layers as lay
        import hessQuik.networks as net

        lins = _linears(self.model)
        layers = []
        for i, lin in enumerate(lins):
            a = act.tanhActivation() if i < len(lins) - 1 else act.identityActivation()
            layer = lay.singleLayer(lin.in_features, lin.out_features, act=a)
            with torch.no_grad():
                layer.K.copy_(lin.weight.t())
                layer.b.copy_(lin.bias)
            layers.append(layer)
        hq = net.NN(*layers)
        x, out = self.x, self.output
        if self.kind == "hessian":
            # hessQuik's Hessian forms n x n x n' (forward mode) or n x n x n (backward mode)
            # per layer and sample: too much memory past a few GB.
            n = max(lin.in_features for lin in lins)
            need = 3 * x.shape[0] * n ** 3 * 4
            if need > 4e9:
                return f"needs about {need / 1e9:.0f} GB (n^3 per sample and layer)"

            def run():
                with torch.no_grad():
                    _, _, d2f = hq(x, do_gradient=True, do_Hessian=True)
                H = d2f.permute(0, 3, 1, 2)  # (B, d, d, m) -> (B, m, d, d)
                return H if out is None else H[:, out]
            return run
        if self.kind == "laplacian":
            def lap():
                _, _, lap_ = hq(x, do_gradient=True, do_Laplacian=True)
                return lap_.reshape(x.shape[0], -1)[:, 0]
            return lap
        f, ps = self.f, [p for layer in layers for p in (layer.K, layer.b)][:-1]

        def step():
            _, _, lap_ = hq(x, do_gradient=True, do_Laplacian=True)
            gs = torch.autograd.grad(((lap_.reshape(x.shape[0], -1)[:, 0] - f) ** 2).mean(), ps)
            return [g.t() if i % 2 == 0 else g for i, g in enumerate(gs)]  # K = W^T
        return step


def _result(x):
    """A route's result as one flat float32 tensor (a list of gradients concatenated)."""
    if isinstance(x, (list, tuple)):
        return torch.cat([torch.as_tensor(_np(v)).reshape(-1) for v in x])
    return torch.as_tensor(_np(x)).reshape(-1)


def _np(v):
    if isinstance(v, torch.Tensor):
        return v.detach().float()
    import numpy as np
    return torch.from_numpy(np.asarray(v, dtype=np.float32))


def case_routes(case: Case, notes: List[str]) -> List[Tuple[str, Callable[[], object]]]:
    """The peers of a case that are installed and run, with notes on the others."""
    routes = [("torch.func vmap(hessian)", case.func())]
    try:
        torch._dynamo.reset()
        routes.append(("torch.compile(torch.func route)", torch.compile(case.func())))
    except Exception as e:  # noqa: BLE001  (a peer that fails is reported, not fatal)
        notes.append(f"{case.name}: torch.compile of the torch.func route failed ({type(e).__name__})")
    if _have("jax"):
        routes += list(case.jax_routes().items())
    if _have("hessQuik"):
        hq = case.hessquik()
        if isinstance(hq, str):
            notes.append(f"{case.name}: hessQuik not run: it {hq}")
        else:
            routes.append(("hessQuik", hq))
    return routes


def peer_cases(quick: bool) -> List[Case]:
    q = 4 if quick else 1
    return [
        Case(f"PINN Laplacian (d=3, 4x128 tanh, B={4096 // q})", 3, [128] * 4, 1, 4096 // q, "laplacian"),
        Case(f"PINN full Hessian (d=3, 4x128 tanh, B={4096 // q})", 3, [128] * 4, 1, 4096 // q, "hessian"),
        Case(f"PINN training step (Laplacian loss, B={4096 // q})", 3, [128] * 4, 1, 4096 // q, "train"),
        Case(f"small PINN training step (d=2, 3x32, B={1024 // q})", 2, [32] * 3, 1, 1024 // q, "train"),
        Case("forum 784-512-512-10, B=16, all 10 outputs", 784, [512, 512], 10, 16, "hessian"),
        Case("forum 784-512-512-10, B=16, class 2", 784, [512, 512], 10, 16, "hessian", output=2),
        Case(f"Laplacian d=50, 768-768-512-512 tanh, B={256 // q}", 50, [768, 768, 512, 512], 1,
             256 // q, "laplacian"),
    ]


def peer_rows(quick: bool = False, rounds: int = 5, run_time: float = 0.5,
              say: Callable[[str], None] = print) -> Tuple[List[tuple], List[str]]:
    """(case, peer, hessmlp ms, peer ms, ratio) rows, and notes on the peers not run."""
    notes = []
    if not _have("jax"):
        notes.append("JAX not installed: its rows are skipped (pip install .[peers])")
    elif not _have("folx"):
        notes.append("folx not installed: its rows are skipped (pip install .[peers])")
    if not _have("hessQuik"):
        notes.append("hessQuik not installed: its rows are skipped (pip install .[peers])")
    if not _have("jet"):
        notes.append("jet-for-pytorch not installed (it needs Python >= 3.12): its rows are skipped")
    rows = []
    for case in peer_cases(quick):
        ours = case.hessmlp()
        ref = _result(ours())
        routes = []
        for name, fn in case_routes(case, notes):
            print(f"  ({case.name}: checking {name})", file=sys.stderr, flush=True)
            try:
                err = _err(_result(fn()), ref)
            except Exception as e:  # noqa: BLE001
                notes.append(f"{case.name}: {name} failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            if err > TOL:
                notes.append(f"{case.name}: {name} disagrees with hessmlp (relative error {err:.1e}); "
                             "not timed")
                continue
            routes.append((name, fn))
        per = bench.interleaved_rounds([ours] + [fn for _, fn in routes], run_time, rounds)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        for k, (name, _) in enumerate(routes, start=1):
            row = (case.name, name, med(per[0]) * 1e3, med(per[k]) * 1e3,
                   med([b / a for a, b in zip(per[0], per[k])]))
            say(peer_markdown(row))
            rows.append(row)
    return rows, notes


PEER_HEADER = "| case | peer | hessmlp ms | peer ms | peer / hessmlp |\n|---|---|---|---|---|"


def peer_markdown(row) -> str:
    case, name, t, tp, r = row
    return f"| {case} | {name} | {t:.3f} | {tp:.3f} | {r:.2f}x |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    print(f"{bench.cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(PEER_HEADER)
    rows, notes = peer_rows(args.quick, run_time=0.3 if args.quick else 1.0)
    text = [f"# hessmlp against its peers (CPU, float32)", "",
            f"{bench.cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
            f"{' (--quick)' if args.quick else ''}.", "", PEER_HEADER]
    text += [peer_markdown(r) for r in rows]
    text += [""] + [f"- {n}" for n in notes]
    for n in notes:
        print("-", n)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers_cpu.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
