"""torchvision's models as one architecture, model_type "torchvision".

A config names a model of `torchvision.models.list_models()` and gives its builder's keyword
arguments::

    {"model_type": "torchvision", "model_name": "resnet18", "num_classes": 10}

The model is built by `torchvision.models.get_model(model_name, weights=None, **arguments)`, with
`weights_backbone=None` too where the builder takes it (torchvision's detection and
segmentation builders download an ImageNet backbone by default, even without weights). torchvision
models record nothing of how they were built, so `ckptfmt.create_model("torchvision", "resnet18",
num_classes=10)` builds one that does.

A bare state dict is identified through an index of every model's tensor names and shapes
(`_signatures.SignatureIndex`), `num_classes` read off the classifier, confirmed by a meta-device build.
The quantization package's models are float twins of the plain ones and are not indexed: a plain
`resnet18`'s weights are identified as `resnet18`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ckptfmt.config.registry import Task, register_model
from ckptfmt.errors import Words

from ._library import check_model_name, import_library, refuse_downloads, require_installed
from ._meta import build_empty, build_for_shapes, shapes_of
from ._signatures import SignatureIndex, index_entry

__all__ = ["INDEX", "index_entries", "infer_config", "torchvision_model"]

MODEL_TYPE = "torchvision"
_DOWNLOADS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")
# Arguments that change the tensors but have no default a state dict would show: each model's
# weights are indexed with these too.
_VARIANTS = {"googlenet": [{"aux_logits": False}], "inception_v3": [{"aux_logits": False}]}
# A probe size for classifiers, as torchvision's own evaluation transforms crop them.
_INPUT_SIZES = {"inception_v3": (299, 299), "quantized_inception_v3": (299, 299)}


def _models():
    return import_library("torchvision.models", model_type=MODEL_TYPE, extra="torchvision")


@functools.cache
def _names() -> frozenset[str]:
    return frozenset(_models().list_models())


@functools.cache
def _names_in(package: str) -> frozenset[str]:
    models = _models()
    return frozenset(models.list_models(module=getattr(models, package)))


def _check_name(name: Any) -> str:
    return check_model_name(name, _names, what="model_name", library="torchvision")


def _builder_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(_models().get_model_builder(name)).parameters


def defaults(params: dict[str, Any]) -> dict[str, Any]:
    """num_classes as the builder fills it in without weights: its own default, else the number
    of categories its weights were trained on (ResNet's 1000, FCN's 21, Faster R-CNN's 91)."""
    name = _check_name(params.get("model_name"))
    parameters = _builder_parameters(name)
    result: dict[str, Any] = {}
    if "aux_loss" in parameters:
        result["aux_loss"] = False
    default = parameters["num_classes"].default if "num_classes" in parameters else None
    if isinstance(default, int):
        result["num_classes"] = default
        return result
    try:
        categories = _models().get_model_weights(name).DEFAULT.meta.get("categories")
    except (ValueError, AttributeError, KeyError):
        categories = None
    if categories:
        result["num_classes"] = len(categories)
    return result


def check(params: dict[str, Any]) -> None:
    _check_name(params["model_name"])
    refuse_downloads(params, _DOWNLOADS, library="torchvision")


def task(params: dict[str, Any]) -> Task | None:
    """Classifiers (at 224 x 224, or their own size) and segmentation models; detection, video
    and optical flow models have no task the predictor runs."""
    name, classes = params["model_name"], params.get("num_classes")
    if not classes:
        return None
    if name in _names_in("segmentation"):
        return Task("segmentation", in_channels=3, mask_channels=classes, outputs=_segmentation_outputs)
    if name in _names_in("detection") | _names_in("video") | _names_in("optical_flow"):
        return None
    size = params.get("image_size")
    size = (size, size) if isinstance(size, int) else _INPUT_SIZES.get(name, (224, 224))
    return Task("classification", in_channels=3, classes=classes, input_size=size)


def _segmentation_outputs(output: Mapping[str, Any]) -> tuple[Any, None]:
    return output["out"], None


def _build(params: dict[str, Any]) -> nn.Module:
    name = params["model_name"]
    arguments = {k: v for k, v in params.items() if k != "model_name"}
    if "weights_backbone" in _builder_parameters(name):
        arguments["weights_backbone"] = None
    return _models().get_model(name, weights=None, **arguments)


def index_entries(name: str) -> list[dict[str, Any]]:
    """One model's index entries, for each variant of its arguments: num_classes read off the
    tensors it changes (found by building the model with another num_classes).

    Example:
        >>> [entry["args"] for entry in index_entries("googlenet")]
        [{}, {'aux_logits': False}]
    """
    entries = []
    for variant in [{}, *_VARIANTS.get(name, []), *([{"aux_loss": True}] if "aux_loss" in _builder_parameters(name) else [])]:
        params = {"model_name": name, **variant}
        shapes = shapes_of(build_for_shapes(lambda: _build(params)))
        try:
            other = shapes_of(build_for_shapes(lambda: _build({**params, "num_classes": 7})))
        except (TypeError, ValueError):  # a builder without num_classes (RAFT)
            other = shapes
        classifier = [n for n in shapes if other.get(n) != shapes[n]] if set(other) == set(shapes) else []
        entries.append(index_entry(name, shapes, leave_out=classifier, args=variant,
                                   reads={"num_classes": (classifier[0], 0)} if classifier else {}))
    return entries


def _unfit(named: list[str], shaped: list[str]) -> str:
    return (f"the tensor names are those of torchvision's {', '.join(named[:5])}, but the shapes fit none of them "
            "with any num_classes; if it is one of them built with other arguments, give them: "
            + Words("model_type='torchvision', overrides={'model_name': 'NAME', 'ARGUMENT': 'VALUE'}",
                    "--model-type torchvision --set model_name=NAME --set ARGUMENT=VALUE"))


INDEX = SignatureIndex("torchvision", distribution="torchvision", names=lambda: _names() - _names_in("quantization"),
                       build=_build, unknown="no torchvision model has these tensor names", unfit=_unfit)


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | list[dict[str, Any]]:
    """The torchvision models whose tensor names and shapes are exactly these, with
    `num_classes` read off the classifier: one argument dict, or a list for twins.

    Raises:
        ArchitectureNotRecognisedError: torchvision is not installed, or no model fits.

    Example:
        >>> infer_config(shapes_of(torchvision.models.resnet18(num_classes=10)))
        {'model_name': 'resnet18', 'num_classes': 10}
    """
    require_installed("torchvision", extra="torchvision")
    return INDEX.identify(shapes)


@register_model(
    MODEL_TYPE, infer_config=infer_config, check=check, task=task, defaults=defaults,
    build_empty=lambda params: build_empty(lambda: _build(params)), fallback=True, preference=10,
    example={"model_name": "squeezenet1_1", "num_classes": 3},
)
def torchvision_model(model_name: str, **kwargs: Any) -> nn.Module:
    """A torchvision model, built without downloading anything; it remembers its arguments.

    Example:
        >>> model = ckptfmt.create_model("torchvision", "resnet18", num_classes=10)
        >>> ckptfmt.save(model, "r18.safetensors")
    """
    check({"model_name": model_name, **kwargs})
    return _build({"model_name": model_name, **kwargs})
