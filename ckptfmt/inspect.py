"""What `inspect` computes; the CLI only renders it.

`inspect_checkpoint` of a .safetensors reads the header and nothing else, and imports no torch:
its cost does not grow with the file. A legacy .pth has no header, so it is loaded (safely,
weights-only), which needs torch. `verify` (verifier.py) is the check that reads every byte.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .config.model_config import ModelConfig, config_differences
from .config.registry import registered_model_types
from .config.sidecar import Sidecar, read_sidecar, sidecar_path
from .errors import CheckpointNotFoundError, CkptfmtError
from .format.header import KEY_CONFIG, KEY_OPTIMIZER, Header, looks_like_safetensors, read_header
from .format.index import without_shards
from .format.tensor_entries import DTYPE_SIZES
from .io.files import read_capped, walk_files

__all__ = ["inspect_checkpoint", "inspect_folder", "sidecar_status"]

CHECKPOINT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".pth", ".pt", ".ckpt")


def inspect_checkpoint(path: str | os.PathLike, *, tensors: bool = False, memo: "_WalkMemo | None" = None) -> dict[str, Any]:
    """Describe a checkpoint: config, training record, provenance, tensors, sidecar status.

    For a .safetensors only the header is read. For a legacy .pth the file is loaded with the
    weights-only unpickler and the config is inferred from the shapes (marked as such).

    Example:
        >>> info = inspect_checkpoint("checkpoints/multitask_joint/best_model.safetensors")
        >>> info["config"]["depth"], info["sidecar"]["status"]
        (3, 'consistent')
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError("no such file", path=path)
    from .sources.dcp import is_dcp_folder

    if path.is_dir() and not is_dcp_folder(path):  # a DCP folder is one checkpoint, read as a legacy file is
        raise CheckpointNotFoundError("is a folder; use inspect_folder", path=path)
    if path.is_dir() or not looks_like_safetensors(path):
        return _inspect_legacy(path, tensors=tensors)
    header = read_header(path)
    memo = _WalkMemo() if memo is None else memo
    parsed, config, registered = memo.config(header)
    kind = "optimizer state" if KEY_OPTIMIZER in header.metadata else (
        "ckptfmt" if header.is_ckptfmt else "safetensors"
    )
    infos = [(name, info.dtype, info.shape) for name, info in header.tensors.items()]
    info = {
        "file": str(path),
        "kind": kind,
        "size": header.file_size,
        "format_version": header.format_version,
        "config": config,
        "config_source": "embedded" if config is not None else None,
        "registered": registered,
        "training": header.training(),
        "provenance": header.provenance(),
        "weights_sha256": header.weights_sha256,
        "aliases": header.aliases,
        "tensors": _tensor_summary(infos),
        "shards": [p.name for p in header.files] if header.is_sharded else None,
        "sidecar": sidecar_status(header, parsed, memo=memo) if kind == "ckptfmt" else None,
    }
    if kind == "ckptfmt" and config is None:
        info["note"] = "weights only: no registered architecture recognised it, so it has no config"
    if tensors:
        info["tensor_list"] = [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in infos]
    return info


def _tensor_summary(infos: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, Any]:
    dtypes: dict[str, dict[str, int]] = {}
    parameters = 0
    for _, dtype, shape in infos:
        count = math.prod(shape)
        parameters += count
        entry = dtypes.setdefault(dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += count * DTYPE_SIZES[dtype]
    return {"count": len(infos), "parameters": parameters, "dtypes": dict(sorted(dtypes.items()))}


def _inspect_legacy(path: Path, *, tensors: bool) -> dict[str, Any]:
    from .format.writer import DTYPE_NAMES
    from .resolve import read_source, resolve

    resolution = resolve(read_source(path), check=False)
    legacy = resolution.legacy
    described_by = sidecar_path(path, resolution.config)
    infos = [(n, DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for n, t in legacy.state_dict.items()]
    config = resolution.config.to_dict() if resolution.config is not None else None
    info = {
        "file": str(path),
        "kind": "legacy",
        "size": path.stat().st_size,
        "serialization": legacy.serialization,
        "source_sha256": legacy.sha256,
        "state_dict_key": legacy.wrapper_key,
        "stripped_prefixes": legacy.stripped_prefixes,
        "config": config,
        "config_source": resolution.origin,
        "registered": config["model_type"] in registered_model_types() if config else None,
        "inferred_config": config if resolution.origin == "inferred" else None,
        "not_recognised": resolution.unresolved.message if resolution.unresolved is not None else None,
        "plugin_failures": resolution.plugin_failures,
        "training": legacy.training,
        "has_optimizer_state": legacy.optimizer_state is not None,
        "tensors": _tensor_summary([(n, d, s) for n, d, s in infos if d in DTYPE_SIZES]),
        "sidecar": {"status": "present", "path": str(described_by)} if described_by is not None
        else {"status": "missing"},
    }
    if tensors:
        info["tensor_list"] = [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in infos]
    return info


def sidecar_status(header: Header, embedded: ModelConfig | None, *, memo: _WalkMemo | None = None) -> dict[str, Any]:
    """Whether the sidecar that describes the file (`NAME.model_config.json`, else the folder's
    `model_config.json`: see `sidecar_path`) agrees with it (`embedded` is the file's
    own config, already parsed; None when it has none or it is invalid). `memo` keeps what a
    walk over many files reads once.

    status: "consistent", "missing", "unbound" (the sidecar does not list this file),
    "stale" (it is bound to other weights: the file was replaced, or a crash came between
    writing the weights and the sidecar), "disagrees" (other config fields), "invalid".
    """
    return _sidecar_status(header.path, header.weights_sha256, embedded, _WalkMemo() if memo is None else memo)


def _sidecar_status(path: Path, weights_sha256: str | None, embedded: ModelConfig | None, memo: _WalkMemo) -> dict[str, Any]:
    try:
        described_by = sidecar_path(path, embedded, read=memo.sidecar)
        sidecar = memo.sidecar(described_by) if described_by is not None else None
    except CkptfmtError as exc:
        return {"status": "invalid", "path": exc.path, "message": exc.message}
    if sidecar is None:
        return {"status": "missing"}
    status: dict[str, Any] = {"status": "consistent", "path": str(sidecar.path)}
    if embedded is not None:
        differences = memo.differences(embedded, sidecar)
        if differences:
            status.update(status="disagrees", differences=list(differences))
            return status
    bound = sidecar.weights.get(path.name)
    if bound is None:
        status["status"] = "unbound"
    elif bound != weights_sha256:
        status.update(status="stale", bound_sha256=bound)
    return status


def inspect_folder(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """One summary per checkpoint under `folder` (recursively), in name order. A checkpoint that
    cannot be read, and whatever under the folder could not be walked (a folder without
    permission, a link loop), is a row of its own that carries `error`, naming it.

    The summary of a single-file .safetensors is remembered in the cache folder, keyed by the
    file's identity (device, inode, size, modification and change times, as git's index keys
    its files): a folder inspected again is answered from one cache file, each checkpoint's
    header re-read only when the file changed. Whether its architecture is registered here
    and what its sidecar says are worked out afresh each time. A second look at 2,000 files
    costs a fifth of a first one (`tools/bench.py`, inspect_folder_cache).
    """
    folder = Path(folder)
    memo = _WalkMemo()
    cache = _SummaryCache(folder)
    walk = walk_files(folder, CHECKPOINT_SUFFIXES)
    rows = [{"file": str(error.path), "error": str(error)} for error in walk.unreadable]
    for path in without_shards(walk.files):
        try:
            row = cache.recall(path, memo)
            if row is None:
                row = inspect_checkpoint(path, memo=memo)
                cache.remember(path, row)
            rows.append(row)
        except CkptfmtError as exc:
            rows.append({"file": str(path), "error": str(exc)})
    cache.save()
    return sorted(rows, key=lambda row: row["file"])


class _SummaryCache:
    """The summaries of one folder's .safetensors files, kept between processes (see
    `inspect_folder`). A cache that cannot be read or written is ignored: it only saves time."""

    _FRESH = ("file", "registered", "sidecar")  # what depends on the walk, this process or other files

    def __init__(self, folder: Path) -> None:
        import hashlib

        from .io.files import cache_folder
        from .version import __version__

        self._folder = folder
        name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
        self._file = cache_folder() / "inspect" / f"{name}.json"
        # The code that made a summary: the Python and ckptfmt that ran, and each of ckptfmt's
        # modules by its file's identity (an edited checkout). No architecture's code is in a
        # summary: whether it is registered, and the sidecar's status, are worked out each time.
        package = Path(__file__).parent
        self._version = [sys.version, __version__, *(
            [str(p.relative_to(package)), *self._identity(p)] for p in sorted(package.rglob("*.py")))]
        self._rows: dict[str, list] = {}
        self._kept: dict[str, list] = {}
        try:
            saved = json.loads(read_capped(self._file, limit=_MAX_CACHE_BYTES, what="the inspect cache"))
            if saved.get("ckptfmt") == self._version and isinstance(saved.get("rows"), dict):
                self._rows = saved["rows"]
        except Exception:  # missing, damaged, too large: summarised again
            pass

    @staticmethod
    def _identity(path: Path) -> list[int]:
        found = os.stat(path)
        return [found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns]

    def recall(self, path: Path, memo: _WalkMemo) -> dict[str, Any] | None:
        if not path.name.endswith(".safetensors"):
            return None
        name = os.path.relpath(path, self._folder)
        saved = self._rows.get(name)
        if not (isinstance(saved, list) and len(saved) == 2 and isinstance(saved[1], dict)
                and saved[0] == self._identity(path)):
            return None
        self._kept[name] = saved
        row = dict(saved[1])  # the fresh parts are filled in where they stood, keeping the order
        row["file"] = str(path)
        config = row.get("config")
        parsed = memo.config_of(config, path) if config is not None else None
        row["registered"] = parsed.model_type in memo.registered() if parsed else None
        if row.get("kind") == "ckptfmt":
            row["sidecar"] = _sidecar_status(path, row.get("weights_sha256"), parsed, memo)
        return row

    def remember(self, path: Path, row: dict[str, Any]) -> None:
        if not path.name.endswith(".safetensors") or row.get("shards"):
            return
        self._kept[os.path.relpath(path, self._folder)] = [
            self._identity(path), {k: None if k in self._FRESH else v for k, v in row.items()}]

    def save(self) -> None:
        if self._kept == self._rows:
            return
        try:
            from .io.atomic import atomic_write, write_all

            with atomic_write(self._file, overwrite=True, durable=False) as fd:
                write_all(fd, json.dumps({"ckptfmt": self._version, "rows": self._kept}).encode())
        except Exception:  # a read-only home, a full disk: summarised again next time
            pass


_MAX_CACHE_BYTES = 256 << 20


class _WalkMemo:
    """What a walk over many files works out once: each folder's sidecar, and each distinct
    config (the runs of one experiment share theirs) with how it compares to each sidecar."""

    def __init__(self) -> None:
        self.sidecars: dict[Path, Any] = {}
        self._configs: dict[str | None, tuple] = {}
        self._documents: dict[str, ModelConfig] = {}
        self._registered: list[str] | None = None
        self._differences: dict[tuple, list[str]] = {}

    def config(self, header: Header) -> tuple[ModelConfig | None, dict[str, Any] | None, bool | None]:
        """The header's config parsed, as a document, and whether its architecture is registered."""
        text = header.metadata.get(KEY_CONFIG)
        if text not in self._configs:
            embedded = header.config_dict()
            parsed = ModelConfig.from_dict(embedded, path=header.path) if embedded is not None else None
            self._configs[text] = (parsed, json.dumps(parsed.to_dict()) if parsed else None)
        parsed, config = self._configs[text]
        # Each summary gets its own copy of the document; JSON's parser makes one fastest.
        return parsed, json.loads(config) if config else None, parsed.model_type in self.registered() if parsed else None

    def config_of(self, document: dict[str, Any], path: Path) -> ModelConfig:
        """A config document (as a summary holds it) parsed, once per distinct document."""
        text = json.dumps(document, sort_keys=True)
        if text not in self._documents:
            self._documents[text] = ModelConfig.from_dict(document, path=path)
        return self._documents[text]

    def registered(self) -> list[str]:
        if self._registered is None:
            self._registered = registered_model_types()
        return self._registered

    def sidecar(self, path: Path) -> Sidecar | None:
        """The sidecar at `path`, read once; one that cannot be read raises its error each time."""
        if path not in self.sidecars:
            try:
                self.sidecars[path] = read_sidecar(path)
            except CkptfmtError as exc:
                self.sidecars[path] = exc
        if isinstance(self.sidecars[path], CkptfmtError):
            raise self.sidecars[path]
        return self.sidecars[path]

    def differences(self, embedded: ModelConfig, sidecar) -> list[str]:
        key = (id(embedded), sidecar.path)
        if key not in self._differences:
            other = sidecar.config
            if embedded.is_checked:  # compare complete configs where the architecture is here
                try:
                    other = other.checked()
                except CkptfmtError:
                    pass
            self._differences[key] = config_differences(embedded, other)
        return self._differences[key]
