"""What `inspect` and `verify` compute; the CLI only renders it.

`inspect_checkpoint` of a .safetensors reads the header and nothing else, and imports no torch:
its cost does not grow with the file. A legacy .pth has no header, so it is loaded (safely,
weights-only), which needs torch. `verify` reads every byte once to check the digest.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.facts import recall, remember
from .config.model_config import ModelConfig, config_differences
from .config.sidecar import read_sidecar
from .config.registry import registered_model_types
from .config.shapes import check_state
from .errors import CheckpointNotFoundError, CkptfmtError
from .format.digest import check_digest
from .format.header import (
    DTYPE_SIZES,
    KEY_CONFIG,
    KEY_OPTIMIZER,
    KEY_SHARD,
    Header,
    looks_like_safetensors,
    read_header,
)
from .format.index import without_shards
from .io.files import read_capped, walk_files

__all__ = ["VerifyReport", "inspect_checkpoint", "inspect_folder", "sidecar_status", "verify"]

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
        "sidecar": {"status": "present", "path": str(path.parent / "model_config.json")}
        if resolution.origin == "sidecar" or (path.parent / "model_config.json").exists() else {"status": "missing"},
    }
    if tensors:
        info["tensor_list"] = [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in infos]
    return info


def sidecar_status(header: Header, embedded: ModelConfig | None, *, memo: _WalkMemo | None = None) -> dict[str, Any]:
    """Whether `model_config.json` beside the file agrees with it (`embedded` is the file's
    own config, already parsed; None when it has none or it is invalid). `memo` keeps what a
    walk over many files reads once.

    status: "consistent", "missing", "unbound" (the sidecar does not list this file),
    "stale" (it is bound to other weights: the file was replaced, or a crash came between
    writing the weights and the sidecar), "disagrees" (other config fields), "invalid".
    """
    return _sidecar_status(header.path, header.weights_sha256, embedded, _WalkMemo() if memo is None else memo)


def _sidecar_status(path: Path, weights_sha256: str | None, embedded: ModelConfig | None, memo: _WalkMemo) -> dict[str, Any]:
    folder = path.parent
    sidecar = memo.sidecar(folder)
    if isinstance(sidecar, CkptfmtError):
        return {"status": "invalid", "path": str(folder / "model_config.json"), "message": sidecar.message}
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
    """One summary per checkpoint under `folder` (recursively); unreadable ones carry `error`.

    The summary of a single-file .safetensors is remembered in the cache folder, keyed by the
    file's identity (device, inode, size, modification and change times, as git's index keys
    its files): a folder inspected again is answered from one cache file, each checkpoint's
    header re-read only when the file changed. Whether its architecture is registered here
    and what its sidecar says are worked out afresh each time.
    """
    folder = Path(folder)
    memo = _WalkMemo()
    cache = _SummaryCache(folder)
    rows = []
    for path in without_shards(walk_files(folder, CHECKPOINT_SUFFIXES)):
        try:
            row = cache.recall(path, memo)
            if row is None:
                row = inspect_checkpoint(path, memo=memo)
                cache.remember(path, row)
            rows.append(row)
        except CkptfmtError as exc:
            rows.append({"file": str(path), "error": str(exc)})
    cache.save()
    return rows


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
        # The code that made a summary: its version, and its modules' stat (an edited checkout).
        modules = sorted(Path(__file__).parent.rglob("*.py"))
        self._version = [__version__, *([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in modules)]
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

    def sidecar(self, folder: Path) -> Any:
        if folder not in self.sidecars:
            try:
                self.sidecars[folder] = read_sidecar(folder)
            except CkptfmtError as exc:
                self.sidecars[folder] = exc
        return self.sidecars[folder]

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


@dataclass
class VerifyReport:
    """The outcome of `verify`: each check with its result; `ok` only if every one passed."""

    path: Path
    checks: list[dict[str, Any]] = field(default_factory=list)
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(check["ok"] for check in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f"{self.path}: {c['message']}" for c in self.checks if not c["ok"]]

    def add(self, name: str, ok: bool, message: str, *, skipped: bool = False) -> None:
        self.checks.append({"check": name, "ok": ok, "message": message, "skipped": skipped})

    def to_dict(self) -> dict[str, Any]:
        gbps = self.bytes_hashed / self.seconds / 1e9 if self.seconds else None
        return {
            "file": str(self.path), "ok": self.ok, "checks": self.checks,
            "bytes_hashed": self.bytes_hashed, "seconds": round(self.seconds, 4),
            "gb_per_s": round(gbps, 3) if gbps else None,
        }


def verify(path: str | os.PathLike) -> VerifyReport:
    """Check a .safetensors checkpoint: header rules, config, shapes, sidecar, weights digest.

    Example:
        >>> report = verify("checkpoints/multitask_joint/best_model.safetensors")
        >>> report.ok, report.failures
        (True, [])
    """
    path = Path(path)
    report = VerifyReport(path)
    try:
        if not path.exists():
            raise CheckpointNotFoundError("no such file", path=path)
        if not looks_like_safetensors(path):
            report.add("format", False, "is a legacy pickle checkpoint, which records nothing to verify "
                       "against; convert it with `ckptfmt convert`")
            return report
        header = read_header(path)
    except CkptfmtError as exc:
        report.add("header", False, exc.message)
        return report
    try:
        header.training(), header.provenance()  # their schemas, as loading checks them
    except CkptfmtError as exc:
        report.add("header", False, exc.message)
    else:
        report.add("header", True, "well formed")
    shard = header.metadata.get(KEY_SHARD)
    if shard is not None:
        report.add("shard", True, f"one shard of a sharded checkpoint ({shard}); its config is checked with "
                   "the index, verify the index to check the whole", skipped=True)
        _verify_digest(header, report)
        return report

    # The digest streams the file on a second core while the shape check imports torch and
    # builds the model: the whole command costs about the larger of the two, not their sum.
    from .io.background import helpers  # here: its thread pool costs inspect an import

    digest = helpers().submit(_timed_digest, header)
    _verify_config_and_sidecar(header, report)
    _report_digest(header, report, *digest.result())
    _verify_companion(header, report)
    return report


def _verify_config_and_sidecar(header: Header, report: VerifyReport) -> None:
    config = None
    weights_only = False
    try:
        embedded = header.config_dict()
        if embedded is None:
            weights_only = KEY_OPTIMIZER not in header.metadata
            if weights_only:
                report.add("config", True, "weights only (no config)")
        else:
            config = ModelConfig.from_dict(embedded)
            report.add("config", True, f"valid, schema {embedded.get('schema_version', 0)}")
    except CkptfmtError as exc:
        report.add("config", False, f"invalid embedded config: {exc.message}")

    if config is not None:
        config = _verify_shapes(header, config, report)

    if header.is_ckptfmt and KEY_OPTIMIZER not in header.metadata and not weights_only:
        status = sidecar_status(header, config)
        messages = {
            "consistent": (True, "sidecar consistent"),
            "missing": (True, "no sidecar (the embedded config is authoritative)"),
            "unbound": (True, "sidecar does not list this file (written by an older tool?)"),
            "stale": (False, "sidecar is bound to other weights (sha256 "
                      f"{status.get('bound_sha256', '')[:12]}...): the file was replaced, or a crash "
                      "came between writing the weights and the sidecar; re-run the save or convert"),
            "disagrees": (False, f"sidecar disagrees with the embedded config: {'; '.join(status.get('differences', []))}"),
            "invalid": (False, f"sidecar is invalid: {status.get('message')}"),
        }
        report.add("sidecar", *messages[status["status"]])


def _timed_digest(header: Header) -> tuple[str | None, Exception | None, float]:
    start = time.perf_counter()
    try:
        return check_digest(header), None, time.perf_counter() - start
    except (CkptfmtError, OSError) as exc:
        return None, exc, time.perf_counter() - start


def _report_digest(header: Header, report: VerifyReport, actual: str | None, error: Exception | None, seconds: float) -> None:
    if error is not None:
        report.add("digest", False, getattr(error, "message", str(error)))
        return
    report.seconds = seconds
    report.bytes_hashed = header.data_bytes
    report.add("digest", True, f"weights sha256 {actual[:12]}... matches")


def _verify_digest(header: Header, report: VerifyReport) -> None:
    _report_digest(header, report, *_timed_digest(header))


def _verify_shapes(header: Header, config: ModelConfig, report: VerifyReport) -> ModelConfig | None:
    """The config checked against its architecture, then against the tensors; skipped, saying
    why, when the architecture is not installed here. Returns the checked config, or None when
    it is invalid."""
    from .errors import MissingDependencyError, UnknownModelTypeError

    if config.model_type not in registered_model_types():
        report.add("shapes", True, f"skipped: model_type {config.model_type!r} is not registered here; "
                   "import or install what registers it to check the tensors against it", skipped=True)
        return config
    shapes, dtypes = header.shapes(), header.dtypes()
    document = config.to_dict()
    facts = recall(document)  # this config was checked before: no torch, no architecture to import
    if facts is not None:
        expected = {name: (tuple(shape), dtype) for name, (shape, dtype) in facts["state"].items()}
        if not check_state(expected, shapes, dtypes):
            report.add("shapes", True, f"all {len(shapes)} tensors fit the config")
            return config
        # A mismatch: the architecture itself says which field is to blame, below.
    try:
        config = config.checked()
    except (UnknownModelTypeError, MissingDependencyError) as exc:  # a library's model, the library not here
        report.add("shapes", True, f"skipped: {exc.message}", skipped=True)
        return config
    except CkptfmtError as exc:
        report.checks[-1] = {**report.checks[-1], "ok": False, "message": f"invalid embedded config: {exc.message}"}
        return None
    from .config.registry import get_model_entry
    from .config.shapes import check_shapes

    try:
        check_shapes(config, shapes, dtypes=dtypes)
        report.add("shapes", True, f"all {len(shapes)} tensors fit the config")
        remember(document, config.to_dict(), get_model_entry(config.model_type).expected_state(config.params))
    except CkptfmtError as exc:
        report.add("shapes", False, f"config does not match the tensors: {exc.message}")
    return config


def _verify_companion(header: Header, report: VerifyReport) -> None:
    """The training-state companion the checkpoint binds: named inside its folder, a regular
    file, its JSON and tensors matching the binding's digest, and every tensor its JSON names
    held (see `training`)."""
    from .format.companion import companion_path, verify_training_state

    try:
        binding = header.training().get("optimizer")
    except CkptfmtError as exc:
        report.add("training", False, f"invalid training record: {exc.message}")
        return
    if not binding:
        return
    try:
        companion = companion_path(header.path, binding)
        covers = verify_training_state(companion, sha256=binding["sha256"])
    except CkptfmtError as exc:
        report.add("optimizer", False, f"training state {binding.get('file')}: {exc.message}")
        return
    report.add("optimizer", True, f"training state {companion.name} matches; the digest covers {covers}")
