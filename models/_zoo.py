"""What the adapters of the field's libraries (timm, torchvision, smp, MONAI) share.

- The library is imported only when one of its models is built or identified
  (`import_library`), and a missing one is a MissingDependencyError naming the extra to install.
- A model name read from a file is looked up in the library's own list of models and nowhere
  else (`check_model_name`): no import path, no hub or local-folder name, nothing with ':' or
  '/'.
- Nothing is downloaded or read from the disk to build a model: every argument that would fetch
  weights or configs is refused (`refuse_downloads`), and each adapter passes the library's
  "no weights" values itself.
- Models are built without memory behind their parameters (`build_for_shapes` for their tensor
  names and shapes, `build_empty` for loading weights into).
- Identification by a `SignatureIndex`: each model's tensor names and shapes, digested, built
  once per library version in worker processes and cached in the user's cache folder.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptfmt.errors import ArchitectureNotRecognisedError, ConfigError, MissingDependencyError
from ckptfmt.io.files import CACHE_ENV, cache_folder
from ckptfmt.io.jsondoc import plain_json

__all__ = [
    "SignatureIndex",
    "build_empty",
    "build_for_shapes",
    "check_model_name",
    "first_difference",
    "identified",
    "import_library",
    "index_worker",
    "json_defaults",
    "keys_digest",
    "library_missing",
    "library_version",
    "refuse_downloads",
    "require_installed",
    "shapes_digest",
    "shapes_of",
]

# Bumped when what an index holds changes, so that an older cache is rebuilt, not misread.
INDEX_FORMAT = 1
# One worker per core, as many as help: each imports torch and the library (3 to 5 s) first.
MAX_INDEX_WORKERS = 8
NAMES_PER_WORKER = 16

Shapes = Mapping[str, tuple[int, ...]]


# -- the library ---------------------------------------------------------------------------


def library_missing(module: str) -> bool:
    """Whether `module` cannot be imported here, found without importing it."""
    return importlib.util.find_spec(module) is None


def require_installed(module: str, *, extra: str) -> None:
    """For an adapter's infer_config: a library that is not installed recognises nothing, said
    without importing anything."""
    if library_missing(module):
        raise ArchitectureNotRecognisedError(f"{module} is not installed here, so its models were not considered "
                                             f"(pip install 'ckptfmt[{extra}]')")


def identified(identify: Callable[[str, tuple], list[dict[str, Any]] | str],
               shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | list[dict[str, Any]]:
    """An adapter's infer_config answer from its `identify(digest, items)` (cached per state
    dict: convert asks once to strip a prefix and once to identify), which gives the candidates
    or why there are none: one config, several (twins), or ArchitectureNotRecognisedError."""
    found = identify(shapes_digest(shapes), tuple(shapes.items()))
    if isinstance(found, str):
        raise ArchitectureNotRecognisedError(found)
    return found[0] if len(found) == 1 else list(found)


def import_library(module: str, *, model_type: str, extra: str) -> Any:
    """The library's module, imported now (each costs 2 to 3 s, so only when a model is built
    or identified).

    Raises:
        MissingDependencyError: it is not installed, or does not import beside this torch; the
            message names the extra to install.
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
    first_line = (str(reason).strip().splitlines() or [""])[0][:200]
    raise MissingDependencyError(
        f"model_type {model_type!r} needs {extra}, which is installed but fails to import "
        f"({type(reason).__name__}: {first_line}); it was likely built for another torch than this one "
        f"({torch.__version__}): install the release made for it (see ckptfmt's README, \"The field's libraries\")"
    ) from None


def library_version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


# -- names and arguments -------------------------------------------------------------------


def check_model_name(name: Any, known: Callable[[], Collection[str]], *, what: str, library: str) -> str:
    """`name` if it is in the library's own list of models; else ConfigError, naming the
    closest known names.

    A name is never a path, a URL, an import path or a hub id: those would make the library
    read files or fetch configs (timm's `hf-hub:` and `local-dir:` do even without weights).
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
    come from the checkpoint, and building never touches the network or the disk."""
    for name in names:
        if params.get(name) not in (None, False):
            raise ConfigError(
                f"{name}={params[name]!r} would make {library} fetch or read weights; ckptfmt builds "
                f"the model without them (the checkpoint holds its weights): leave {name} out"
            )


def json_defaults(builder: Callable[..., Any], *, skip: Collection[str] = ()) -> dict[str, Any]:
    """The defaults of `builder`'s named parameters that a config can hold, as JSON values
    (tuples as lists, a str enum as its value); the others are left to the builder."""
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


# -- building without weights ----------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter goes to the meta device as it is registered; buffers and the tensors
    that __init__ computes Python numbers from stay on the CPU (as accelerate's
    `init_empty_weights(include_buffers=False)`)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {**param.__dict__, "requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_for_shapes(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model with no memory behind it, for its tensor names and shapes: on the meta device,
    or with its parameters there where __init__ computes on its tensors (torchvision's regnet,
    smp's mit encoders, MONAI's SwinUNETR)."""
    try:
        with torch.device("meta"):
            return factory()
    except (NotImplementedError, RuntimeError):
        with _parameters_on_meta():
            return factory()


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model to load a checkpoint's weights into with `assign=True`: every tensor that the
    state dict holds may be on the meta device, but not the buffers it does not hold
    (non-persistent ones: timm's relative position indices, rotary tables, attention masks),
    which the weights will not replace. So: on the meta device where that leaves none of those
    there, else parameters on meta and buffers on the CPU, else (a buffer computed from a
    parameter, as timm's Swin attention masks are) built on the CPU for real."""
    try:
        with torch.device("meta"):
            model = factory()
        if not _buffers_left_on_meta(model):
            return model
    except (NotImplementedError, RuntimeError):
        pass
    with _parameters_on_meta():
        model = factory()
    if not _buffers_left_on_meta(model):
        return model
    return factory()


def _buffers_left_on_meta(model: nn.Module) -> bool:
    held = set(model.state_dict(keep_vars=True))
    return any(buffer.is_meta for name, buffer in model.named_buffers() if name not in held)


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def first_difference(expected: Shapes, shapes: Shapes) -> str | None:
    """Where a state dict's names and shapes differ from a model's, or None when every name and
    shape matches exactly."""
    missing = [name for name in expected if name not in shapes]
    if missing:
        return f"it has no tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = [name for name in shapes if name not in expected]
    if extra:
        return f"it has the unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            return f"{name} is {list(shapes[name])}, the model's is {list(shape)}"
    return None


def keys_digest(names: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:24]


def shapes_digest(shapes: Shapes, *, leave_out: Collection[str] = ()) -> str:
    text = "\n".join(f"{name}:{list(shapes[name])}" for name in sorted(shapes) if name not in leave_out)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# -- the signature index ---------------------------------------------------------------------


class SignatureIndex:
    """A library's models by the digests of their tensor names (and shapes), so that a state
    dict is looked up, not compared with every model's.

    Each adapter says what one model's entries are (`entries_of(name) -> list of dicts`, each
    with at least "name" and "keys", the digest of its tensor names); a model may have several
    (timm's without its classifier, torchvision's segmentation with its auxiliary head). The
    index is built on first need, in fresh worker processes (never forked from the user's, never
    spawned through its __main__), with progress on stderr, and cached per library and torch
    version: `cache_folder()/signatures/LIBRARY-VERSION+torch-VERSION.json`.

    Example:
        >>> index = SignatureIndex("timm", distribution="timm", names=timm.list_models)
        >>> index.lookup(keys_digest(state_dict))
        [{'name': 'resnet18', 'keys': '...', ...}]
    """

    def __init__(self, library: str, *, distribution: str, names: Callable[[], list[str]], what: str = "models"):
        self.library = library
        self.version = library_version(distribution)
        self._names = names
        self._what = what
        self._by_keys: dict[str, list[dict[str, Any]]] | None = None

    @property
    def path(self) -> Path:
        torch_version = torch.__version__.split("+")[0]
        return cache_folder() / "signatures" / f"{self.library}-{self.version}+torch-{torch_version}.json"

    def lookup(self, digest: str) -> list[dict[str, Any]]:
        """The entries whose tensor names have this digest."""
        if self._by_keys is None:
            by_keys: dict[str, list[dict[str, Any]]] = {}
            for entry in self._load_or_build():
                by_keys.setdefault(entry["keys"], []).append(entry)
            self._by_keys = by_keys
        return self._by_keys.get(digest, [])

    def _load_or_build(self) -> list[dict[str, Any]]:
        entries = self._read()
        if entries is None:
            entries = self._build()
            self._write(entries)
        return entries

    def _read(self) -> list[dict[str, Any]] | None:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            print(f"ckptfmt: the {self.library} index {self.path} is unreadable ({exc}); building it again",
                  file=sys.stderr)
            return None
        if (
            not isinstance(document, dict) or document.get("format") != INDEX_FORMAT
            or document.get("library") != self.library or document.get("version") != self.version
            or not isinstance(document.get("entries"), list)
            or not all(isinstance(e, dict) and isinstance(e.get("keys"), str) and isinstance(e.get("name"), str)
                       for e in document["entries"])
        ):
            print(f"ckptfmt: the {self.library} index {self.path} is not one this ckptfmt wrote; building it again",
                  file=sys.stderr)
            return None
        return document["entries"]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        from ckptfmt.errors import WriteError
        from ckptfmt.io.atomic import atomic_write, write_all

        document = {"format": INDEX_FORMAT, "library": self.library, "version": self.version,
                    "torch": torch.__version__, "entries": entries}
        try:
            with atomic_write(self.path, overwrite=True, durable=False) as fd:
                write_all(fd, json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
        except WriteError as exc:  # a read-only cache: identification still works, just not cached
            print(f"ckptfmt: could not cache the {self.library} index ({exc}); set {CACHE_ENV} to a "
                  "writable folder to keep it", file=sys.stderr)

    def _build(self) -> list[dict[str, Any]]:
        names = sorted(self._names())
        # A worker costs a few seconds of imports before its first model: a few names need one.
        workers = max(1, min(MAX_INDEX_WORKERS, len(os.sched_getaffinity(0)), len(names) // NAMES_PER_WORKER))
        what = f"{self.library} {self._what}"
        print(
            f"ckptfmt: indexing the {len(names)} {what} ({self.library} {self.version}) to identify weights by "
            f"their tensors; once per version, with {workers} worker process{'es' if workers > 1 else ''}, "
            f"cached in {self.path}",
            file=sys.stderr, flush=True,
        )
        started = time.monotonic()
        entries, failed = _run_index_workers(self.library, names, workers, progress=_progress(len(names), what))
        skipped = (f"; {len(failed)} could not be built, so they are not identified: {', '.join(failed[:5])}"
                   + (" ..." if len(failed) > 5 else "")) if failed else ""
        print(f"ckptfmt: indexed {len(names) - len(failed)} {what} in {time.monotonic() - started:.0f} s{skipped}",
              file=sys.stderr, flush=True)
        return entries


def _progress(total: int, what: str) -> Callable[[int], None]:
    """Says how far the build is at each tenth of the way."""
    shown = {"tenths": 0}

    def progress(done: int) -> None:
        tenths = 10 * done // total
        if tenths > shown["tenths"] and done < total:
            shown["tenths"] = tenths
            print(f"ckptfmt: indexed {done}/{total} {what}", file=sys.stderr, flush=True)

    return progress


def _run_index_workers(
    library: str, names: list[str], workers: int, *, progress: Callable[[int], None],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every model's entries, computed by `workers` fresh interpreters (each given every n-th
    name on stdin, answering one JSON line per model on stdout)."""
    lines: queue.Queue = queue.Queue()
    processes = []
    for worker in range(workers):
        # stderr to a file: a pipe nobody reads while the worker runs could fill and block it.
        errors = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(
            [sys.executable, "-c", f"from ckptfmt.models._zoo import index_worker; index_worker({library!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )
        process.stdin.write(json.dumps(names[worker::workers]))
        process.stdin.close()
        processes.append((process, errors))
        threading.Thread(target=_forward_lines, args=(process.stdout, lines), daemon=True).start()
    entries: list[dict[str, Any]] = []
    failed: list[str] = []
    done, finished = 0, 0
    while finished < workers:
        line = lines.get()
        if line is None:
            finished += 1
            continue
        answer = json.loads(line)
        if "error" in answer:
            failed.append(answer["name"])
        entries += answer.get("entries", [])
        done += 1
        progress(done)
    for process, errors in processes:
        if process.wait() != 0:
            errors.seek(0)
            last = (errors.read().strip().splitlines() or ["no message"])[-1][:300]
            raise ArchitectureNotRecognisedError(
                f"building the {library} index failed in a worker process ({last}); nothing was cached, "
                "so the next identification tries again"
            )
        errors.close()
    if done != len(names):
        raise ArchitectureNotRecognisedError(f"building the {library} index answered for {done} of {len(names)} models")
    return entries, sorted(failed)


def _forward_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def index_worker(library: str) -> None:
    """The body of one index worker process: names on stdin, one JSON line per name on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adapter = importlib.import_module(f"ckptfmt.models.{_WORKER_LIBRARIES[library]}")
    for name in json.loads(sys.stdin.read()):
        try:
            answer = {"name": name, "entries": adapter.index_entries(name)}
        except Exception as exc:  # a model that cannot be built is not indexed, and is said so
            answer = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# The adapters a worker may import, by the library name their index is kept under: a fixed table,
# so that a worker imports nothing named from outside.
_WORKER_LIBRARIES = {"timm": "timm", "torchvision": "torchvision", "smp": "smp"}
