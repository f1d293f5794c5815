"""MONAI's segmentation networks as one architecture, model_type "monai".

A config names one network of an explicit allow-list (`NETWORKS`, looked up in
`monai.networks.nets`) and gives its constructor's arguments::

    {"model_type": "monai", "model_name": "UNet", "spatial_dims": 2, "in_channels": 1,
     "out_channels": 2, "channels": [16, 32, 64], "strides": [2, 2], ...}

Nothing else is ever looked up: not an import path, and never a MONAI bundle's `_target_`,
which names any callable and runs it. MONAI's networks record nothing of how they were built, so
`ckptfmt.create_model("monai", "UNet", spatial_dims=2, ...)` builds one that does.

A bare state dict of a `UNet`, `BasicUNet` or `SegResNet` is identified by reading its arguments
off the shapes (spatial_dims, in_channels, out_channels, and channels, features or
init_filters, blocks and kernel sizes), confirmed by a meta-device build. What leaves no trace
in the weights takes MONAI's defaults, and a UNet's strides are taken as 2 at every level (they
change no shape). `DynUNet`, `SwinUNETR`, `AttentionUnet` and `UNETR` are built from a config
but not identified.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ckptfmt.config.registry import Task, register_model
from ckptfmt.errors import ArchitectureNotRecognisedError, ConfigError, MissingDependencyError

from ._library import import_library, json_defaults, library_missing
from ._meta import build_empty, build_for_shapes, first_difference, shapes_of

__all__ = ["NETWORKS", "infer_config", "monai_model"]

MODEL_TYPE = "monai"
NETWORKS = ("AttentionUnet", "BasicUNet", "DynUNet", "SegResNet", "SwinUNETR", "UNETR", "UNet")

Shapes = Mapping[str, tuple[int, ...]]


def _network(name: Any) -> type:
    if not isinstance(name, str) or name not in NETWORKS:
        raise ConfigError(
            f"model_name {name!r} is not one of the MONAI networks ckptfmt builds ({', '.join(NETWORKS)}); a "
            "name is looked up in this list only, never imported by its path nor through a bundle's _target_"
        )
    return getattr(import_library("monai.networks.nets", model_type=MODEL_TYPE, extra="monai"), name)


def defaults(params: dict[str, Any]) -> dict[str, Any]:
    """The network's own defaults, those a config can hold."""
    return json_defaults(_network(params.get("model_name")))


def check(params: dict[str, Any]) -> None:
    _network(params["model_name"])


def task(params: dict[str, Any]) -> Task:
    """Segmentation of 2-D images or 3-D volumes; input sides padded to the network's total
    downsampling."""
    name = params["model_name"]
    size = None
    if name in ("UNet", "AttentionUnet"):
        multiple = math.prod(_largest(s) for s in params.get("strides", [])) or 1
    elif name == "DynUNet":
        multiple = math.prod(_largest(s) for s in params.get("strides", [])) or 1
    elif name == "BasicUNet":
        multiple = 16
    elif name == "SegResNet":
        multiple = 2 ** (len(params.get("blocks_down", [])) - 1)
    elif name == "SwinUNETR":
        multiple = 32
    else:  # UNETR: one input size
        multiple, image = 1, params.get("img_size")
        size = tuple(image) if isinstance(image, list) else (image,) * params.get("spatial_dims", 3)
    return Task("segmentation", in_channels=params["in_channels"], mask_channels=params["out_channels"],
                spatial_dims=params.get("spatial_dims", 3), input_multiple=multiple, input_size=size)


def _largest(stride: Any) -> int:
    return max(stride) if isinstance(stride, list) else stride


def _build(params: dict[str, Any]) -> nn.Module:
    network = _network(params["model_name"])
    signature = inspect.signature(network).parameters
    arguments = {}
    for name, value in params.items():
        if name == "model_name":
            continue
        # JSON has no tuples; where MONAI's own default is one, it gets one back.
        parameter = signature.get(name)
        wants_tuple = parameter is not None and isinstance(parameter.default, tuple)
        arguments[name] = tuple(value) if wants_tuple and isinstance(value, list) else value
    return network(**arguments)


# -- identification --------------------------------------------------------------------------


def _read_unet(shapes: Shapes) -> dict[str, Any]:
    residual = "model.0.conv.unit0.conv.weight" in shapes
    conv = "conv.unit0.conv.weight" if residual else "conv.weight"
    first = shapes[f"model.0.{conv}"]
    channels, prefix = [first[0]], "model.1.submodule"
    while f"{prefix}.0.{conv}" in shapes:
        channels.append(shapes[f"{prefix}.0.{conv}"][0])
        prefix += ".1.submodule"
    if f"{prefix}.{conv}" not in shapes:
        raise KeyError(f"{prefix}.{conv}")
    channels.append(shapes[f"{prefix}.{conv}"][0])
    # The last up layer: a transposed convolution (in, out, ...), then with residual units a convolution (out, in, ...).
    up = shapes["model.2.0.conv.weight" if residual else "model.2.conv.weight"]
    out_channels = shapes["model.2.1.conv.unit0.conv.weight"][0] if residual else up[1]
    units = len({m.group(1) for n in shapes for m in [re.match(r"model\.0\.conv\.unit(\d+)\.", n)] if m})
    params = {
        "model_name": "UNet", "spatial_dims": len(first) - 2, "in_channels": first[1], "out_channels": out_channels,
        "channels": channels, "strides": [2] * (len(channels) - 1), "kernel_size": first[2],
        "up_kernel_size": up[2], "num_res_units": units,
    }
    if any(n.endswith("adn.N.running_mean") for n in shapes):
        params["norm"] = "BATCH"
    return params


def _read_basic_unet(shapes: Shapes) -> dict[str, Any]:
    first = shapes["conv_0.conv_0.conv.weight"]
    features = [first[0], *(shapes[f"down_{i}.convs.conv_0.conv.weight"][0] for i in range(1, 5)),
                shapes["upcat_1.convs.conv_1.conv.weight"][0]]
    return {"model_name": "BasicUNet", "spatial_dims": len(first) - 2, "in_channels": first[1],
            "out_channels": shapes["final_conv.weight"][0], "features": features}


def _read_seg_res_net(shapes: Shapes) -> dict[str, Any]:
    first = shapes["convInit.conv.weight"]

    def blocks(kind: str, first_block: int) -> list[int]:
        levels: dict[int, set[int]] = {}
        for name in shapes:
            match = re.match(rf"{kind}\.(\d+)\.(\d+)\.", name)
            if match and int(match.group(2)) >= first_block:
                levels.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
        return [len(levels[level]) for level in sorted(levels)]

    # A down level is a downsampling convolution (.0, none at the first level) and its blocks.
    return {"model_name": "SegResNet", "spatial_dims": len(first) - 2, "init_filters": first[0],
            "in_channels": first[1], "out_channels": shapes["conv_final.2.conv.weight"][0],
            "blocks_down": blocks("down_layers", 1), "blocks_up": blocks("up_layers", 0)}


# The first tensor each reader needs: the one that says which network the weights may be.
_READERS: dict[str, tuple[str, Callable[[Shapes], dict[str, Any]]]] = {
    "UNet": ("model.0.", _read_unet),
    "BasicUNet": ("conv_0.conv_0.conv.weight", _read_basic_unet),
    "SegResNet": ("convInit.conv.weight", _read_seg_res_net),
}


def infer_config(shapes: Shapes) -> dict[str, Any]:
    """The arguments of a MONAI UNet, BasicUNet or SegResNet, read off its tensor shapes and
    confirmed by building it on the meta device.

    Raises:
        ArchitectureNotRecognisedError: MONAI is not installed, or the weights are none of these.

    Example:
        >>> infer_config(shapes_of(UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2))))
        {'model_name': 'UNet', 'spatial_dims': 2, 'in_channels': 1, 'out_channels': 3, 'channels': [8, 16, 32], ...}
    """
    if library_missing("monai"):
        raise MissingDependencyError("MONAI is not installed here, so its networks were not considered "
                                     "(pip install 'ckptfmt[monai]')")
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    reasons = []
    for network, (marker, read) in _READERS.items():
        if not any(name.startswith(marker) for name in shapes):
            continue
        try:
            params = read(shapes)
        except (KeyError, IndexError) as exc:
            reasons.append(f"not a MONAI {network}: it has no tensor {exc.args[0]!r}")
            continue
        difference = first_difference(_expected(params), shapes)
        if difference is None:
            return params
        reasons.append(f"not a MONAI {network} with the arguments its shapes give ({difference})")
    raise ArchitectureNotRecognisedError(
        "; ".join(reasons) if reasons else f"not one of the MONAI networks ckptfmt identifies ({', '.join(_READERS)})"
    )


def _expected(params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return shapes_of(build_for_shapes(lambda: _build(params)))


@register_model(
    MODEL_TYPE, infer_config=infer_config, check=check, task=task, defaults=defaults,
    build_empty=lambda params: build_empty(lambda: _build(params)), fallback=True, preference=30,
    example={"model_name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
             "strides": [2, 2], "num_res_units": 1},
)
def monai_model(model_name: str, **kwargs: Any) -> nn.Module:
    """A MONAI network of the allow-list; it remembers its arguments.

    Example:
        >>> model = ckptfmt.create_model("monai", "UNet", spatial_dims=2, in_channels=1, out_channels=2,
        ...                              channels=[16, 32, 64], strides=[2, 2])
        >>> ckptfmt.save(model, "unet.safetensors")
    """
    return _build({"model_name": model_name, **kwargs})
