"""Ready modules hessmlp reads exactly: the SIREN sine activation, an MLP (with adaptive
activations as an option), and the graph networks of docs/design.md §9: a residual MLP,
Fourier features / positional encoding and the modified (gated) MLP."""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["Sine", "MLP", "ACTIVATIONS", "AdaptiveScale", "ResidualMLP", "FourierFeatures",
           "ModifiedMLP"]


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


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class AdaptiveScale(nn.Module):
    """h -> (n a) h with a learnable slope a: put before an activation it makes the adaptive
    activation act(n a z) of Jagtap et al., one slope per layer ('layer', L-LAAF) or per
    neuron ('neuron', N-LAAF), a starting at 1 / n."""

    def __init__(self, features: int, n: float = 10.0, per: str = "layer", dtype=None, device=None):
        super().__init__()
        if per not in ("layer", "neuron"):
            raise ValueError(f"per must be 'layer' or 'neuron', got {per!r}")
        if not n > 0:
            raise ValueError(f"n must be > 0, got {n!r}")
        self.n = float(n)
        shape = () if per == "layer" else (_positive_int("features", features),)
        self.a = nn.Parameter(torch.full(shape, 1.0 / self.n, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (self.n * self.a)

    def extra_repr(self) -> str:
        return f"n={self.n}, per={'layer' if self.a.dim() == 0 else 'neuron'}"


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
        adaptive: None, or 'layer' / 'neuron': an AdaptiveScale (learnable slope, n =
            adaptive_n) before every hidden activation (a graph network for hessmlp).
        dtype, device: passed to every nn.Linear.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 128), out_features: int = 1,
                 activation: Union[str, nn.Module, type] = "tanh", bias: bool = True,
                 final_activation=None, adaptive: Optional[str] = None, adaptive_n: float = 10.0,
                 dtype=None, device=None):
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
                if adaptive is not None:
                    layers.append(AdaptiveScale(sizes[i + 1], adaptive_n, adaptive, dtype, device))
                layers.append(_make_activation(activation))
        if final_activation is not None:
            layers.append(_make_activation(final_activation))
        super().__init__(*layers)


class ResidualMLP(nn.Module):
    """x -> act(W_in x) -> blocks h + act(W_2 act(W_1 h)) -> W_out h: the residual PINN body.

    Args:
        in_features, out_features: d and m.
        width: the width of every block.
        blocks: how many residual blocks.
        activation: as MLP's.
    """

    def __init__(self, in_features: int, width: int = 128, blocks: int = 4, out_features: int = 1,
                 activation: Union[str, nn.Module, type] = "tanh", dtype=None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("width", width), ("blocks", blocks),
                        ("out_features", out_features)):
            _positive_int(name, v)
        kw = dict(dtype=dtype, device=device)
        self.inp = nn.Linear(in_features, width, **kw)
        self.act = _make_activation(activation)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, **kw), _make_activation(activation),
                          nn.Linear(width, width, **kw), _make_activation(activation))
            for _ in range(blocks))
        self.out = nn.Linear(width, out_features, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class FourierFeatures(nn.Module):
    """An input embedding: random Fourier features [sin(2 pi x B), cos(2 pi x B)] (B a fixed
    buffer of N(0, sigma^2) entries, k columns) or the positional encoding [sin(2^j pi x),
    cos(2^j pi x)] for j < frequencies; x itself in front with include_input. Put it before
    an MLP: nn.Sequential(FourierFeatures(...), MLP(ff.out_features, ...)).
    """

    def __init__(self, in_features: int, kind: str = "random", features: int = 64, sigma: float = 1.0,
                 frequencies: int = 6, include_input: bool = False, dtype=None, device=None):
        super().__init__()
        _positive_int("in_features", in_features)
        if kind not in ("random", "positional"):
            raise ValueError(f"kind must be 'random' or 'positional', got {kind!r}")
        self.kind, self.include_input = kind, bool(include_input)
        if kind == "random":
            _positive_int("features", features)
            self.register_buffer("B", torch.randn(in_features, features, dtype=dtype, device=device) * sigma)
            n = 2 * features
        else:
            self.frequencies = _positive_int("frequencies", frequencies)
            n = 2 * frequencies * in_features
        self.out_features = n + (in_features if include_input else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x] if self.include_input else []
        if self.kind == "random":
            p = (2 * math.pi) * x @ self.B
            parts += [torch.sin(p), torch.cos(p)]
        else:
            for j in range(self.frequencies):
                parts += [torch.sin((2.0 ** j * math.pi) * x), torch.cos((2.0 ** j * math.pi) * x)]
        return torch.cat(parts, dim=-1)


class ModifiedMLP(nn.Module):
    """The modified MLP of Wang, Teng & Perdikaris: encoders U = act(W_u x), V = act(W_v x)
    and gated layers h = (1 - z) U + z V with z = act(W h)."""

    def __init__(self, in_features: int, width: int = 128, depth: int = 4, out_features: int = 1,
                 activation: Union[str, nn.Module, type] = "tanh", dtype=None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("width", width), ("depth", depth),
                        ("out_features", out_features)):
            _positive_int(name, v)
        kw = dict(dtype=dtype, device=device)
        self.U, self.V = nn.Linear(in_features, width, **kw), nn.Linear(in_features, width, **kw)
        self.act = _make_activation(activation)
        self.hidden = nn.ModuleList([nn.Linear(in_features, width, **kw)] +
                                    [nn.Linear(width, width, **kw) for _ in range(depth - 1)])
        self.out = nn.Linear(width, out_features, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.act(self.U(x)), self.act(self.V(x))
        h = x
        for layer in self.hidden:
            z = self.act(layer(h))
            h = (1 - z) * u + z * v
        return self.out(h)
