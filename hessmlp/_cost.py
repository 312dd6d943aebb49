"""Which method forms the full Hessian, and how much memory a call needs.

Both methods are exact. The cost model counts the work of each in units of a
GEMM multiply-add (docs/design.md §2, §3); elementwise passes over memory and the
hand-written Gram loop are weighted by how much slower than a GEMM flop they
run on a CPU.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

# The weights below were fitted to measured times (float32, 2-core Xeon with AVX-512, torch
# 2.13; 208 cases of widths 32-256, d 1-24, m 1 and 4, every mode: benchmarks/suite.py,
# "method crossover"), in units of one GEMM multiply-add; REVERSE_OVERHEAD refitted since.
# Cost of touching one element in a fused elementwise pass.
ELEMENTWISE_WEIGHT = 3.0
# One term w T_a T_c of reverse-Gram's Gram kernel (d up to GRAM_LOOP_MAX_D).
GRAM_WEIGHT = 8.0
# Above that d (full Hessian), batched GEMMs over a triangle of blocks; small blocks weigh more.
def gram_gemm_weight(d: int) -> float:
    return 1.0 + 50.0 / d
GRAM_LOOP_MAX_D = 16  # csrc/jet_driver.cpp, kGramKernelMaxD
# A factor on reverse-Gram's counted work, fitted to the suite's crossover table (46 cases):
# 1.2 while its CPU stage pass ran the generic loops, 0.95 since that pass has loops
# unrolled for d <= 4 (csrc/cpu/mlp_jet.cpp, step_rows). Where it picks the slower method
# the two are within 6% of each other.
REVERSE_OVERHEAD = 0.95


MODES = ("full", "diag", "trace", "cross", "none")  # ('cross': graph_jet's, docs/design.md §10)


def pairs(mode: str, d) -> int:
    """Second-order entries per neuron (csrc/jet_math.h, n_pairs): d(d+1)/2, d, 1, d, 0."""
    return {"full": d * (d + 1) // 2, "diag": d, "trace": 1, "cross": d}.get(mode, 0)


def hessian_shape(mode: str, B, m, d) -> tuple:
    """The shape of mlp_jet's hessian output (csrc/jet_common.cpp, hessian_shape)."""
    return {"full": (B, m, d, d), "diag": (B, m, d), "trace": (B, m), "cross": (B, m, d),
            "none": (B, m, 0)}[mode]


def outputs_elements(B: int, d: int, m: int, mode: str) -> int:
    """Entries of a call's results: value, Jacobian and the mode's second-order part."""
    n = 1
    for s in hessian_shape(mode, B, m, d):
        n *= s
    return B * m * (1 + d) + n


def forward_cost(d: int, widths: Sequence[int], mode: str = "full") -> float:
    """Work per sample of forward jets."""
    P = pairs(mode, d)
    cols = 1 + d + P
    gemm = d * widths[0] + sum(widths[l] * widths[l - 1] * cols for l in range(1, len(widths)))
    elementwise = sum(n * (1 + d + 2 * P) for n in widths)
    return gemm + ELEMENTWISE_WEIGHT * elementwise


def reverse_cost(d: int, widths: Sequence[int], mode: str = "full") -> float:
    """Work per sample of reverse-Gram for the Hessian part ``mode`` of all m outputs (mode
    'none': the Jacobian alone, by backpropagation: the forward carries the value only)."""
    m = widths[-1]
    fwd = 1 if mode == "none" else 1 + d  # columns of the forward pass
    gemm = d * widths[0] + sum(widths[l] * widths[l - 1] * (fwd + m) for l in range(1, len(widths)))
    if len(widths) >= 2:
        # A linear last stage (the usual model): the last Linear takes the value alone, and the
        # Jacobian comes from the backward pass (csrc/jet_driver.cpp, value_only_top).
        gemm += widths[-1] * widths[-2] * (1 - fwd) + m * widths[0] * d
    elementwise = sum(n * (fwd + 3 * m) for n in widths)
    if mode == "none":
        gram = 0.0
    elif mode == "full" and d > GRAM_LOOP_MAX_D:
        gram = gram_gemm_weight(d) * sum(m * n * d * d for n in widths)
    else:
        terms = d * (d + 1) // 2 if mode == "full" else d
        gram = GRAM_WEIGHT * sum(m * n * terms for n in widths)
    return REVERSE_OVERHEAD * (gemm + ELEMENTWISE_WEIGHT * elementwise + gram)


def working_bytes(B: int, d: int, widths: Sequence[int], mode: str, method: str, itemsize: int,
                  save: bool = False) -> int:
    """Peak memory of one call, outputs included (an estimate from above).

    ``save``: the forward keeps each layer's state for the backward, which then
    needs about as much again for its own sweep.
    """
    m = widths[-1]
    out = outputs_elements(B, d, m, mode)
    n_max = max(widths)
    if method == "forward":
        cols = 1 + d + pairs(mode, d)
        work = 4 * B * cols * n_max
        if save:
            work += B * widths[0] + sum(B * cols * n for n in widths[1:]) + 2 * B * cols * n_max
    else:
        work = sum(B * (2 + 2 * d) * n for n in widths) + 3 * B * m * n_max
        work += B * m * (d * (d + 1) // 2) if d <= GRAM_LOOP_MAX_D else 2 * B * m * d * (n_max + d)
    return (out + work) * itemsize


def backward_bytes(B: int, d: int, widths: Sequence[int], mode: str, itemsize: int,
                   recompute: bool) -> int:
    """Working memory of mlp_jet_backward: the forward jets' state when it is recomputed
    (``recompute``: the forward kept none) and the sweep's columns."""
    if recompute:
        return working_bytes(B, d, widths, mode, "forward", itemsize, True)
    return 3 * B * (1 + d + pairs(mode, d)) * max(widths) * itemsize


# The CPU kernels take the forward and backward sweeps in blocks of samples whose columns
# fill about this many bytes (csrc/cpu/kernels.h, kBlockBytes and rows_per_block).
CPU_BLOCK_BYTES = 256 << 10


def cpu_block_rows(d: int, widths: Sequence[int], mode: str, itemsize: int,
                   method: str = "forward") -> Optional[int]:
    """Samples per block of the CPU kernels (chunks of a multiple of it give the same bits);
    None where the call takes the whole batch at once (reverse-Gram's batched GEMMs)."""
    if method == "reverse":
        if mode == "full" and d > GRAM_LOOP_MAX_D:
            return None
        cols = 1 + d  # reverse-Gram's blocks: sized by the columns z and T
    else:
        cols = 1 + d + pairs(mode, d)
    return max(8, CPU_BLOCK_BYTES // (cols * max(widths) * itemsize))


def choose_method(d: int, widths: Sequence[int], mode: str) -> str:
    """The cheaper exact method for a Hessian mode ('full', 'diag', 'trace'), or for the
    Jacobian alone ('none': forward jets against backpropagation)."""
    if mode not in ("full", "diag", "trace", "none"):
        return "forward"
    return "reverse" if reverse_cost(d, widths, mode) < forward_cost(d, widths, mode) else "forward"


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device``, or None when it cannot be told."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None
    return None
