"""timm's models as one architecture, model_type "timm".

A config names a model of `timm.list_models()` and gives `timm.create_model`'s keyword
arguments::

    {"model_type": "timm", "model_name": "resnet18", "num_classes": 5, "in_chans": 1, ...}

The model is built by `timm.create_model(model_name, pretrained=False, **arguments)`; a name is
looked up in timm's own list only (a hub id `hf-hub:...`, a local folder `local-dir:...`, or a
pretrained tag `resnet18.a1_in1k` is refused: they choose downloaded weights and configs, and
ckptfmt never downloads). `num_classes` and `in_chans` are always written out, their defaults
taken from the model's pretrained config as timm does.

A model built by timm itself is recognised when saved (timm records its name and arguments). A
bare state dict is identified through an index of every timm model's tensor names and shapes
(see `_signatures.SignatureIndex`), with `num_classes` and `in_chans` read off the classifier and the
first convolution, then confirmed by building the model on the meta device. A Hub-style folder's
`config.json` (timm's `push_to_hub`) is read as the config of the weights beside it
(`read_foreign_config`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import nn

from ckptfmt.config.registry import Task, register_model
from ckptfmt.errors import ConfigError, Words

from ._library import check_model_name, import_library, refuse_downloads, require_installed
from ._meta import build_empty, build_for_shapes, shapes_of
from ._signatures import SignatureIndex, index_entry

__all__ = ["INDEX", "index_entries", "infer_config", "read_foreign_config", "timm_model"]

MODEL_TYPE = "timm"
# What would make timm fetch or read weights or configs.
_DOWNLOADS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _timm():
    return import_library("timm", model_type=MODEL_TYPE, extra="timm")


@functools.cache
def _names() -> frozenset[str]:
    return frozenset(_timm().list_models())


def _check_name(name: Any) -> str:
    if isinstance(name, str) and "." in name and name.split(".")[0] in _names():
        raise ConfigError(
            f"model_name {name!r} names pretrained weights ({name.split('.', 1)[1]!r}), which ckptfmt never "
            f"downloads; give the architecture, {name.split('.')[0]!r} (the checkpoint holds the weights)"
        )
    return check_model_name(name, _names, what="model_name", library="timm")


def _pretrained_cfg(name: str) -> Any:
    return _timm().models.get_pretrained_cfg(name)


def defaults(params: dict[str, Any]) -> dict[str, Any]:
    """The arguments timm itself fills in from the model's pretrained config."""
    config = _pretrained_cfg(_check_name(params.get("model_name")))
    if config is None:
        return {"in_chans": 3}
    result = {"in_chans": config.input_size[0] if config.input_size else 3}
    if config.num_classes is not None and config.num_classes >= 0:
        result["num_classes"] = config.num_classes
    return result


def check(params: dict[str, Any]) -> None:
    _check_name(params["model_name"])
    refuse_downloads(params, _DOWNLOADS, library="timm")


def task(params: dict[str, Any]) -> Task | None:
    """A classifier, run at the model's input size (timm evaluates every model at its pretrained
    config's size); a model without a classifier (num_classes=0, features_only) has no task."""
    classes = params.get("num_classes")
    if not classes or params.get("features_only"):
        return None
    size = params.get("img_size")
    if size is None:
        config = _pretrained_cfg(params["model_name"])
        size = list(config.input_size[1:]) if config is not None and config.input_size else [224, 224]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return Task("classification", in_channels=params.get("in_chans", 3), classes=classes, input_size=size)


def recognise(model: Any) -> dict[str, Any] | None:
    """The name and arguments of a model that timm built (it records both)."""
    if not type(model).__module__.startswith("timm.") or not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        return None
    name = model.pretrained_cfg.get("architecture")
    if not name:
        return None
    arguments = _timm().models.get_model_args(model)
    return {"model_name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}}


def _build(params: dict[str, Any]) -> nn.Module:
    arguments = {k: v for k, v in params.items() if k != "model_name"}
    return _timm().create_model(params["model_name"], pretrained=False, **arguments)


# -- identification --------------------------------------------------------------------------


def index_entries(name: str) -> list[dict[str, Any]]:
    """One model's index entries: num_classes read off its classifier and in_chans off its first
    convolution's weight; and the same without its classifier (num_classes=0).

    Example:
        >>> [entry["args"] for entry in index_entries("resnet18")]
        [{}, {'num_classes': 0}]
    """
    timm = _timm()
    model = build_for_shapes(lambda: timm.create_model(name, pretrained=False))
    shapes = shapes_of(model)
    config = model.pretrained_cfg
    heads = config.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    classifier = [n for n in shapes if any(n.startswith(head + ".") for head in heads)]
    first = config.get("first_conv")
    first_conv = f"{first}.weight" if isinstance(first, str) and len(shapes.get(f"{first}.weight", ())) >= 2 else None
    in_chans = {"in_chans": (first_conv, 1)}
    entries = [index_entry(name, shapes, leave_out=classifier,
                           reads={"num_classes": (classifier[0], 0), **in_chans} if classifier else in_chans)]
    if classifier:
        body = {n: shape for n, shape in shapes.items() if n not in classifier}
        entries.append(index_entry(name, body, reads=in_chans, args={"num_classes": 0}))
    return entries


def _unfit(named: list[str], shaped: list[str]) -> str:
    return (f"the tensor names are those of timm's {', '.join(named[:5])}, but the shapes fit none of them with any "
            "num_classes and in_chans; if it is one of them built with other arguments, give them: "
            + Words("model_type='timm', overrides={'model_name': 'NAME', 'ARGUMENT': 'VALUE'}",
                    "--model-type timm --set model_name=NAME --set ARGUMENT=VALUE"))


INDEX = SignatureIndex("timm", distribution="timm", names=_names, build=_build,
                       unknown="no timm model has these tensor names", unfit=_unfit)


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | list[dict[str, Any]]:
    """The timm models whose tensor names and shapes are exactly these, with `num_classes` and
    `in_chans` read off them: one argument dict, or a list of them for twins (models with the
    same tensors, which `identify`'s probe tells apart or refuses).

    Raises:
        ArchitectureNotRecognisedError: timm is not installed, or no timm model fits.

    Example:
        >>> infer_config(shapes_of(timm.create_model("convnext_atto", num_classes=7)))
        {'model_name': 'convnext_atto', 'num_classes': 7, 'in_chans': 3}
    """
    require_installed("timm", extra="timm")
    return INDEX.identify(shapes)


# -- a Hub-style folder's config.json ---------------------------------------------------------


def read_foreign_config(document: dict[str, Any]) -> dict[str, Any] | None:
    """The config that a `config.json` as timm's `push_to_hub` and `save_for_hf` write it gives
    the weights beside it: the architecture with its arguments, the normalisation its
    `pretrained_cfg` gives (mean and std, for images scaled to [0, 1]) and its `label_names` as
    the class names; None for another library's document. An export of an older timm, which
    keeps the pretrained config at the top level, is read too.

    Example:
        >>> config = read_foreign_config(json.loads(Path("hub/config.json").read_text()))
        >>> config["model_name"], config["in_chans"], config["normalization"]["mean"], config["class_names"]
        ('resnet18', 1, [0.449], ['cat', 'dog', 'owl'])
    """
    name, pretrained = document.get("architecture"), document.get("pretrained_cfg", document)
    if not isinstance(name, str) or not isinstance(pretrained, dict):
        return None
    arguments = document.get("model_args")
    config = {k: v for k, v in arguments.items() if k not in _DOWNLOADS} if isinstance(arguments, dict) else {}
    config = {"model_name": name, **config}
    classes = document.get("num_classes", pretrained.get("num_classes"))
    if classes is not None:
        config["num_classes"] = classes
    size = pretrained.get("input_size")
    if "in_chans" not in config and isinstance(size, list) and size:
        config["in_chans"] = size[0]
    if "mean" in pretrained and "std" in pretrained:
        config["normalization"] = {"mode": "fixed", "mean": pretrained["mean"], "std": pretrained["std"]}
    labels = document.get("label_names", pretrained.get("label_names", pretrained.get("labels")))
    if isinstance(labels, dict):  # class index -> name, where the indexes may have gaps
        labels = [labels[str(i)] for i in range(len(labels))] if set(labels) == {str(i) for i in range(len(labels))} \
            else None
    if labels:
        config["class_names"] = labels
    return config


@register_model(
    MODEL_TYPE, infer_config=infer_config, check=check, task=task, defaults=defaults,
    recognise=recognise, build_empty=lambda params: build_empty(lambda: _build(params)), fallback=True,
    preference=40, example={"model_name": "test_convnext", "num_classes": 3, "in_chans": 2},
    read_foreign_config=read_foreign_config,
)
def timm_model(model_name: str, **kwargs: Any) -> nn.Module:
    """A timm model, built without downloading anything; it remembers its arguments.

    Example:
        >>> model = ckptfmt.create_model("timm", "resnet18", num_classes=5, in_chans=1)
        >>> ckptfmt.save(model, "r18.safetensors")      # or timm.create_model(...): recognised
    """
    check({"model_name": model_name, **kwargs})
    return _build({"model_name": model_name, **kwargs})
