"""A third-party architecture: a gated MLP whose constructor takes an int, a float, a str, a
bool, a tuple and a dict, each of which changes what the model computes. Registered through the
`ckptfmt.models` entry point only; nothing in ckptfmt names it.

`AlwaysFails` is a plugin with a bug: its infer_config raises on every state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from ckptfmt import ArchitectureNotRecognisedError, register_model

ACTIVATIONS = {"gelu": nn.functional.gelu, "tanh": torch.tanh, "relu": torch.relu}


def infer_config(shapes):
    """`hidden` and `classes` from the shapes; the other arguments do not change them."""
    if "layers.0.weight" not in shapes or "head.weight" not in shapes:
        raise ArchitectureNotRecognisedError("not a gated MLP: it has no layers.0.weight and head.weight")
    hidden, index = [], 0
    while f"layers.{index}.weight" in shapes:
        hidden.append(shapes[f"layers.{index}.weight"][0])
        index += 1
    in_features = shapes["layers.0.weight"][1]
    gated = "gate.weight" in shapes
    return {"in_features": in_features, "hidden": hidden, "classes": shapes["head.weight"][0], "gated": gated}


@register_model("gated_mlp", infer_config=infer_config)
class GatedMLP(nn.Module):
    def __init__(
        self, in_features: int = 4, hidden: tuple[int, ...] = (8, 8), classes: int = 3, dropout: float = 0.0,
        activation: str = "gelu", gated: bool = True, head: dict | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.gate = nn.Linear(widths[-1], widths[-1]) if gated else None
        self.head = nn.Linear(widths[-1], classes)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.temperature = float((head or {}).get("temperature", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.dropout(self.activation(layer(x)))
        if self.gate is not None:
            x = x * torch.sigmoid(self.gate(x))
        return self.head(x) / self.temperature


def _always_fails(shapes):
    raise TypeError("this plugin's infer_config has a bug")


@register_model("always_fails", infer_config=_always_fails)
class AlwaysFails(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.fc = nn.Linear(width, width)
