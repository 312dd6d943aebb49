"""Memory: the budget a call may use, which method fits, how many samples go into one op call,
and the MemoryErrors that say what to do. The sizes come from _cost.working_bytes.

The budget: ``set_memory_budget`` sets a process-wide default; ``with memory_budget(n):``
overrides it for the current thread (or asyncio task) only, and each block restores exactly
what it changed, also when blocks are left in another order than entered (generators).
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import List, Optional, Sequence

import torch

from . import _cost

# The process-wide default (set_memory_budget), and the stack of this context's
# memory_budget blocks: ((block id, nbytes), ...), the innermost last.
_DEFAULT: Optional[int] = None
_BLOCKS: contextvars.ContextVar = contextvars.ContextVar("hessmlp_memory_budget", default=())

# A call that needs less than this does not ask the system for its free memory (reading
# /proc/meminfo costs more than such a call on the CPU).
SMALL_CALL_BYTES = 32 << 20


def _check_budget(nbytes) -> Optional[int]:
    if nbytes is None:
        return None
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"hessmlp: the memory budget must be an int (bytes) or None, got "
                        f"{type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"hessmlp: the memory budget must be positive, got {nbytes}")
    return int(nbytes)


def budget() -> Optional[int]:
    """The budget in force here: the innermost memory_budget block of this thread or task,
    else the process-wide default. None inside compiled code (a compiled graph takes its batch
    whole)."""
    if torch.compiler.is_compiling():
        return None
    blocks = _BLOCKS.get()
    return blocks[-1][1] if blocks else _DEFAULT


def set_memory_budget(nbytes: Optional[int]) -> Optional[int]:
    """Sets the process-wide cap on the working memory of each hessmlp call (None: no cap
    beyond the free memory); ``with hessmlp.memory_budget(n):`` blocks override it in their
    own thread. A batch that would need more is computed in chunks of samples, one after the
    other, with the same results up to rounding, and so is its backward. Returns the previous
    default."""
    global _DEFAULT
    nbytes = _check_budget(nbytes)
    previous, _DEFAULT = _DEFAULT, nbytes
    return previous


@contextlib.contextmanager
def memory_budget(nbytes: Optional[int]):
    """``with hessmlp.memory_budget(2**30): ...``: a budget for the calls of this block, in
    this thread (or asyncio task) only; None lifts the cap inside the block."""
    entry = (object(), _check_budget(nbytes))
    _BLOCKS.set(_BLOCKS.get() + (entry,))
    try:
        yield
    finally:
        _BLOCKS.set(tuple(e for e in _BLOCKS.get() if e[0] is not entry[0]))


def fits(need: int, device: torch.device) -> bool:
    """Whether ``need`` bytes fit in the free memory of ``device`` (True when it cannot be
    told: inside compiled code, where free memory is a run-time fact)."""
    if torch.compiler.is_compiling() or need < SMALL_CALL_BYTES:  # (no guard on a symbolic B)
        return True
    free = _cost.available_bytes(device)
    return free is None or need <= free


def rows_per_call(B, d, widths, mode, method, x, save) -> int:
    """Samples per op call under the budget (B when it fits or none is set); 0 when not even
    one sample fits in it."""
    cap = budget()
    if cap is None:
        return max(B, 1)
    itemsize = x.element_size()
    if _cost.working_bytes(B, d, widths, mode, method, itemsize, save) <= cap:
        return max(B, 1)
    one = _cost.working_bytes(1, d, widths, mode, method, itemsize, save)
    if one > cap:
        return 0
    rows = max(1, min(B, int(cap // one)))
    block = _cost.cpu_block_rows(d, widths, mode, itemsize, method)
    if x.device.type == "cpu" and block is not None and rows >= block:
        rows -= rows % block  # whole blocks of the CPU kernels
    return rows


def _size(nbytes: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.2f} {unit}"
    return f"{int(nbytes)} bytes"


def _outputs_bytes(B, d, widths, mode, itemsize) -> int:
    return _cost.outputs_elements(B, d, widths[-1], mode) * itemsize


def call_bytes(B, rows, d, widths, mode, method, x, save) -> int:
    """Peak memory of a call in chunks of ``rows``: one chunk's working memory, and the whole
    batch's results twice (the chunks' results and their concatenation)."""
    itemsize = x.element_size()
    need = _cost.working_bytes(min(rows, B), d, widths, mode, method, itemsize, save)
    if rows < B:
        need += 2 * _outputs_bytes(B, d, widths, mode, itemsize)
    return need


def _rows_if_feasible(B, d, widths, mode, method, x, save) -> int:
    """rows_per_call when those chunks fit in the free memory, else 0."""
    rows = rows_per_call(B, d, widths, mode, method, x, save)
    if rows and not fits(call_bytes(B, rows, d, widths, mode, method, x, save), x.device):
        return 0
    return rows


def _feasible(B, d, widths, mode, method, x, save) -> bool:
    return _rows_if_feasible(B, d, widths, mode, method, x, save) > 0


def plan(B, d, widths, mode, method, x, output, save, forward_only=False):
    """(method, samples per op call) for a call, or a MemoryError before anything is
    allocated. method='auto': forward jets when gradients will flow (their saved state serves
    the backward), else the cheaper by the cost model, unless it does not fit where the other
    does (after reverse-Gram the backward recomputes the state, in chunks). d: the directions
    of the jets (x's features, or those of a seed); forward_only: a call that only forward
    jets serve (a graph network, chosen directions)."""
    if method == "auto":
        first = "forward" if save or d == 0 else _cost.choose_method(d, widths, mode)
        candidates = (first,) if d == 0 else (first, "reverse" if first == "forward" else "forward")
        for method in candidates:
            rows = _rows_if_feasible(B, d, widths, mode, method, x, save)
            if rows:
                return method, rows
        method = first
    rows = rows_per_call(B, d, widths, mode, method, x, save)
    check_call(B, rows, d, widths, mode, method, x, output, save, forward_only)
    return method, rows


def _ways_out(B, d, widths, mode, method, x, output, save, backward=False,
              one_over_budget=False, forward_only=False) -> str:
    """What the user can do, each way checked to help: another method, output=k, a cheaper
    mode, torch.no_grad(), a smaller batch or a memory budget (not when one sample is over
    the budget already)."""
    m = widths[-1]
    ways: List[str] = []
    other = "reverse" if method == "forward" else "forward"
    if not backward and not forward_only and d > 0 and _feasible(B, d, widths, mode, other, x, save):
        ways.append(f"method='{other}' (it fits)")
    if output is None and m > 1:
        ways.append(f"select one output with output=k (the model has {m})")
    if mode == "full":
        ways.append("ask for hessian_diag or laplacian if that is all you need")
    if save:
        ways.append("wrap the call in torch.no_grad() if you do not need gradients through it "
                    "(then nothing is kept for a backward)")
    one_fits = fits(_cost.working_bytes(1, d, widths, mode, "forward" if backward else method,
                                        x.element_size(), save or backward), x.device)
    results = 2 * _outputs_bytes(B, d, widths, mode, x.element_size())
    if one_fits and B > 1 and not one_over_budget and (backward or fits(results, x.device)):
        ways.append("pass a smaller batch, or set hessmlp.set_memory_budget(nbytes) (or "
                    "`with hessmlp.memory_budget(nbytes):`) to have hessmlp compute it in chunks "
                    "of samples")
    elif one_fits and B > 1 and not one_over_budget:
        ways.append(f"pass a smaller batch (the results of this one alone need "
                    f"{_size(results // 2)})")
    return "; ".join(ways) if ways else "use a smaller model or a machine with more memory"


def check_call(B, rows, d, widths, mode, method, x, output, save, forward_only=False) -> None:
    """Raises a MemoryError, before anything is allocated, when the chunks of ``rows``
    samples (0: not even one sample fits the budget) do not fit."""
    itemsize = x.element_size()
    cap = budget()
    if rows == 0:
        one = _cost.working_bytes(1, d, widths, mode, method, itemsize, save)
        raise MemoryError(
            f"hessmlp: one sample needs about {_size(one)} (d={d}, mode '{mode}', method "
            f"'{method}') but the memory budget is {_size(cap)}; raise the budget, or "
            + _ways_out(B, d, widths, mode, method, x, output, save, one_over_budget=True,
                        forward_only=forward_only))
    need = call_bytes(B, rows, d, widths, mode, method, x, save)
    if fits(need, x.device):
        return
    free = _cost.available_bytes(x.device)
    chunks = f" in chunks of {rows}, the results of all {B} included" if rows < B else ""
    raise MemoryError(
        f"hessmlp: this call needs about {_size(need)} on {x.device} (batch {B}{chunks}, d={d}, "
        f"{widths[-1]} outputs, mode '{mode}', method '{method}') but only {_size(free)} is free. "
        "Ways out: " + _ways_out(B, d, widths, mode, method, x, output, save,
                                 forward_only=forward_only))


def backward_rows(B: int, d: int, widths: Sequence[int], mode: str, x: torch.Tensor,
                  recompute: bool) -> int:
    """Samples per call of the backward op: all of them when its working memory (the forward
    jets' state, recomputed when the forward kept none, and the sweep) fits the budget and the
    free memory, else chunks; MemoryError when one sample does not fit."""
    def need(rows):
        return _cost.backward_bytes(rows, d, widths, mode, x.element_size(), recompute)

    if torch.compiler.is_compiling() or not isinstance(B, int) or \
            isinstance(x, torch._subclasses.FakeTensor) or B < 1:
        return B  # (traced code: a compiled graph takes its batch whole)
    full = need(B)
    free = _cost.available_bytes(x.device) if full >= SMALL_CALL_BYTES else None
    limits = [v for v in (budget(), free) if v is not None]
    if not limits or full <= min(limits):
        return B
    limit, one = min(limits), need(1)
    if one > limit:
        raise MemoryError(
            f"hessmlp: the backward of this call needs about {_size(one)} per sample (the "
            f"forward jets' state of mode '{mode}' at d={d}, recomputed for the gradients) but "
            f"{_size(limit)} is what it may use (the memory budget or the free memory). Ways "
            "out: raise the budget, or "
            + _ways_out(B, d, widths, mode, "forward", x, None, True, backward=True,
                        one_over_budget=True))
    return max(1, min(B, int(limit // one)))
