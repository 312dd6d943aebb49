"""The public functions: hessian, hessian_diag, laplacian, jacobian, jet."""
from __future__ import annotations

import numbers
import weakref
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _cost, _memory, _ops  # (_ops also registers the fake kernels and autograd)
from ._memory import memory_budget, set_memory_budget
from ._graph import chain_layout, chain_network
from ._spec import UnsupportedModelError, unwrap

__all__ = ["Jet", "jet", "hessian", "hessian_diag", "laplacian", "jacobian", "hvp",
           "set_memory_budget", "memory_budget"]

_MODES = {"full": "full", "diag": "diag", "trace": "trace", None: "none"}
# (Mode 'cross', the pairs with a last direction, is internal: hvp's.)


class Jet(NamedTuple):
    """Value, Jacobian and (optionally) second-order part of a network at x.

    value    (B, m)          or (B,) with output=k
    jacobian (B, m, d)       or (B, d)
    hessian  (B, m, d, d) | (B, m, d) | (B, m) for 'full' | 'diag' | 'trace', None if not asked;
             the m dimension is dropped with output=k. Unbatched x drops B everywhere.
    """
    value: torch.Tensor
    jacobian: torch.Tensor
    hessian: Optional[torch.Tensor]


def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hessmlp: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (1, 2):
        raise ValueError(f"hessmlp: x must have shape (d,) or (B, d), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"hessmlp: x must be float32 or float64, got {x.dtype}; "
                        "convert it with x.float() or x.double()")
    return x


def _output_index(output, m: int) -> int:
    """output=k checked against the model's m outputs, as an index in 0 .. m - 1."""
    if isinstance(output, bool) or not isinstance(output, numbers.Integral):
        raise TypeError(f"hessmlp: output must be an int (an index into the {m} outputs) or None, "
                        f"got {type(output).__name__}")
    if not -m <= output < m:
        raise ValueError(f"hessmlp: output={output} is out of range for a model with {m} outputs")
    return int(output) % m


def _kernel_keys() -> tuple:
    """Dispatch keys this build has an mlp_jet kernel for (constant for the process)."""
    return tuple(k for k in ("CPU", "CUDA")
                 if torch._C._dispatch_has_kernel_for_dispatch_key("hessmlp::mlp_jet", k))


_KERNEL_KEYS = _kernel_keys()


def _check_backend(x: torch.Tensor) -> None:
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(x.device.type)
    if key is None or (key != "Meta" and key not in _KERNEL_KEYS):
        raise NotImplementedError(
            f"hessmlp: this build has no kernel for tensors on {x.device} (built for: "
            f"{', '.join(_KERNEL_KEYS)}); move the model and x to the CPU")


def _check_context() -> None:
    """Transforms hessmlp cannot run under, refused with what works instead."""
    if torch.compiler.is_compiling():
        return
    if torch.jit.is_tracing():
        raise RuntimeError(
            "hessmlp: torch.jit.trace cannot record hessmlp's calls (nor torch.jit.script compile "
            "them). Use torch.compile, which compiles hessmlp's ops, also with fullgraph=True.")
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            "hessmlp: torch.func transforms (grad, vmap, jacrev, jvp, functional_call under them) "
            "cannot run through hessmlp's ops. hessmlp is batched already and its results are "
            "differentiable by autograd: call it on the batch and use loss.backward() or "
            "torch.autograd.grad(loss, params) for gradients (torch.compile works too).")


def _joined_inputs(parts):
    """x given as (x, t, ...) for a forward of several tensor inputs: their concatenation along
    the features, and their widths."""
    if len(parts) < 2:
        raise ValueError("hessmlp: x given as a tuple must have two or more tensors, one per input "
                         "of the model's forward")
    for i, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"hessmlp: x[{i}] must be a torch.Tensor, got {type(t).__name__}")
    dims = {t.dim() for t in parts}
    if len(dims) != 1 or dims.pop() not in (1, 2) or (parts[0].dim() == 2 and len(
            {t.shape[0] for t in parts}) != 1):
        raise ValueError("hessmlp: the tensors of x must all have shape (B, d_i) with one B, or all "
                         f"(d_i,); got {[tuple(t.shape) for t in parts]}")
    return torch.cat(parts, dim=-1), tuple(t.shape[-1] for t in parts)


def _graph_network(model: nn.Module, x: torch.Tensor, input_widths, records):
    """The graph of ``model`` (docs/design.md §9) from its records, checked against x, and its
    chain layout (None: not a chain)."""
    from . import _graph_reader

    d = x.shape[-1]
    try:
        if torch.compiler.is_compiling():
            graph = _graph_reader.graph_of(model, d, input_widths, records)
            layout = chain_layout(graph.nodes)
        else:
            graph, layout = _graph_reader.planned_graph(model, d, input_widths, records)
    except ValueError as e:  # (UnsupportedModelError included)
        raise e from None
    dtype, device = x.dtype, x.device
    if all(t.dtype == dtype and t.device == device for t in graph.tensors):
        nodes = ()  # (the common case: nothing to name)
    else:
        nodes = graph.nodes
    for node in nodes:
        names = ("weight", "bias") if node.kind == "linear" else ("scale", "shift")
        for name, i in zip(names, node.tensors):
            t = None if i < 0 else graph.tensors[i]
            if t is None:
                continue
            where = node.where or node.kind
            if t.dtype != x.dtype:
                raise TypeError(f"hessmlp: x is {x.dtype} but the {name} of {where} is {t.dtype}; "
                                f"convert one of them (model.to({x.dtype}) or x.to({t.dtype}))")
            if t.device != x.device:
                raise ValueError(f"hessmlp: x is on {x.device} but the {name} of {where} is on "
                                 f"{t.device}; move them to one device")
    for where, dtype in graph.dtypes:
        if dtype != x.dtype:
            raise UnsupportedModelError(
                f"hessmlp: the conversion to {dtype} at {where} would change x's dtype {x.dtype}; "
                f"pass x as {dtype} (and the model in {dtype})")
    return graph, layout


def _run_graph(graph, x: torch.Tensor, mode: str, output, method: str, seed=None) -> Jet:
    """hessmlp's functions on a graph network: the op graph_jet (forward jets), along the
    directions of seed ((k, d), or (B, k, d) for batched x; None: the unit vectors)."""
    from ._graph import Graph, Node, op_arguments

    if method not in ("auto", "forward"):
        raise ValueError(f"hessmlp: method={method!r} serves chains of layers only (and whole "
                         "Hessians); a graph network (residual, concatenation, products), derivatives "
                         "along chosen inputs or directions take method='forward' or 'auto'")
    if output is not None:  # a last node selecting output k
        k = _output_index(output, graph.m)
        graph = Graph(graph.nodes + [Node("select", (len(graph.nodes) - 1,), 1, index=(k,))], graph.tensors,
                      graph.dtypes)
    batched = x.dim() == 2
    xb = x if batched else x.unsqueeze(0)
    B, d = xb.shape
    k = d if seed is None else seed.shape[-2]
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xb, *graph.tensors, *([] if seed is None else [seed])))
    # Memory: every node's columns, as the backward keeps them.
    widths = [sum(n.width for n in graph.nodes), graph.m]
    # (hvp's adjoint: the jets along v with the backward's working memory.)
    _, rows = _memory.plan(B, k, widths, "none" if mode == "hvp" else mode, "forward", xb, output,
                           save or mode == "hvp", forward_only=True)
    kinds, program, consts = op_arguments(graph)
    per_sample = seed is not None and seed.dim() == 3

    def run(b0, b1):
        u = seed[b0:b1] if per_sample else seed
        xc = xb[b0:b1] if (b0, b1) != (0, B) else xb
        if mode == "hvp":
            return _hvp_adjoint(graph, xc, u, kinds, program, consts)
        return torch.ops.hessmlp.graph_jet(xc, graph.tensors, kinds, program, consts, mode, u)

    return _jet_of_calls(run, xb, rows, mode, output, batched)


def _hvp_adjoint(graph, x, v, kinds, program, consts):
    """H v of each output by the forward jets along v alone (value and J v: mode none, one
    direction) and their adjoint w.r.t. x for dJv/dx = H v (graph_jet_backward, one call per
    output). As (value, jacobian, H v [B, m, d]) for _jet_of_calls; value and jacobian are
    not computed (left empty)."""
    B, m = x.shape[0], graph.m
    needs = [True] + [False] * len(graph.tensors) + [False]
    out = []
    for k in range(m):
        gj = x.new_zeros((B, m, 1))
        gj[:, k] = 1
        gx, _, _ = torch.ops.hessmlp.graph_jet_backward(None, gj, None, x, graph.tensors, kinds,
                                                        program, consts, "none", v, needs)
        out.append(gx)
    return x.new_empty((B, m)), x.new_empty((B, m, 1)), torch.stack(out, dim=1)


def _jet_of_calls(run, xb: torch.Tensor, rows: int, mode: str, output, batched: bool) -> Jet:
    """The op's results (run(b0, b1) -> value, jacobian, hessian of samples b0 .. b1 - 1) for
    the batch, rows samples a call, in the shapes the public functions return."""
    B = xb.shape[0]
    if rows >= B:
        value, jac, hess = run(0, B)
    else:
        parts = [run(b0, min(b0 + rows, B)) for b0 in range(0, B, rows)]
        value, jac, hess = (torch.cat([p[k] for p in parts]) for k in range(3))
    if mode == "none":
        hess = None
    if output is not None:
        value, jac = value[:, 0], jac[:, 0]
        hess = None if hess is None else hess[:, 0]
    if not batched:
        value, jac = value[0], jac[0]
        hess = None if hess is None else hess[0]
    return Jet(value, jac, hess)


def _inputs(x):
    """(x, the widths of its parts when given as a tuple of a forward's inputs, else None)."""
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        # forward(self, x, t, ...): w.r.t. their concatenation
        x, input_widths = _joined_inputs(x)
        return _check_x(x), input_widths
    return _check_x(x), None


def _wrt_index(wrt, d: int) -> Tuple[int, ...]:
    """wrt checked: distinct input indices (negative ones count from the end), in order."""
    if isinstance(wrt, torch.Tensor):
        if wrt.dim() != 1 or wrt.dtype.is_floating_point or wrt.dtype == torch.bool or wrt.is_complex():
            raise TypeError(f"hessmlp: wrt must be a sequence of int input indices; got a tensor of "
                            f"shape {tuple(wrt.shape)} and dtype {wrt.dtype}")
        wrt = wrt.tolist()
    if isinstance(wrt, (str, bytes)) or not hasattr(wrt, "__iter__"):
        raise TypeError(f"hessmlp: wrt must be a sequence of int input indices (e.g. wrt=[0, 1]), "
                        f"got {type(wrt).__name__}")
    wrt = list(wrt)
    for i in wrt:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"hessmlp: wrt must hold int input indices, got {i!r} "
                            f"({type(i).__name__}) in wrt={wrt}")
    if not wrt:
        raise ValueError("hessmlp: wrt is empty; name at least one input index, or leave wrt=None "
                         "for all inputs")
    bad = [i for i in wrt if not -d <= i < d]
    if bad:
        raise ValueError(f"hessmlp: wrt={wrt} has indices out of range for x with d={d} inputs: "
                         f"{bad}")
    index = tuple(int(i) % d for i in wrt)
    if len(set(index)) != len(index):
        raise ValueError(f"hessmlp: wrt={wrt} repeats an input; each index may appear once")
    return index


def _select_wrt(jet: Jet, index, mode: str) -> Jet:
    """A whole-input jet restricted to the inputs of index (mode 'trace': from the diagonal)."""
    idx = torch.tensor(index, device=jet.jacobian.device)
    hess = jet.hessian
    if mode == "full":
        hess = hess.index_select(-1, idx).index_select(-2, idx)
    elif mode in ("diag", "trace"):
        hess = hess.index_select(-1, idx)
        if mode == "trace":
            hess = hess.sum(-1)
    return Jet(jet.value, jet.jacobian.index_select(-1, idx), hess)


# Per model (weakly): the plans of its eager chain calls, by call signature.
_CALLS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# A call plan keeps its (method, rows) per batch size when the call's working memory is at
# most this (a larger call plans again each time, with the free memory of that moment).
_KEEP_PLAN_BYTES = 64 << 20


def _chain_jet(x: torch.Tensor, weights, biases, args, tensors, mode: str, output, method: str,
               plans: Optional[dict] = None) -> Jet:
    """A chain's jets by the op mlp_jet. weights, biases: chain_network's (all outputs);
    args: its (stage_sizes, act_codes, act_params); tensors: the graph's (whether gradients
    flow); plans: where to keep (method, rows) by (B, gradient flag, budget) (a
    _ChainCall's), or None."""
    if output is not None:  # (views made each call: .data may change)
        k = _output_index(output, weights[-1].shape[0])
        b = biases[-1]
        weights = weights[:-1] + [weights[-1][k:k + 1]]
        biases = biases[:-1] + [None if b is None else b[k:k + 1]]
    batched = x.dim() == 2
    xb = x if batched else x.unsqueeze(0)
    B, d = xb.shape
    widths = [W.shape[0] for W in weights]
    # Training through the result: the backward is the adjoint of the forward jets, which
    # saves each layer's state; after reverse-Gram the backward recomputes it.
    save = torch.is_grad_enabled() and (xb.requires_grad or any(t.requires_grad for t in tensors))
    key = (B, save, _memory.budget())
    plan = None if plans is None else plans.get(key)
    if plan is None:
        plan = _memory.plan(B, d, widths, mode, method, xb, output, save)
        if plans is not None and plan[1] >= B and _cost.working_bytes(
                B, d, widths, mode, plan[0], xb.element_size(), save) <= _KEEP_PLAN_BYTES:
            plans[key] = plan
    method, rows = plan
    if save and any(b is None for b in biases) and any(b is not None for b in biases):
        # Autograd cannot track a list that mixes None and tensors (see _ops.py).
        biases = [xb.new_zeros(W.shape[0]) if b is None else b for W, b in zip(weights, biases)]
    stage_sizes, codes, params = args

    def run(b0, b1):
        xc = xb[b0:b1] if (b0, b1) != (0, B) else xb
        return _ops.mlp_jet(xc, weights, biases, stage_sizes, codes, params, mode, method,
                            save)[:3]

    return _jet_of_calls(run, xb, rows, mode, output, batched)


class _ChainCall:
    """An eager chain call's plan, kept per model and call signature (x's width and the
    forward's input widths, mode, output, method, dtype, device) while the model's records
    are the same (the fingerprint holds the model's parameters and buffers by identity) and
    its tensors are those parameters and buffers themselves: the op's arguments but x, read
    once, and (method, rows) per batch size, gradient flag and memory budget. Each call
    checks the tensors' shapes, dtypes and devices (.data and .to() change them in place)."""
    __slots__ = ("records", "tensors", "shapes", "weights", "biases", "args", "mode", "output",
                 "method", "plans")

    def __init__(self, records, tensors, layout, mode, output, method):
        self.records, self.tensors = records, tensors
        self.shapes = [t.shape for t in tensors]
        net = chain_network(layout, tensors)
        if output is not None:  # (refused before it is kept)
            _output_index(output, net.weights[-1].shape[0])
        self.weights, self.biases = net.weights, net.biases
        self.args = (net.stage_sizes, net.act_codes, net.act_params)
        self.mode, self.output, self.method = mode, output, method
        self.plans = {}

    def current(self, records, x: torch.Tensor) -> bool:
        if records is not self.records:
            return False
        dtype, device = x.dtype, x.device
        return all(t.shape == s and t.dtype == dtype and t.device == device
                   for t, s in zip(self.tensors, self.shapes))

    def run(self, x: torch.Tensor) -> Jet:
        return _chain_jet(x, self.weights, self.biases, self.args, self.tensors, self.mode,
                          self.output, self.method, self.plans)


def _run(model: nn.Module, x, hessian: Optional[str], output, method: str, wrt=None,
         directions=None) -> Jet:
    """The public functions' work. wrt: input indices; directions (internal): the seed of
    graph_jet, (k, d) or (B, k, d), instead."""
    from . import _graph_reader

    _check_context()
    x, input_widths = _inputs(x)
    if directions is not None and hessian in ("cross", "hvp"):
        mode = hessian  # (hvp's: the pairs with v; or forward along v, then back)
    elif not (hessian is None or isinstance(hessian, str)) or hessian not in _MODES:
        raise ValueError(f"hessmlp: hessian must be 'full', 'diag', 'trace' or None, got {hessian!r}")
    else:
        mode = _MODES[hessian]
    if not isinstance(model, nn.Module):
        raise TypeError(f"hessmlp: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in ("auto", "forward", "reverse"):
        raise ValueError(f"hessmlp: method must be 'auto', 'forward' or 'reverse', got {method!r}")
    index = None if wrt is None else _wrt_index(wrt, x.shape[-1])
    seed = directions
    if seed is None and index is not None:
        # The unit vectors of the inputs asked for: the jets carry k = len(wrt) directions.
        seed = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)[list(index)]
    model = unwrap(model)
    # One reader for every model (docs/design.md §9): its records (plain data, kept on the
    # model; under torch.compile a constant of the compiled code) give its graph; a graph that
    # is a chain runs through mlp_jet (blocked forward jets, reverse-Gram, saved state), any
    # other through graph_jet.
    compiling = torch.compiler.is_compiling()
    if compiling:
        records = _graph_reader.compiled_structure(model, input_widths)
    else:
        records = _graph_reader.structure(model, input_widths)
        if seed is None:  # a chain call planned before (_ChainCall)
            call_key = (x.shape[-1], input_widths, mode, output, method, x.dtype, x.device)
            calls = _CALLS.get(model)
            call = None if calls is None else calls.get(call_key)
            if call is not None and call.current(records, x):
                return call.run(x)
    graph, layout = _graph_network(model, x, input_widths, records)
    _check_backend(x)
    if seed is not None and layout is not None and method == "reverse" and directions is None:
        # A chain's inputs by reverse-Gram: the whole Hessian's (or diagonal's) entries of wrt.
        whole = _run(model, x, "diag" if mode == "trace" else hessian, output, method)
        return _select_wrt(whole, index, mode)
    if layout is None or seed is not None:
        return _run_graph(graph, x, mode, output, method, seed)
    if not compiling and layout.pre == (1.0, 0.0):
        fixed = _graph_reader.fixed_tensors(model, x.shape[-1], input_widths, records)
        if fixed is not None:  # every tensor a parameter or buffer itself: plan the call
            call = _ChainCall(records, fixed, layout, mode, output, method)
            _CALLS.setdefault(model, {})[call_key] = call
            return call.run(x)
    net = chain_network(layout, graph.tensors)
    return _chain_jet(x, net.weights, net.biases, (net.stage_sizes, net.act_codes, net.act_params),
                      graph.tensors, mode, output, method)


def _check_operand(name: str, t, one: Tuple[int, ...], x: torch.Tensor, what: str) -> None:
    """An operator's tensor argument: of shape one (every sample's) or (B, *one) for batched x,
    x's dtype and device; what: the shape's meaning, for the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"hessmlp: {name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = [one] + ([(x.shape[0], *one)] if x.dim() == 2 else [])
    if tuple(t.shape) not in shapes:
        raise ValueError(f"hessmlp: {name} must have shape {' or '.join(str(s) for s in shapes)} "
                         f"({what}), got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"hessmlp: {name} is {t.dtype} but x is {x.dtype}; convert {name} with "
                        f".to({x.dtype})")
    if t.device != x.device:
        raise ValueError(f"hessmlp: {name} is on {t.device} but x is on {x.device}")


def _weighted_laplacian(model, x, output, method, wrt, weights, matrix) -> torch.Tensor:
    """sum_i c_i d^2y/dx_i^2 (weights) or tr(A H) (matrix) over the inputs of wrt, by jets
    along the directions each needs (docs/design.md §10)."""
    if weights is not None and matrix is not None:
        raise ValueError("hessmlp: give weights (sum_i c_i d2y/dx_i^2) or matrix (tr(A H)), not both")
    xj, _ = _inputs(x)
    d, batched = xj.shape[-1], xj.dim() == 2
    index = tuple(range(d)) if wrt is None else _wrt_index(wrt, d)
    k = len(index)
    name, t = ("weights", weights) if weights is not None else ("matrix", matrix)
    one = (k,) if weights is not None else (k, k)
    _check_operand(name, t, one, xj,
                   f"{'one set per sample: ' if batched else ''}k = "
                   f"{'len(wrt)' if wrt is not None else 'd'} = {k}")
    per_sample = t.dim() == len(one) + 1
    # Per-sample weights or matrices meet results (B, m, ...) or, with output=k, (B, ...).
    fit = (lambda v: v.unsqueeze(1)) if per_sample and output is None else (lambda v: v)  # noqa: E731
    units = torch.eye(d, dtype=xj.dtype, device=xj.device)[list(index)]  # (k, d)
    compiling = torch.compiler.is_compiling()
    if weights is not None:
        c = weights
        if c.requires_grad or compiling or bool((c < 0).any()):
            # The diagonal's k entries, weighted (exact w.r.t. c; signs of every kind).
            diag = _run(model, x, "diag", output, method, wrt).hessian
            return (diag * fit(c)).sum(-1)
        # c >= 0: one trace along the directions sqrt(c_i) e_i.
        return _run(model, x, "trace", output, method,
                    directions=c.sqrt().unsqueeze(-1) * units).hessian
    A = (matrix + matrix.mT) / 2
    if A.requires_grad:
        # d tr(A H) / dA = H: the Hessian block, then the sum.
        hess = _run(model, x, "full", output, method, wrt).hessian
        return (hess * fit(A)).sum((-1, -2))
    # A = Q diag(lam) Q^T: tr(A H) = sum_j lam_j q_j^T H q_j, q_j in x's space: Q^T E.
    lam, Q = torch.linalg.eigh(A)
    U = Q.mT @ units
    if not compiling:
        # Only the directions A's rank needs (eigenvalues below rounding left out).
        tol = lam.abs().amax(-1, keepdim=True) * k * torch.finfo(lam.dtype).eps
        keep = (lam.abs() > tol).reshape(-1, k).any(0)
        if not bool(keep.any()):
            value = _run(model, x, None, output, method, wrt).value
            return torch.zeros_like(value)
        lam, U = lam[..., keep], U[..., keep, :]
        if bool((lam >= 0).all()):
            # Positive semidefinite: one trace along sqrt(lam_j) q_j.
            return _run(model, x, "trace", output, method,
                        directions=lam.sqrt().unsqueeze(-1) * U).hessian
    diag = _run(model, x, "diag", output, method, directions=U).hessian
    return (diag * fit(lam)).sum(-1)


def jet(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
        x: torch.Tensor, hessian: Optional[str] = "full", output: Optional[int] = None,
        method: str = "auto", wrt: Optional[Sequence[int]] = None) -> Jet:
    """Value, Jacobian and second derivatives of ``model`` at ``x`` in one pass.

    Args:
        model: a network of Linear layers and elementwise functions, as a chain or a graph
            (residuals, concatenations, products; see the README).
        x: (B, d) or (d,), float32 or float64; or a tuple (x, t, ...) of a forward's several
            inputs, taken as their concatenation.
        hessian: 'full' (B, m, k, k), 'diag' (B, m, k), 'trace' (B, m) or None.
        output: an int selects one output and drops the m dimension.
        method: 'auto' (default), 'forward' (forward jets) or 'reverse'
            (reverse-Gram; with hessian=None, backpropagation). Both are exact; 'auto' takes the
            cheaper by a measured cost model, and 'forward' when gradients will flow
            through the result (its backward needs the forward jets' state).
        wrt: derivatives w.r.t. these inputs only, in this order (k = len(wrt); default all
            d): the jets carry k directions, so the cost is that of a k-input network.
    """
    return _run(model, x, hessian, output, method, wrt)


def hessian(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
            x: torch.Tensor, output: Optional[int] = None,
            method: str = "auto", wrt: Optional[Sequence[int]] = None) -> torch.Tensor:
    """d^2 y / dx^2: (B, m, k, k), (B, k, k) with output=k; unbatched x drops B. wrt: the
    block of these inputs (mixed partials included), in this order; k = len(wrt), else d."""
    return _run(model, x, "full", output, method, wrt).hessian


def hessian_diag(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
                 x: torch.Tensor, output: Optional[int] = None,
                 method: str = "auto", wrt: Optional[Sequence[int]] = None) -> torch.Tensor:
    """d^2 y / dx_i^2: (B, m, k), (B, k) with output=k; unbatched x drops B. wrt: these
    inputs i only, in this order (k = len(wrt), else d)."""
    return _run(model, x, "diag", output, method, wrt).hessian


def laplacian(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
              x: torch.Tensor, output: Optional[int] = None,
              method: str = "auto", wrt: Optional[Sequence[int]] = None,
              weights: Optional[torch.Tensor] = None,
              matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Trace of the Hessian: (B, m), (B,) with output=k; unbatched x drops B.

    wrt: the sum over these inputs only (a spatial Laplacian without t). weights: c of shape
    (k,) or (B, k): sum_i c_i d^2y/dx_i^2. matrix: A of shape (k, k) or (B, k, k): tr(A H)
    (A's symmetric part counts: H is symmetric). k = len(wrt), else d; not both weights and
    matrix. Each costs only the directions it needs (unit vectors, sqrt(c_i) e_i, or A's
    eigenvectors: at most its rank); differentiable w.r.t. x, the parameters, c and A.
    """
    if weights is None and matrix is None:
        return _run(model, x, "trace", output, method, wrt).hessian
    return _weighted_laplacian(model, x, output, method, wrt, weights, matrix)


def hvp(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
        x: torch.Tensor, v: torch.Tensor, output: Optional[int] = None,
        method: str = "auto") -> torch.Tensor:
    """Hessian-vector products H v: (B, m, d), (B, d) with output=k; unbatched x drops B.

    v: (d,) for every sample or (B, d) one per sample, x's dtype and device (docs/design.md
    §10). method 'reverse': forward jets along v alone, then their adjoint w.r.t. x (one
    backward sweep per output: a few passes of the network, like one column of the Hessian
    by reverse mode); not differentiable, so only where no gradient flows through the
    result. method 'forward': forward jets along the d unit vectors and v with only the
    pairs (e_a, v) in the second order (2d + 3 columns, never the whole Hessian),
    differentiable w.r.t. x, the parameters and v. 'auto' takes 'reverse' when no
    gradient is needed (torch.no_grad(), or nothing requires grad), else 'forward'.
    """
    if not isinstance(method, str) or method not in ("auto", "forward", "reverse"):
        raise ValueError(f"hessmlp: method must be 'auto', 'forward' or 'reverse', got {method!r}")
    xj, _ = _inputs(x)
    d, batched = xj.shape[-1], xj.dim() == 2
    _check_operand("v", v, (d,), xj, f"d = {d}{', or one per sample' if batched else ''}")
    parts = x if isinstance(x, (tuple, list)) else (x,)
    params = model.parameters() if isinstance(model, nn.Module) else ()
    needs_grad = torch.is_grad_enabled() and (
        v.requires_grad or any(t.requires_grad for t in parts) or any(p.requires_grad for p in params))
    if method == "auto":
        # Forward along v then back costs a few passes but is not differentiable again; when
        # gradients flow through H v, the pairs (e_a, v) forward (differentiable).
        method = "forward" if needs_grad or torch.compiler.is_compiling() else "reverse"
    if method == "reverse":
        if needs_grad:
            raise ValueError(
                "hessmlp: hvp with method='reverse' (forward along v, then back) is not "
                "differentiable, and gradients would flow through it here (x, v or the parameters "
                "require grad); use method='forward' or 'auto', or call it under torch.no_grad()")
        return _run(model, x, "hvp", output, "forward", directions=v.unsqueeze(-2)).hessian
    eye = torch.eye(d, dtype=xj.dtype, device=xj.device)
    if v.dim() == 1:
        seed = torch.cat([eye, v.unsqueeze(0)])                       # (d + 1, d)
    else:
        seed = torch.cat([eye.expand(v.shape[0], d, d), v.unsqueeze(1)], dim=1)  # (B, d + 1, d)
    # The pairs (u_a, u_d) of the directions [e_0 .. e_{d-1}, v]: e_a^T H v, then v^T H v.
    return _run(model, x, "cross", output, "forward", directions=seed).hessian[..., :d]


def jacobian(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
             x: torch.Tensor, output: Optional[int] = None,
             method: str = "auto", wrt: Optional[Sequence[int]] = None) -> torch.Tensor:
    """dy/dx: (B, m, k), (B, k) with output=k; unbatched x drops B; wrt: these inputs only
    (k = len(wrt), else d). method: 'forward' (forward jets: 1 + k columns) or 'reverse'
    (backpropagation: the value forward, m columns back); 'auto' takes the cheaper, and
    'forward' when gradients flow through."""
    return _run(model, x, None, output, method, wrt).jacobian
