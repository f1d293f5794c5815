"""The multi-task U-Net of the brain-tumour MRI work: segmentation and classification.

An encoder of `depth` levels (two 3x3 conv+BN+ReLU each, base_filters * 2**i channels,
max-pool down), a bottleneck, and a decoder of transposed convolutions with skip
concatenation. A 1x1 head gives segmentation logits at input resolution; a head on the
bottleneck (global average pool, then linear) gives classification logits.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ckptfmt.config.registry import Task, get_model_entry, register_model
from ckptfmt.errors import ArchitectureNotRecognisedError, ConfigError

__all__ = ["MultiTaskUNet", "create_multi_task_model", "infer_config"]

MAX_DEPTH = 8
# Far above any real U-Net, low enough that a hostile number cannot make a shape overflow.
_LIMITS = {
    "base_filters": 4096, "depth": MAX_DEPTH, "in_channels": 4096,
    "seg_out_channels": 4096, "cls_num_classes": 1_000_000,
}


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def check(params: dict[str, int]) -> None:
    """The ranges of the five arguments (their types come from the signature)."""
    for name, limit in _LIMITS.items():
        if not 1 <= params[name] <= limit:
            raise ConfigError(f"{name} must lie in 1..{limit}, not {params[name]}")


def task(params: dict[str, int]) -> Task:
    return Task(
        "segmentation+classification", in_channels=params["in_channels"], classes=params["cls_num_classes"],
        mask_channels=params["seg_out_channels"], input_multiple=2 ** params["depth"],
    )


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Recover the five architecture arguments from a state dict's tensor shapes alone.

    Args:
        shapes: tensor names to shape tuples.

    Returns:
        `{"base_filters", "depth", "in_channels", "seg_out_channels", "cls_num_classes"}`.

    Raises:
        ArchitectureNotRecognisedError: the state dict is not this architecture; the message
            says which tensor is missing, unexpected or of the wrong shape.

    Example:
        >>> model = MultiTaskUNet(base_filters=16, depth=3)
        >>> infer_config({name: tuple(t.shape) for name, t in model.state_dict().items()})["depth"]
        3
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ArchitectureNotRecognisedError(f"not a multi-task U-Net: it has no tensor {name!r}")
        return tuple(shapes[name])

    first, seg, cls = shape("enc.0.0.weight"), shape("seg_head.weight"), shape("cls_head.weight")
    if len(first) != 4 or len(seg) != 4 or len(cls) != 2:
        raise ArchitectureNotRecognisedError(
            "not a multi-task U-Net: enc.0.0.weight, seg_head.weight and cls_head.weight have "
            f"shapes {list(first)}, {list(seg)}, {list(cls)}"
        )
    depth = 0
    while f"enc.{depth}.0.weight" in shapes:
        depth += 1
    params = {
        "base_filters": first[0], "depth": depth, "in_channels": first[1],
        "seg_out_channels": seg[0], "cls_num_classes": cls[0],
    }
    if any(not 1 <= params[name] <= limit for name, limit in _LIMITS.items()):
        raise ArchitectureNotRecognisedError(f"not a multi-task U-Net: the shapes give {params}")
    expected = get_model_entry("multitask").expected_state(params)
    for name, (want, _) in expected.items():
        if shape(name) != want:
            raise ArchitectureNotRecognisedError(
                f"not a multi-task U-Net with {params}: {name} is {list(shape(name))}, "
                f"expected {list(want)}"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ArchitectureNotRecognisedError(
            f"not a multi-task U-Net: unexpected tensor{'s' if len(extra) > 1 else ''} "
            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
        )
    return params


@register_model(
    "multitask", infer_config=infer_config, check=check, task=task,
    example={"base_filters": 4, "depth": 2, "in_channels": 2, "seg_out_channels": 2, "cls_num_classes": 3},
)
class MultiTaskUNet(nn.Module):
    """U-Net with a segmentation head and a classification head.

    Args:
        base_filters: channels of the first level; level i has base_filters * 2**i.
        depth: number of encoder levels (inputs must have sides divisible by 2**depth).
        in_channels: channels of the input image.
        seg_out_channels: segmentation logit channels.
        cls_num_classes: classification logits.

    Example:
        >>> model = MultiTaskUNet(base_filters=16, depth=3)
        >>> seg, cls = model(torch.zeros(2, 1, 64, 64))
        >>> seg.shape, cls.shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 2]))
    """

    def __init__(
        self, base_filters: int = 64, depth: int = 4, in_channels: int = 1,
        seg_out_channels: int = 1, cls_num_classes: int = 2,
    ):
        super().__init__()
        widths = [base_filters * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.enc = nn.ModuleList(
            _double_conv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[depth - 1], widths[depth])
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)
        )
        self.dec = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in range(depth))
        self.seg_head = nn.Conv2d(widths[0], seg_out_channels, 1)
        self.cls_head = nn.Linear(widths[depth], cls_num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        multiple = 2**self.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"input sides {tuple(x.shape[-2:])} must be multiples of 2**depth = {multiple}; "
                "pad the image (MultiTaskPredictor does this for you)"
            )
        skips = []
        for level in self.enc:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        cls_logits = self.cls_head(torch.flatten(x.mean(dim=(2, 3)), 1))
        for i in reversed(range(self.depth)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.seg_head(x), cls_logits


def create_multi_task_model(**params: int) -> MultiTaskUNet:
    """The seed's factory: `create_multi_task_model(**config.get_model_params())`."""
    return MultiTaskUNet(**params)
