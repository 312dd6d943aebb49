"""The public functions: hessian, hessian_diag, laplacian, jacobian, jet."""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import _memory, _ops  # noqa: F401  (_ops registers the fake kernels)
from ._memory import memory_budget, set_memory_budget
from ._graph import chain_layout, chain_network
from ._spec import Network, UnsupportedModelError, unwrap

__all__ = ["Jet", "jet", "hessian", "hessian_diag", "laplacian", "jacobian", "set_memory_budget",
           "memory_budget"]

_MODES = {"full": "full", "diag": "diag", "trace": "trace", None: "none"}


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


def _select_output(net: Network, output) -> Network:
    if output is None:
        return net
    k = _output_index(output, net.weights[-1].shape[0])
    b = net.biases[-1]
    return Network(net.weights[:-1] + [net.weights[-1][k:k + 1]],
                   net.biases[:-1] + [None if b is None else b[k:k + 1]], net.stages, net.where,
                   net.checks)


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


def _run_graph(graph, x: torch.Tensor, mode: str, output, method: str) -> Jet:
    """hessmlp's functions on a graph network: the op graph_jet (forward jets)."""
    from ._graph import Graph, Node, op_arguments

    if method not in ("auto", "forward"):
        raise ValueError(f"hessmlp: method={method!r} serves chains of layers only; a graph network "
                         "(residual, concatenation, products) takes method='forward' or 'auto'")
    if output is not None:  # a last node selecting output k
        k = _output_index(output, graph.m)
        graph = Graph(graph.nodes + [Node("select", (len(graph.nodes) - 1,), 1, index=(k,))], graph.tensors,
                      graph.dtypes)
    batched = x.dim() == 2
    xb = x if batched else x.unsqueeze(0)
    B, d = xb.shape
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (xb, *graph.tensors))
    # Memory: every node's columns, as the backward keeps them.
    widths = [sum(n.width for n in graph.nodes), graph.m]
    _, rows = _memory.plan(B, d, widths, mode, "forward", xb, output, save)
    kinds, program, consts = op_arguments(graph)

    def run(xc):
        return torch.ops.hessmlp.graph_jet(xc, graph.tensors, kinds, program, consts, mode)

    return _jet_of_calls(run, xb, rows, mode, output, batched)


def _jet_of_calls(run, xb: torch.Tensor, rows: int, mode: str, output, batched: bool) -> Jet:
    """The op's results (run(x chunk) -> value, jacobian, hessian) for the batch, rows samples a
    call, in the shapes the public functions return."""
    if rows >= xb.shape[0]:
        value, jac, hess = run(xb)
    else:
        parts = [run(xc) for xc in xb.split(rows)]
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


def _run(model: nn.Module, x, hessian: Optional[str], output, method: str) -> Jet:
    from . import _graph_reader

    _check_context()
    input_widths = None
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        # forward(self, x, t, ...): w.r.t. their concatenation
        x, input_widths = _joined_inputs(x)
    x = _check_x(x)
    if not (hessian is None or isinstance(hessian, str)) or hessian not in _MODES:
        raise ValueError(f"hessmlp: hessian must be 'full', 'diag', 'trace' or None, got {hessian!r}")
    mode = _MODES[hessian]
    if not isinstance(model, nn.Module):
        raise TypeError(f"hessmlp: model must be an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    # One reader for every model (docs/design.md §9): its records (plain data, kept on the
    # model; under torch.compile a constant of the compiled code) give its graph; a graph that
    # is a chain runs through mlp_jet (blocked forward jets, reverse-Gram, saved state), any
    # other through graph_jet.
    if torch.compiler.is_compiling():
        records = _graph_reader.compiled_structure(model, input_widths)
    else:
        records = _graph_reader.structure(model, input_widths)
    graph, layout = _graph_network(model, x, input_widths, records)
    _check_backend(x)
    if layout is None:
        return _run_graph(graph, x, mode, output, method)
    net = _select_output(chain_network(layout, graph.tensors), output)

    batched = x.dim() == 2
    xb = x if batched else x.unsqueeze(0)
    B, d = xb.shape
    widths = [W.shape[0] for W in net.weights]

    if not isinstance(method, str) or method not in ("auto", "forward", "reverse"):
        raise ValueError(f"hessmlp: method must be 'auto', 'forward' or 'reverse', got {method!r}")
    # Training through the result: the backward is the adjoint of the forward jets, which
    # saves each layer's state; after reverse-Gram the backward recomputes it.
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xb, *net.weights, *net.biases))
    method, rows = _memory.plan(B, d, widths, mode, method, xb, output, save)
    biases = net.biases
    if save and any(b is None for b in biases) and any(b is not None for b in biases):
        # Autograd cannot track a list that mixes None and tensors (see _ops.py).
        biases = [xb.new_zeros(W.shape[0]) if b is None else b for W, b in zip(net.weights, biases)]

    def run(xc):
        return torch.ops.hessmlp.mlp_jet(xc, net.weights, biases, net.stage_sizes, net.act_codes,
                                         net.act_params, mode, method, save)[:3]

    return _jet_of_calls(run, xb, rows, mode, output, batched)


def jet(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
        x: torch.Tensor, hessian: Optional[str] = "full", output: Optional[int] = None,
        method: str = "auto") -> Jet:
    """Value, Jacobian and second derivatives of ``model`` at ``x`` in one pass.

    Args:
        model: nn.Sequential of Linear layers and elementwise activations, or a
            module whose forward is such a chain (see the README).
        x: (B, d) or (d,), float32 or float64.
        hessian: 'full' (B, m, d, d), 'diag' (B, m, d), 'trace' (B, m) or None.
        output: an int selects one output k and drops the m dimension.
        method: 'auto' (default), 'forward' (forward jets) or 'reverse'
            (reverse-Gram; with hessian=None, backpropagation). Both are exact; 'auto' takes the
            cheaper by a measured cost model, and 'forward' when gradients will flow
            through the result (its backward needs the forward jets' state).
    """
    return _run(model, x, hessian, output, method)


def hessian(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
            x: torch.Tensor, output: Optional[int] = None,
            method: str = "auto") -> torch.Tensor:
    """d^2 y / dx^2: (B, m, d, d), (B, d, d) with output=k; unbatched x drops B."""
    return _run(model, x, "full", output, method).hessian


def hessian_diag(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
                 x: torch.Tensor, output: Optional[int] = None,
                 method: str = "auto") -> torch.Tensor:
    """d^2 y_k / dx_i^2: (B, m, d), (B, d) with output=k; unbatched x drops B."""
    return _run(model, x, "diag", output, method).hessian


def laplacian(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
              x: torch.Tensor, output: Optional[int] = None,
              method: str = "auto") -> torch.Tensor:
    """Trace of the Hessian: (B, m), (B,) with output=k; unbatched x drops B."""
    return _run(model, x, "trace", output, method).hessian


def jacobian(model: nn.Module,  # hessmlp is not TorchScript: use torch.compile
             x: torch.Tensor, output: Optional[int] = None,
             method: str = "auto") -> torch.Tensor:
    """dy/dx: (B, m, d), (B, d) with output=k; unbatched x drops B. method: 'forward'
    (forward jets: 1 + d columns) or 'reverse' (backpropagation: the value forward, m
    columns back); 'auto' takes the cheaper, and 'forward' when gradients flow through."""
    return _run(model, x, None, output, method).jacobian
