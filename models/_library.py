"""The guards every library adapter (timm, torchvision, smp, MONAI) puts around its library.

- The library is imported only when one of its models is built or identified
  (`import_library`), and a missing one is a MissingDependencyError naming the extra to install;
  where it is not installed, identification says so without importing anything
  (`require_installed`).
- A model name read from a file is looked up in the library's own list of models and nowhere
  else (`check_model_name`): no import path, no hub or local-folder name, nothing with ':' or
  '/'.
- Nothing is downloaded or read from the disk to build a model: every argument that would fetch
  weights or configs is refused (`refuse_downloads`), and each adapter passes the library's
  "no weights" values itself.
- A builder's defaults become a config's values only where they are JSON (`json_defaults`).
"""

from __future__ import annotations

import difflib
import enum
import importlib
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from ckptfmt.errors import ConfigError, MissingDependencyError
from ckptfmt.io.jsondoc import plain_json

__all__ = [
    "check_model_name",
    "import_library",
    "json_defaults",
    "library_missing",
    "library_version",
    "refuse_downloads",
    "require_installed",
]


def library_missing(module: str) -> bool:
    """Whether `module` cannot be imported here, found without importing it.

    Example:
        >>> library_missing("monai")
        False
    """
    return importlib.util.find_spec(module) is None


def require_installed(module: str, *, extra: str) -> None:
    """For an adapter's infer_config: a library that is not installed recognises nothing, said
    without importing anything.

    Example:
        >>> require_installed("timm", extra="timm")   # MissingDependencyError if it is missing
    """
    if library_missing(module):
        raise MissingDependencyError(f"{module} is not installed here, so its models were not considered "
                                     f"(pip install 'ckptfmt[{extra}]')")


def import_library(module: str, *, model_type: str, extra: str) -> Any:
    """The library's module, imported now (each costs 2 to 3 s, so only when a model is built
    or identified).

    Raises:
        MissingDependencyError: it is not installed, or does not import beside this torch; the
            message names the extra to install.

    Example:
        >>> timm = import_library("timm", model_type="timm", extra="timm")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if library_missing(module.split(".")[0]):
            raise MissingDependencyError(
                f"model_type {model_type!r} needs {extra}, which is not installed here; "
                f"pip install 'ckptfmt[{extra}]'"
            ) from None
        reason = exc
    except Exception as exc:  # torchvision built for another torch: "operator torchvision::nms does not exist"
        reason = exc
    import torch

    first_line = (str(reason).strip().splitlines() or [""])[0][:200]
    raise MissingDependencyError(
        f"model_type {model_type!r} needs {extra}, which is installed but fails to import "
        f"({type(reason).__name__}: {first_line}); it was likely built for another torch than this one "
        f"({torch.__version__}): install the release made for it (see ckptfmt's README, \"The field's libraries\")"
    ) from None


def library_version(distribution: str) -> str:
    """The installed version of a distribution (pip's name, not the module's).

    Example:
        >>> library_version("segmentation-models-pytorch")
        '0.6.0'
    """
    return importlib.metadata.version(distribution)


def check_model_name(name: Any, known: Callable[[], Collection[str]], *, what: str, library: str) -> str:
    """`name` if it is in the library's own list of models; else ConfigError, naming the
    closest known names.

    A name is never a path, a URL, an import path or a hub id: those would make the library
    read files or fetch configs (timm's `hf-hub:` and `local-dir:` do even without weights).

    Example:
        >>> check_model_name("resnet18", lambda: {"resnet18", "resnet34"}, what="model_name", library="timm")
        'resnet18'
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be the name of a {library} model, not {name!r}")
    names = known()
    if ":" in name or "/" in name or "\\" in name:
        # The architecture a hub id names, when it is one of the library's: what to give instead.
        architecture = name.replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].split(".")[0]
        instead = f" ({architecture!r} here)" if architecture in names else ""
        raise ConfigError(
            f"{what} {name!r} is not one of {library}'s own model names: names with ':' or '/' "
            "(hub ids, local folders, import paths) make the library fetch or read files, which "
            f"ckptfmt never does; give the architecture's name{instead}, and the checkpoint holds the weights"
        )
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{what} {name!r} is not one of {library}'s {len(names)} models{hint}")
    return name


def refuse_downloads(params: Mapping[str, Any], names: Iterable[str], *, library: str) -> None:
    """Refuse the arguments that would make the library fetch or read weights: the weights
    come from the checkpoint, and building never touches the network or the disk.

    Example:
        >>> refuse_downloads({"pretrained": True}, ["pretrained"], library="timm")   # ConfigError
    """
    for name in names:
        if params.get(name) not in (None, False):
            raise ConfigError(
                f"{name}={params[name]!r} would make {library} fetch or read weights; ckptfmt builds "
                f"the model without them (the checkpoint holds its weights): leave {name} out"
            )


def json_defaults(builder: Callable[..., Any], *, skip: Collection[str] = ()) -> dict[str, Any]:
    """The defaults of `builder`'s named parameters that a config can hold, as JSON values
    (tuples as lists, a str enum as its value); the others are left to the builder.

    Example:
        >>> json_defaults(lambda classes=1, channels=(16, 32), act=torch.nn.ReLU: None)
        {'classes': 1, 'channels': [16, 32]}
    """
    defaults = {}
    for parameter in inspect.signature(builder).parameters.values():
        if parameter.default is parameter.empty or parameter.name in skip:
            continue
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        try:
            defaults[parameter.name] = _as_json(plain_json(parameter.default, what=parameter.name))
        except ConfigError:
            continue
    return defaults


def _as_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _as_json(value.value)
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, str):
        return str(value)
    return value
