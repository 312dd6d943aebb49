"""Small modules: the SIREN sine activation and a ready-made MLP."""
from __future__ import annotations

import copy
from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["Sine", "MLP", "ACTIVATIONS"]


class Sine(nn.Module):
    """sin(w0 * x), the SIREN activation."""

    def __init__(self, w0: float = 1.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


# Names accepted by MLP(activation=...), each a factory of a fresh module.
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "sin": Sine,
    "sine": Sine,
    "identity": nn.Identity,
}


def _make_activation(activation) -> nn.Module:
    if isinstance(activation, str):
        key = activation.lower()
        if key not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)} or an nn.Module, got {activation!r}")
        return ACTIVATIONS[key]()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    raise TypeError(
        f"activation must be a name, an nn.Module or an nn.Module class, got {type(activation).__name__}")


class MLP(nn.Sequential):
    """Linear -> activation -> ... -> Linear, as a plain nn.Sequential.

    Args:
        in_features: input size d.
        hidden: widths of the hidden layers (may be empty).
        out_features: output size m.
        activation: a name (see ``hessmlp.nn.ACTIVATIONS``), an nn.Module (copied
            for each layer) or an nn.Module class.
        bias: whether the Linear layers have biases.
        final_activation: optional activation after the last Linear (same forms).
        dtype, device: passed to every nn.Linear.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 128), out_features: int = 1,
                 activation: Union[str, nn.Module, type] = "tanh", bias: bool = True,
                 final_activation=None, dtype=None, device=None):
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(hidden, int):
            hidden = [hidden]
        hidden = list(hidden)
        for i, h in enumerate(hidden):
            if not isinstance(h, int) or isinstance(h, bool) or h < 1:
                raise ValueError(f"hidden[{i}] must be a positive int, got {h!r}")
        sizes = [in_features] + hidden + [out_features]
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias, dtype=dtype, device=device))
            if i < len(sizes) - 2:
                layers.append(_make_activation(activation))
        if final_activation is not None:
            layers.append(_make_activation(final_activation))
        super().__init__(*layers)
