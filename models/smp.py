"""segmentation_models_pytorch's models as one architecture, model_type "smp".

A config names one of smp's architectures and one of its encoders, and gives `smp.create_model`'s
keyword arguments::

    {"model_type": "smp", "arch": "unet", "encoder_name": "resnet34", "in_channels": 1,
     "classes": 2, "aux_params": {"classes": 3}, ...}

The model is built by `smp.create_model(arch, encoder_weights=None, **arguments)`: smp downloads
ImageNet encoder weights by default, which ckptfmt never does (the checkpoint holds the weights),
so `encoder_weights` is not part of a config. Encoders are smp's own (`get_encoder_names()`) or
`tu-` and a timm model's name. A model smp built is recognised when saved (smp records its
arguments); one with `aux_params` does segmentation and classification.

A bare state dict is identified by its encoder (an index of the tensor names of every smp
encoder at depths 3 to 5, see `_signatures.SignatureIndex`), then its architecture (each built with that
encoder on the meta device), with `in_channels`, `classes`, `aux_params`' classes and a U-Net's
`decoder_channels` read off the shapes. `tu-` encoders are not identified.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import nn

from ckptfmt.config.registry import Task, register_model
from ckptfmt.errors import ArchitectureNotRecognisedError, ConfigError, Words

from ._library import check_model_name, import_library, json_defaults, refuse_downloads, require_installed
from ._meta import build_empty, build_for_shapes, shapes_of
from ._signatures import SignatureIndex, index_entry

__all__ = ["INDEX", "index_entries", "infer_config", "smp_model"]

MODEL_TYPE = "smp"
_DOWNLOADS = ("encoder_weights",)
_DEPTHS = (3, 4, 5)


def _smp():
    return import_library("segmentation_models_pytorch", model_type=MODEL_TYPE, extra="smp")


def _architectures() -> Mapping[str, type]:
    return _smp().MODEL_ARCHITECTURES_MAPPING


@functools.cache
def _encoders() -> frozenset[str]:
    return frozenset(_smp().encoders.get_encoder_names())


def _check_names(params: Mapping[str, Any]) -> tuple[str, str]:
    arch = check_model_name(params.get("arch"), lambda: set(_architectures()), what="arch", library="smp")
    encoder = params.get("encoder_name", "resnet34")
    if isinstance(encoder, str) and encoder.startswith("tu-"):
        timm = import_library("timm", model_type=MODEL_TYPE, extra="smp")
        check_model_name(encoder[3:], lambda: set(timm.list_models()), what="encoder_name 'tu-' + timm name",
                         library="timm")
    else:
        check_model_name(encoder, _encoders, what="encoder_name", library="smp")
    return arch, encoder


def defaults(params: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the architecture's class (encoder_weights aside)."""
    arch, _ = _check_names(params)
    return json_defaults(_architectures()[arch], skip=_DOWNLOADS)


def check(params: dict[str, Any]) -> None:
    _check_names(params)
    refuse_downloads(params, _DOWNLOADS, library="smp")
    aux = params.get("aux_params")
    if aux is not None and not (isinstance(aux, dict) and isinstance(aux.get("classes"), int) and aux["classes"] > 0):
        raise ConfigError(f"aux_params must be None or a dict with a positive int 'classes', not {aux!r}")


def task(params: dict[str, Any]) -> Task:
    """Segmentation, and classification too with aux_params (smp then returns masks and labels);
    input sides padded to the encoder's 2**depth."""
    aux = params.get("aux_params")
    return Task(
        "segmentation+classification" if aux else "segmentation", in_channels=params["in_channels"],
        mask_channels=params["classes"], classes=aux["classes"] if aux else None,
        input_multiple=2 ** params.get("encoder_depth", 5),
    )


def recognise(model: Any) -> dict[str, Any] | None:
    """The architecture and arguments of a model smp built (it records them); the encoder
    weights it started from are left out, since the checkpoint holds the trained ones."""
    if not type(model).__module__.startswith("segmentation_models_pytorch."):
        return None
    arch = next((name for name, cls in _architectures().items() if type(model) is cls), None)
    recorded = getattr(model, "_hub_mixin_config", None)
    if arch is None or not isinstance(recorded, Mapping):
        return None
    arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in recorded.items() if k not in _DOWNLOADS}
    return {"arch": arch, **arguments}


def _build(params: dict[str, Any]) -> nn.Module:
    arguments = {k: v for k, v in params.items() if k != "arch"}
    return _smp().create_model(params["arch"], encoder_weights=None, **arguments)


# -- identification --------------------------------------------------------------------------


def index_entries(name: str) -> list[dict[str, Any]]:
    """An encoder's index entries, at each depth it can be built with: in_channels read off its
    first convolution's weight.

    Example:
        >>> [entry["args"] for entry in index_entries("resnet18")]
        [{'encoder_depth': 3}, {'encoder_depth': 4}, {'encoder_depth': 5}]
    """
    encoders = _smp().encoders
    entries = []
    for depth in _DEPTHS:
        try:
            shapes = shapes_of(build_for_shapes(lambda: encoders.get_encoder(name, in_channels=3, depth=depth, weights=None)))
        except (ValueError, KeyError, TypeError, AssertionError, IndexError):  # an encoder without this depth
            continue
        first_conv = next((n for n, shape in shapes.items() if len(shape) == 4), None)
        entries.append(index_entry(name, shapes, reads={"in_channels": (first_conv, 1)}, args={"encoder_depth": depth}))
    return entries


def _configs(arguments: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """The models to try with an encoder that fits: each architecture, its heads' sizes read off
    the shapes."""
    configs = []
    for arch in sorted(_architectures()):
        config = {"arch": arch, **arguments, **_heads(shapes)}
        if arch == "unet":
            config.update(_unet_decoder(shapes))
        configs.append(config)
    return configs


_UNKNOWN = "its encoder.* tensors are those of no smp encoder ('tu-' encoders are not identified)"


def _unfit(named: list[str], shaped: list[str]) -> str:
    if not shaped:
        return _UNKNOWN
    return (f"its encoder is smp's {', '.join(shaped)}, but no smp architecture with it has exactly these decoder "
            "and head tensors; give the architecture and its arguments: "
            + Words("model_type='smp', overrides={'arch': 'NAME', 'encoder_name': 'NAME', 'ARGUMENT': 'VALUE'}",
                    "--model-type smp --set arch=NAME --set encoder_name=NAME --set ARGUMENT=VALUE"))


# smp's encoders are partly timm's and torchvision's classes, so its index depends on them too.
INDEX = SignatureIndex(
    "smp", distribution="segmentation-models-pytorch", depends_on=("timm", "torchvision"), names=_encoders,
    build=_build, name_argument="encoder_name", prefix="encoder.", configs=_configs, unknown=_UNKNOWN, unfit=_unfit,
    # An architecture that does not take this encoder or depth.
    unbuildable=(Exception,), what="encoders",
)


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | list[dict[str, Any]]:
    """The smp models whose tensor names and shapes are exactly these: one argument dict, or a
    list of them when several fit.

    Raises:
        ArchitectureNotRecognisedError: smp is not installed, or no smp model fits.

    Example:
        >>> infer_config(shapes_of(smp.Unet("resnet18", encoder_weights=None, classes=2, aux_params={"classes": 3})))
        {'arch': 'unet', 'encoder_name': 'resnet18', 'encoder_depth': 5, 'in_channels': 3, 'classes': 2, ...}
    """
    require_installed("segmentation_models_pytorch", extra="smp")
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    if not any(name.startswith("encoder.") for name in shapes) or not any(n.startswith("segmentation_head.") for n in shapes):
        raise ArchitectureNotRecognisedError("not an smp model: it has no encoder.* and segmentation_head.* tensors")
    return INDEX.identify(shapes)


def _heads(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """classes from the segmentation head's convolution, aux_params' classes from the
    classification head's last linear layer."""
    segmentation = [s for n, s in shapes.items() if n.startswith("segmentation_head.") and len(s) >= 3]
    classification = [s for n, s in shapes.items() if n.startswith("classification_head.") and len(s) == 2]
    heads: dict[str, Any] = {"classes": segmentation[0][0]} if segmentation else {}
    if classification:
        heads["aux_params"] = {"classes": classification[-1][0]}
    return heads


def _unet_decoder(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    channels = []
    while f"decoder.blocks.{len(channels)}.conv1.0.weight" in shapes:
        channels.append(shapes[f"decoder.blocks.{len(channels)}.conv1.0.weight"][0])
    return {"decoder_channels": channels} if channels else {}


@register_model(
    MODEL_TYPE, infer_config=infer_config, check=check, task=task, defaults=defaults, recognise=recognise,
    build_empty=lambda params: build_empty(lambda: _build(params)), fallback=True, preference=20,
    example={"arch": "unet", "encoder_name": "resnet18", "in_channels": 1, "classes": 2, "aux_params": {"classes": 3}},
)
def smp_model(arch: str, **kwargs: Any) -> nn.Module:
    """An smp model, built without downloading encoder weights; it remembers its arguments.

    Example:
        >>> model = ckptfmt.create_model("smp", "unet", encoder_name="resnet34", classes=2, aux_params={"classes": 3})
        >>> ckptfmt.save(model, "unet.safetensors")   # smp.Unet(...) itself is recognised too
    """
    check({"arch": arch, **kwargs})
    return _build({"arch": arch, **kwargs})
