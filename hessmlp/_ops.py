"""Python-side registrations of the hessmlp ops: fake kernels and autograd.

The schemas live in csrc/ops.cpp. mlp_jet's backward is the op
mlp_jet_backward (the exact reverse sweep, docs/design.md §4); differentiating
that backward again (double backward) is refused with a clear error.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)
from . import _cost, _memory

def _pairs(mode: str, d):
    if mode not in _cost.MODES:
        raise ValueError(f"hessmlp: mode must be one of {', '.join(map(repr, _cost.MODES))}, got "
                         f"{mode!r}")
    return _cost.pairs(mode, d)


def _check_devices(x, named):
    """Every tensor on x's device. (The fake kernel also serves the Meta key: with a weight
    on meta and x on the CPU the dispatcher picks it, and it must not hand back empty
    tensors as if it had computed something.)"""
    for name, tensors in named:
        for i, t in enumerate(tensors):
            if t is not None and t.device != x.device:
                raise ValueError(f"hessmlp: {name}[{i}] is on {t.device} but x is on {x.device}; "
                                 "every tensor of the op must be on one device")


@torch.library.register_fake("hessmlp::mlp_jet")
def _mlp_jet_fake(x, weights, biases, stage_sizes, act_codes, act_params, mode, method,
                  save_state=False):
    _check_devices(x, (("weights", weights), ("biases", biases)))
    torch._check(x.dim() == 2, lambda: f"hessmlp: x must have shape [B, d], got {tuple(x.shape)}")
    torch._check(len(weights) >= 1, lambda: "hessmlp: weights must hold at least one Linear weight")
    torch._check(mode != "cross", lambda: "hessmlp: mode 'cross' is graph_jet's, with a seed")
    B, d = x.shape
    m = weights[-1].shape[0]
    C = 1 + d + _pairs(mode, d)
    state = []
    if save_state and (method == "forward" or d == 0):  # (d = 0 takes forward jets)
        state = [x.new_empty((B, weights[0].shape[0]))]
        state += [x.new_empty((B, C, w.shape[0])) for w in weights[1:]]
    return (x.new_empty((B, m)), x.new_empty((B, m, d)),
            x.new_empty(_cost.hessian_shape(mode, B, m, d)), state)


@torch.library.register_fake("hessmlp::mlp_jet_backward")
def _mlp_jet_backward_fake(grad_value, grad_jacobian, grad_hessian, x, weights, biases,
                           stage_sizes, act_codes, act_params, mode, state, output_mask):
    _check_devices(x, (("weights", weights), ("biases", biases), ("state", state),
                       ("grad", (grad_value, grad_jacobian, grad_hessian))))
    need_x, need_w, need_b = output_mask
    empty = lambda: x.new_empty((0,))  # noqa: E731
    grad_x = x.new_empty(x.shape) if need_x else empty()
    grad_w = [w.new_empty(w.shape) if need_w else empty() for w in weights]
    grad_b = [b.new_empty(b.shape) if need_b and b is not None else empty() for b in biases]
    return grad_x, grad_w, grad_b


def _graph_output_width(program):
    """The last node's width in graph_jet's program (csrc/graph.h: per node width, then three
    lists each led by its length)."""
    pos, width = 0, 0
    while pos < len(program):
        width = program[pos]
        pos += 1
        for _ in range(3):
            pos += 1 + program[pos]
    return width


@torch.library.register_fake("hessmlp::graph_jet")
def _graph_jet_fake(x, tensors, kinds, program, consts, mode, seed=None):
    _check_devices(x, (("tensors", tensors), ("seed", [seed])))
    torch._check(x.dim() == 2, lambda: f"hessmlp: x must have shape [B, d], got {tuple(x.shape)}")
    B, d = x.shape
    k = d if seed is None else seed.shape[-2]
    m = _graph_output_width(program)
    return (x.new_empty((B, m)), x.new_empty((B, m, k)),
            x.new_empty(_cost.hessian_shape(mode, B, m, k)))


@torch.library.register_fake("hessmlp::stage_derivs")
def _stage_derivs_fake(z, act_codes, act_params):
    return z.new_empty((4, *z.shape))


# ---- autograd -------------------------------------------------------------------------------

def _refuse_mixed_biases(biases):
    if any(b is None for b in biases) and any(b is not None and b.requires_grad for b in biases):
        # Autograd sees a list that mixes None and tensors as one opaque value: the
        # gradients of its tensors would be lost without a word.
        raise ValueError(
            "hessmlp: mlp_jet cannot differentiate w.r.t. biases given as a list that mixes None "
            "and tensors; pass zeros for the missing biases (hessmlp.jet and friends do this)")


def _mlp_jet_setup_context(ctx, inputs, output):
    x, weights, biases, stage_sizes, act_codes, act_params, mode, method, save_state = inputs
    _refuse_mixed_biases(biases)
    state = output[3]
    ctx.mark_non_differentiable(*state)
    ctx.set_materialize_grads(False)
    ctx.spec = (len(weights), [b is not None for b in biases], list(stage_sizes),
                list(act_codes), list(act_params), mode)
    # x and the parameters are inputs (alive anyway); the state is what the forward
    # computed and the backward would otherwise recompute.
    ctx.save_for_backward(x, *weights, *[b for b in biases if b is not None], *state)


def _flags(entry, n):
    """needs_input_grad of a list input: one flag per entry (a list without tensors,
    such as all-None biases, comes as a single False)."""
    if isinstance(entry, (list, tuple)):
        return [bool(v) for v in entry]
    return [bool(entry)] * n


def _shaped(entry, grads):
    """The gradient of a list input in the structure autograd expects for it."""
    if isinstance(entry, (list, tuple)):
        return list(grads) if len(grads) == len(entry) else [None] * len(entry)
    return None


def _mlp_jet_backward(ctx, grad_value, grad_jacobian, grad_hessian, grad_state):
    L, has_bias, stage_sizes, act_codes, act_params, mode = ctx.spec
    saved = ctx.saved_tensors
    x, weights = saved[0], list(saved[1:1 + L])
    it = iter(saved[1 + L:1 + L + sum(has_bias)])
    biases = [next(it) if h else None for h in has_bias]
    state = list(saved[1 + L + sum(has_bias):])

    needs = ctx.needs_input_grad  # (x, [weights], [biases], ...)
    need_x = bool(needs[0])
    need_w = _flags(needs[1], L)
    need_b = [n and h for n, h in zip(_flags(needs[2], L), has_bias)]
    # One entry per input as passed (save_state may be left out, its default), in the
    # structure of needs_input_grad: a list input without tensors is a single flag (None
    # back), an empty list stays an empty list.
    rest = tuple(_shaped(e, []) for e in needs[3:])

    no_upstream = grad_value is None and grad_jacobian is None and grad_hessian is None
    if no_upstream or not (need_x or any(need_w) or any(need_b)):
        return (None, _shaped(needs[1], [None] * L), _shaped(needs[2], [None] * L)) + rest
    gx, gw, gb = _mlp_jet_grads(grad_value, grad_jacobian, grad_hessian, x, weights, biases,
                                stage_sizes, act_codes, act_params, mode, state, need_x,
                                need_w, need_b)
    return (gx, _shaped(needs[1], gw), _shaped(needs[2], gb)) + rest


def _mlp_jet_grads(grad_value, grad_jacobian, grad_hessian, x, weights, biases, stage_sizes,
                   act_codes, act_params, mode, state, need_x, need_w, need_b):
    """mlp_jet's gradients w.r.t. x, each weight and each bias (None where not needed) by the
    op mlp_jet_backward, in chunks of samples where the whole batch's working memory would
    not fit."""
    mask = [need_x, any(need_w), any(need_b)]
    B, d = x.shape
    rows = _memory.backward_rows(B, d, [w.shape[0] for w in weights], mode, x, not state)
    if rows >= B:
        gx, gw, gb = torch.ops.hessmlp.mlp_jet_backward(
            grad_value, grad_jacobian, grad_hessian, x, weights, biases, stage_sizes, act_codes,
            act_params, mode, state, mask)
    else:
        # In chunks of samples (the working memory of the whole batch would not fit): the
        # gradients of x are rows apart, those of the parameters sums over the chunks.
        gx, gw, gb = [], None, None
        rows_of = lambda t, b0: None if t is None else t[b0:b0 + rows]  # noqa: E731
        for b0 in range(0, B, rows):
            cx, cw, cb = torch.ops.hessmlp.mlp_jet_backward(
                rows_of(grad_value, b0), rows_of(grad_jacobian, b0), rows_of(grad_hessian, b0),
                x[b0:b0 + rows], weights, biases, stage_sizes, act_codes, act_params, mode,
                [s[b0:b0 + rows] for s in state], mask)
            gx.append(cx)
            gw = cw if gw is None else [a + b for a, b in zip(gw, cw)]
            gb = cb if gb is None else [a + b for a, b in zip(gb, cb)]
        gx = torch.cat(gx) if need_x else gx[0]
    return ((gx if need_x else None), [g if n else None for g, n in zip(gw, need_w)],
            [g if n else None for g, n in zip(gb, need_b)])


class _MlpJet(torch.autograd.Function):
    """mlp_jet for eager calls that gradients flow through: the forward and backward of the
    op's registered autograd (the state saved, mlp_jet_backward), without torch.library's
    handling of every call's arguments, which costs more than the op itself on small
    networks. Arguments: x, L, which biases there are, the op's other arguments, then the
    weights and the biases there are. (torch.compile traces the op and its registered
    autograd instead.)"""

    @staticmethod
    def forward(ctx, x, L, has_bias, args, *tensors):
        weights = list(tensors[:L])
        it = iter(tensors[L:])
        biases = [next(it) if h else None for h in has_bias]
        with torch._C._AutoDispatchBelowAutograd():
            value, jac, hess, state = torch.ops.hessmlp.mlp_jet.default(x, weights, biases, *args)
        ctx.set_materialize_grads(False)
        ctx.L, ctx.has_bias, ctx.args = L, has_bias, args
        # (the state is neither an input nor an output: kept on ctx, out of autograd's sight)
        ctx.state = state
        ctx.save_for_backward(x, *tensors)
        return value, jac, hess

    @staticmethod
    def backward(ctx, grad_value, grad_jacobian, grad_hessian):
        L, has_bias = ctx.L, ctx.has_bias
        stage_sizes, act_codes, act_params, mode = ctx.args[:4]
        saved = ctx.saved_tensors
        nb = sum(has_bias)
        x, weights = saved[0], list(saved[1:1 + L])
        it = iter(saved[1 + L:1 + L + nb])
        biases = [next(it) if h else None for h in has_bias]
        state = ctx.state
        needs = ctx.needs_input_grad  # (x, L, has_bias, args, *weights, *biases)
        need_w = [bool(n) for n in needs[4:4 + L]]
        it = iter(needs[4 + L:])
        need_b = [bool(next(it)) if h else False for h in has_bias]
        none = (None,) * (L + nb)
        if (grad_value is None and grad_jacobian is None and grad_hessian is None) or not (
                needs[0] or any(need_w) or any(need_b)):
            return (None, None, None, None) + none
        gx, gw, gb = _mlp_jet_grads(grad_value, grad_jacobian, grad_hessian, x, weights, biases,
                                    stage_sizes, act_codes, act_params, mode, state,
                                    bool(needs[0]), need_w, need_b)
        return (gx, None, None, None, *gw, *[g for g, h in zip(gb, has_bias) if h])


# _MlpJet.apply without torch.autograd.Function.apply's Python layer (its handling of
# functorch's wrappers and default arguments, which eager calls outside torch.func, as
# mlp_jet makes them, do not need): the C apply bound to the class.
_MLP_JET_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _MlpJet)


def mlp_jet(x, weights, biases, stage_sizes, act_codes, act_params, mode, method, save_state):
    """torch.ops.hessmlp.mlp_jet (value, jacobian, hessian, state), by the cheapest route to
    the same results: under torch.compile (or a torch.func transform) the op itself; eager,
    the op's CPU or CUDA kernel directly when no gradient flows, else _MlpJet."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return torch.ops.hessmlp.mlp_jet(x, weights, biases, stage_sizes, act_codes, act_params,
                                         mode, method, save_state)
    args = (stage_sizes, act_codes, act_params, mode, method, save_state)
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights) or any(
            b is not None and b.requires_grad for b in biases)):
        _refuse_mixed_biases(biases)
        has_bias = tuple(b is not None for b in biases)
        value, jac, hess = _MLP_JET_APPLY(x, len(weights), has_bias, args, *weights,
                                          *[b for b in biases if b is not None])
        return value, jac, hess, []
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.hessmlp.mlp_jet.default(x, weights, biases, *args)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "hessmlp: double backward (differentiating the gradients of hessmlp's results again, "
        "e.g. autograd.grad(..., create_graph=True) followed by another backward) is not "
        "supported. Gradients of losses built from hessian/laplacian/jacobian w.r.t. x and the "
        "parameters are exact; a second derivative of them is not available.")


@torch.library.register_fake("hessmlp::graph_jet_backward")
def _graph_jet_backward_fake(grad_value, grad_jacobian, grad_hessian, x, tensors, kinds, program,
                             consts, mode, seed, needs):
    _check_devices(x, (("tensors", tensors), ("grad", (grad_value, grad_jacobian, grad_hessian)),
                       ("seed", [seed])))
    empty = lambda: x.new_empty((0,))  # noqa: E731
    need_seed = seed is not None and len(needs) > 1 + len(tensors) and needs[1 + len(tensors)]
    return (x.new_empty(x.shape) if needs[0] else empty(),
            [t.new_empty(t.shape) if n else empty() for t, n in zip(tensors, needs[1:])],
            seed.new_empty(seed.shape) if need_seed else empty())


def _graph_jet_setup_context(ctx, inputs, output):
    x, tensors, kinds, program, consts, mode = inputs[:6]
    seed = inputs[6] if len(inputs) > 6 else None
    ctx.set_materialize_grads(False)
    ctx.args = (list(kinds), list(program), list(consts), mode, seed is not None)
    ctx.save_for_backward(x, *tensors, *([] if seed is None else [seed]))


def _graph_jet_backward(ctx, grad_value, grad_jacobian, grad_hessian):
    kinds, program, consts, mode, has_seed = ctx.args
    saved = ctx.saved_tensors
    x, tensors = saved[0], list(saved[1:len(saved) - has_seed])
    seed = saved[-1] if has_seed else None
    needs = ctx.needs_input_grad  # (x, [tensors], kinds, program, consts, mode[, seed])
    need_x, need_t = bool(needs[0]), _flags(needs[1], len(tensors))
    need_seed = has_seed and bool(needs[6])
    rest = tuple(_shaped(e, []) for e in needs[2:6]) + ((None,) if len(needs) > 6 else ())
    if (grad_value is None and grad_jacobian is None and grad_hessian is None) or not (
            need_x or any(need_t) or need_seed):
        return (None, _shaped(needs[1], [None] * len(tensors))) + rest
    flags = [need_x, *need_t] + ([need_seed] if has_seed else [])
    gx, gt, gs = torch.ops.hessmlp.graph_jet_backward(grad_value, grad_jacobian, grad_hessian, x,
                                                      tensors, kinds, program, consts, mode, seed,
                                                      flags)
    out = ((gx if need_x else None),
           _shaped(needs[1], [g if n else None for g, n in zip(gt, need_t)])) + rest
    if need_seed:
        out = out[:6] + (gs,)
    return out


def _refuse_stage_derivs_backward(ctx, *grads):
    raise RuntimeError(
        "hessmlp: stage_derivs is a test hook for the per-element math and has no backward; "
        "use hessmlp.hessian / laplacian / jacobian, which are differentiable.")


torch.library.register_autograd("hessmlp::mlp_jet", _mlp_jet_backward,
                                setup_context=_mlp_jet_setup_context)
torch.library.register_autograd("hessmlp::mlp_jet_backward", _refuse_double_backward)
torch.library.register_autograd("hessmlp::stage_derivs", _refuse_stage_derivs_backward)
torch.library.register_autograd("hessmlp::graph_jet", _graph_jet_backward,
                                setup_context=_graph_jet_setup_context)
torch.library.register_autograd("hessmlp::graph_jet_backward", _refuse_double_backward)
