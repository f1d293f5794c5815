"""Training state beside a checkpoint, without pickle: the companion file, and resuming from it.

The companion `NAME.optimizer.safetensors` holds what resuming needs beyond the weights: the
optimizer's state, and the learning-rate scheduler's and the AMP GradScaler's when there are
some; a converted checkpoint also keeps there whatever else its legacy file held that JSON
cannot (tensors, inf). Tensors are stored as tensors, and the rest as JSON in the header
(`ckptfmt.optimizer`), typed so that it comes back exactly: int keys stay ints (an optimizer's
`state` is keyed by parameter index, and str keys would silently lose it), tuples stay tuples,
and inf and nan (ReduceLROnPlateau's `best`) are kept.

The checkpoint's training record binds the companion as `optimizer: {"file", "sha256"}`. The
digest covers all of the companion (`companion_digest`): its JSON text and its tensors, so an
edit to either fails `verify` and `load_training_state`. A binding written by ckptfmt 0.1.0
holds the digest of the tensors alone. It is recognised by being exactly that, which a digest of
JSON and tensors never is, over a companion in 0.1.0's layout (the optimizer's state dict as
the whole document). It still loads; its JSON is then not covered, and `verify` says so.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, ConfigError, HeaderError, IntegrityError
from ..io.files import file_in_folder
from ..io.folder import hidden_name, name_fits
from ..io.jsondoc import dumps_strict, loads_strict
from .digest import digest_file
from .header import FORMAT_VERSION, INDEX_SUFFIX, KEY_FORMAT, KEY_FORMAT_VERSION, KEY_OPTIMIZER, Header, read_header
from .index import resolve_checkpoint_path

if TYPE_CHECKING:  # verify checks a companion without torch; reading and writing one import it
    import torch

    from ..io.transaction import Transaction

__all__ = [
    "OPTIMIZER_SUFFIX",
    "SECTIONS",
    "check_storable",
    "companion_digest",
    "companion_for",
    "companion_path",
    "load_training_state",
    "read_training_state",
    "training_document",
    "unstorable_tensor",
    "verify_training_state",
    "write_training_index",
    "write_training_state",
]

OPTIMIZER_SUFFIX = ".optimizer.safetensors"
# What a companion holds. optimizer, scheduler: a state dict, or a list of them (Lightning keeps
# one per optimizer); scaler: a GradScaler's state dict; extra: a converted file's other values.
SECTIONS = ("optimizer", "scheduler", "scaler", "extra")
COVERS_ALL = "its JSON and its tensors"
COVERS_TENSORS = "its tensors only (a binding written by ckptfmt 0.1.0; re-save to cover its JSON too)"
_MARKERS = ("__tensor__", "__items__", "__tuple__", "__float__")
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def companion_digest(json_text: str, tensors_sha256: str) -> str:
    """The binding's digest of a companion: SHA-256 over its JSON (the exact `ckptfmt.optimizer`
    text, UTF-8), a newline, and the canonical digest of its tensors (hex).

    Example:
        >>> companion_digest('{"optimizer": {"__items__": []}}', "e3b0c442...")  # doctest: +SKIP
        '5d41402a...'
    """
    return hashlib.sha256(json_text.encode() + b"\n" + tensors_sha256.encode()).hexdigest()


def unstorable_tensor(tensor: torch.Tensor, *, dtype: bool = True) -> str | None:
    """Why a tensor cannot be stored in a safetensors file, or None when it can; `dtype=False`
    leaves its dtype to the writer, which names the cast that fixes it."""
    import torch

    from .writer import DTYPE_NAMES

    # Before the layout: a nested tensor of the old kind reports torch.strided, of the new torch.jagged.
    if tensor.is_nested:
        return ("a nested tensor (torch.nested: parts of different shapes under one name); safetensors stores one "
                "dense array per name. Where you trust the file, save its parts (tensor.unbind()) under names of "
                "their own")
    if tensor.layout != torch.strided:
        return (f"a sparse tensor ({tensor.layout}); safetensors stores dense tensors only. Where you trust "
                "the file, save tensor.to_dense() in its place")
    if tensor.device.type == "meta":
        return ("on the meta device: it has a shape but no data (saved from a model that was never "
                "materialised); save the checkpoint from a model whose weights are loaded")
    if dtype and tensor.dtype not in DTYPE_NAMES:
        return f"of dtype {tensor.dtype}, which safetensors cannot store"
    return None


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor], path: Path | None) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        problem = unstorable_tensor(value)
        if problem is not None:
            raise ConfigError(f"{where} is {problem}", path=path)
        name = where.replace("\x00", "\\x00") or "tensor"
        if name in tensors:
            name = f"{name}#{len(tensors)}"
        tensors[name] = value.detach()
        return {"__tensor__": name}
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                raise ConfigError(f"{where} has a key of type {type(key).__name__}, which cannot be saved without pickle",
                                  path=path)
            items.append([_encode(key, where, {}, path), _encode(item, f"{where}.{key}", tensors, path)])
        return {"__items__": items}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}.{i}", tensors, path) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}.{i}", tensors, path) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{where} holds a {type(value).__name__}, which cannot be saved without pickle", path=path)


def _document(sections: Mapping[str, Any], tensors: dict[str, torch.Tensor], path: Path | None) -> str:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown training-state sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    document = {name: _encode(value, name, tensors, path) for name, value in sections.items()}
    # The reader's JSON rules, applied before writing: nothing is written that verify refuses.
    return dumps_strict(document, what="the training state", path=path)


def check_storable(sections: Mapping[str, Any], *, path: str | os.PathLike | None = None) -> None:
    """Raise ConfigError, saying what and where, unless `sections` can be written to a
    companion as they are (the same encoding and rules as `write_training_state`)."""
    _document(sections, {}, Path(path) if path is not None else None)


def write_training_state(
    path: str | os.PathLike, sections: Mapping[str, Any], *, overwrite: bool = False, sync_folder: bool = True,
    transaction: Transaction | None = None,
) -> dict[str, str]:
    """Write the companion: `sections` maps `optimizer`, `scheduler`, `scaler` (state dicts, or
    lists of them) and `extra` to what they hold; objects with a `state_dict()` are asked for it.

    With a `transaction` (the checkpoint's), the companion is staged in it, to take its name
    with the weights that bind it; with None it is written on its own.

    Returns:
        The training record's binding, `{"file": name, "sha256": digest}` (`companion_digest`).

    Raises:
        ConfigError: a value that cannot be saved without pickle, named by where it is.

    Example:
        >>> write_training_state("runs/best_model.optimizer.safetensors",
        ...                      {"optimizer": optimizer, "scheduler": scheduler})
        {'file': 'best_model.optimizer.safetensors', 'sha256': '...'}
    """
    from .writer import write_safetensors

    path = Path(path)
    text, tensors = training_document(sections, path=path)
    metadata = {KEY_FORMAT: "pt", KEY_FORMAT_VERSION: FORMAT_VERSION, KEY_OPTIMIZER: text}
    tensors_sha256 = write_safetensors(path, tensors, metadata, overwrite=overwrite, sync_folder=sync_folder,
                                       transaction=transaction)
    return {"file": path.name, "sha256": companion_digest(text, tensors_sha256)}


def training_document(sections: Mapping[str, Any], *, path: str | os.PathLike | None = None,
                      ) -> tuple[str, dict[str, torch.Tensor]]:
    """A companion's JSON text (`ckptfmt.optimizer`) and its tensors by name, from `sections`
    as `write_training_state` takes them. The names depend only on where each tensor sits, so
    ranks holding the same structure of DTensors get the same names and text.

    Example:
        >>> text, tensors = training_document({"optimizer": optimizer.state_dict()})
        >>> sorted(tensors)[:1]
        ['optimizer.state.0.exp_avg']
    """
    sections = {name: value.state_dict() if hasattr(value, "state_dict") else value for name, value in sections.items()}
    tensors: dict[str, torch.Tensor] = {}
    text = _document(sections, tensors, Path(path) if path is not None else None)
    return text, tensors


def write_training_index(
    path: Path, text: str, shards: Sequence[tuple[Path, str]], *, transaction: Transaction,
    digests: Mapping[str, bytes], overwrite: bool = False,
) -> dict[str, str]:
    """Stage the index of a companion written as shards (`NAME.optimizer-0000K-of-0000N.safetensors`,
    staged in `transaction` and given as (staged file, name)): the index holds the JSON text
    and the digest of all the shards' tensors (from their writers' `digests`, see
    `index.write_index`), and reads back as one companion.

    Returns:
        The training record's binding, `{"file": index name, "sha256": digest}`.

    Example:
        >>> write_training_index(folder / "m.optimizer.safetensors.index.json", text, staged,
        ...                      digests=digests, transaction=transaction)
        {'file': 'm.optimizer.safetensors.index.json', 'sha256': '...'}
    """
    from .index import write_index

    metadata = {KEY_FORMAT: "pt", KEY_FORMAT_VERSION: FORMAT_VERSION, KEY_OPTIMIZER: text}
    tensors_sha256 = write_index(path, shards, metadata, digests=digests, overwrite=overwrite, transaction=transaction)
    return {"file": path.name, "sha256": companion_digest(text, tensors_sha256)}


def companion_for(checkpoint: Path) -> Path:
    """Where the companion of the checkpoint `checkpoint` (its .safetensors or its index) is
    written: `NAME.optimizer.safetensors` beside it. Where that name would be over the file
    system's limit (255 bytes), NAME is cut and followed by `~` and 16 hex digits of its sha256;
    the training record binds the companion by its name, so readers find it either way.

    Example:
        >>> companion_for(Path("runs/best_model.safetensors"))
        PosixPath('runs/best_model.optimizer.safetensors')
    """
    name = checkpoint.name
    stem = name[: -len(INDEX_SUFFIX)] if name.endswith(INDEX_SUFFIX) else name.removesuffix(".safetensors")
    if name_fits(stem + OPTIMIZER_SUFFIX):
        return checkpoint.with_name(stem + OPTIMIZER_SUFFIX)
    return checkpoint.with_name(hidden_name(stem, OPTIMIZER_SUFFIX)[1:])  # the same rule, less its leading dot


def companion_path(checkpoint: str | os.PathLike, binding: Mapping[str, Any]) -> Path:
    """The companion a checkpoint's binding names: a file in the checkpoint's folder (a plain
    name, not a link out of it), refused otherwise, naming the key."""
    checkpoint = Path(checkpoint)
    return file_in_folder(checkpoint.parent, binding.get("file"), key="metadata 'ckptfmt.training': optimizer.file",
                          path=checkpoint, error=HeaderError)


def _open(path: Path, sha256: str | None) -> tuple[Header, Any, str]:
    """The companion's header and JSON document, its digests checked; and what the binding
    covers."""
    header = read_header(path)
    text = header.metadata.get(KEY_OPTIMIZER)
    if text is None:
        raise IntegrityError("is not a ckptfmt training-state companion (it has no 'ckptfmt.optimizer' metadata)",
                             path=path)
    document = loads_strict(text, what="metadata 'ckptfmt.optimizer'", path=path)
    if not isinstance(document, dict):
        raise HeaderError(f"metadata 'ckptfmt.optimizer' must be a JSON object, not {type(document).__name__}", path=path)
    tensors_sha256 = digest_file(header)
    if header.weights_sha256 is not None and tensors_sha256 != header.weights_sha256:
        raise IntegrityError(
            f"does not match its own digest (sha256 {tensors_sha256[:12]}... != {header.weights_sha256[:12]}...): "
            "its tensors were changed or corrupted",
            path=path,
        )
    covers = COVERS_ALL
    if sha256 is not None and sha256 != companion_digest(text, tensors_sha256):
        if "__items__" in document and sha256 == tensors_sha256:
            covers = COVERS_TENSORS
        else:
            raise IntegrityError(
                f"does not match the checkpoint's record of it (sha256 {sha256[:12]}...): its JSON or its tensors "
                "were changed, or it belongs to another checkpoint",
                path=path,
            )
    return header, document, covers


def verify_training_state(path: str | os.PathLike, *, sha256: str) -> str:
    """Check a companion against its binding's digest, and that its JSON is a training state
    whose every tensor it holds, without loading the tensors. Returns what the digest covers.

    Raises:
        IntegrityError, HeaderError: naming what is wrong.
    """
    path = Path(path)
    header, document, covers = _open(path, sha256)
    names = {*header.tensors, *header.aliases}
    _sections(document, lambda name: name if name in names else None, path)
    return covers


def read_training_state(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, Any]:
    """The sections of a companion (`SECTIONS`), its digest checked against `sha256` (the
    binding's) when given.

    Example:
        >>> read_training_state("runs/best_model.optimizer.safetensors")["scheduler"]["last_epoch"]
        12
    """
    from .writer import load_tensors

    path = Path(path)
    header, document, _ = _open(path, sha256)
    tensors = load_tensors(header)
    return _sections(document, lambda name: tensors[name].clone() if name in tensors else None, path)


def _sections(document: dict[str, Any], tensor: Any, path: Path) -> dict[str, Any]:
    if "__items__" in document:  # 0.1.0's layout: the optimizer's state dict is the document
        return {"optimizer": _decode(document, tensor, path, "optimizer")}
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise HeaderError(
            f"metadata 'ckptfmt.optimizer' has the section {unknown[0]!r}; known: {', '.join(SECTIONS)}. It was written "
            "by a newer ckptfmt, or damaged",
            path=path,
        )
    return {name: _decode(value, tensor, path, name) for name, value in document.items()}


def _decode(value: Any, tensor: Any, path: Path, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensor, path, f"{where}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    marker = [key for key in value if key in _MARKERS]
    if len(value) != 1 or not marker:
        raise _malformed(where, "an object that is not one of its encodings", value, path)
    inner = value[marker[0]]
    if marker[0] == "__tensor__":
        found = tensor(inner) if isinstance(inner, str) else None
        if found is None:
            raise HeaderError(
                f"metadata 'ckptfmt.optimizer': {where} refers to the tensor {inner!r}, which the file does not hold; "
                "it is damaged or was edited",
                path=path,
            )
        return found
    if marker[0] == "__float__":
        if inner not in _FLOATS:
            raise _malformed(where, "a float marker that is not inf, -inf or nan", inner, path)
        return _FLOATS[inner]
    if not isinstance(inner, list):
        raise _malformed(where, f"{marker[0]} that is not a list", inner, path)
    if marker[0] == "__tuple__":
        return tuple(_decode(v, tensor, path, f"{where}.{i}") for i, v in enumerate(inner))
    items = {}
    for pair in inner:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _malformed(where, "an item that is not a [key, value] pair", pair, path)
        if isinstance(pair[0], dict) and "__tensor__" in pair[0]:
            raise _malformed(where, "a tensor as a key", pair[0], path)
        key = _decode(pair[0], tensor, path, where)
        try:
            items[key] = _decode(pair[1], tensor, path, f"{where}.{key}")
        except TypeError:  # an unhashable key: a dict or a list
            raise _malformed(where, "a key that is a dict or a list", pair[0], path) from None
    return items


def _malformed(where: str, what: str, value: Any, path: Path) -> HeaderError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return HeaderError(
        f"metadata 'ckptfmt.optimizer': {where} holds {what} ({shown}); the file is damaged or was not written by ckptfmt",
        path=path,
    )


def load_training_state(
    checkpoint_path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore the optimizer, the learning-rate scheduler and the AMP GradScaler saved with a
    checkpoint, and return its training record.

    Save, then resume with this, then step, gives bit for bit what never stopping gives. Build
    the optimizer over the model's parameters (and the scheduler over the optimizer) as when
    saving, then pass them here. A converted Lightning checkpoint may hold several optimizers or
    schedulers: pass a list, in Lightning's order.

    Raises:
        CheckpointNotFoundError: one of them was asked for and not saved.
        IntegrityError, HeaderError: the companion is not the one the checkpoint recorded, or
            it is damaged.
        ConfigError: a saved state does not fit the object given (another optimizer type, other
            parameters).

    Example:
        >>> model = load_model("runs/joint/best_model.safetensors").train()
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=100)
        >>> scaler = torch.amp.GradScaler("cuda")
        >>> load_training_state("runs/joint/best_model.safetensors", optimizer,
        ...                     scheduler=scheduler, scaler=scaler)["epoch"]
        12
    """
    path = resolve_checkpoint_path(checkpoint_path)
    header = read_header(path)
    training = header.training()
    wanted = {name: target for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler))
              if target is not None}
    if not wanted:
        return training
    binding = training.get("optimizer")
    sections = read_training_state(companion_path(path, binding), sha256=binding["sha256"]) if binding else {}
    source = header.provenance().get("source")
    for name, target in wanted.items():
        if name not in sections:
            # The advice fits where the file came from: a save can be given the state, a
            # conversion can only carry what its source held.
            fix = (f"its source {source.get('file')!r} held none to carry over; resume without {name}= (a fresh "
                   f"{name})" if source else f"pass {name}= to save_model_with_config (or ckptfmt.save) to keep it")
            raise CheckpointNotFoundError(f"was saved without {name} state", path=path, fix=fix)
        _restore(name, target, sections[name], path)
    return training


def _restore(name: str, target: Any, state: Any, path: Path) -> None:
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    states = state if isinstance(state, list) else [state]
    if len(targets) != len(states):
        raise ConfigError(
            f"holds {len(states)} {name} states, but {len(targets)} {name}(s) were given; pass a list of {len(states)}",
            path=path,
        )
    for index, (each, each_state) in enumerate(zip(targets, states)):
        try:
            each.load_state_dict(each_state)
        except Exception as exc:  # torch's own checks, whatever they raise
            which = f" {index}" if len(states) > 1 else ""
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(
                f"its saved {name}{which} state does not fit the {type(each).__name__} given ({type(exc).__name__}: "
                f"{detail}); build it as it was built when saved",
                path=path,
            ) from None
