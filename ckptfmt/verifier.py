"""What `verify` computes: every check a checkpoint can be put to, each with its verdict.

The header's rules, the config, the config against the tensor shapes (the architecture asked,
or what it said of this config before: see config/facts.py), the sidecar, the weights digest
(every byte read once, on a second core) and the training-state companion.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.facts import recall, remember
from .config.model_config import ModelConfig
from .config.registry import registered_model_types
from .config.shapes import check_state
from .errors import CheckpointNotFoundError, CkptfmtError, LegacyCheckpointError
from .format.digest import check_digest
from .format.header import INDEX_SUFFIX, KEY_OPTIMIZER, KEY_SHARD, Header, looks_like_safetensors, read_header
from .format.index import without_shards
from .inspect import sidecar_status
from .io.files import walk_files

__all__ = ["VerifyReport", "verify", "verify_all"]


@dataclass
class VerifyReport:
    """The outcome of `verify`: each check with its result; `ok` only if every one passed."""

    path: Path
    checks: list[dict[str, Any]] = field(default_factory=list)
    bytes_hashed: int = 0
    seconds: float = 0.0
    weights_only: bool = False  # the file records no config (not a failure: there is nothing to check it against)

    @property
    def skipped(self) -> list[str]:
        """The checks that could not run here (an architecture not installed), by name."""
        return [check["check"] for check in self.checks if check["skipped"]]

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
        if not path.exists() and not path.is_symlink():  # a link loop is said as one when it is opened
            raise CheckpointNotFoundError("no such file", path=path)
        if not looks_like_safetensors(path):
            from .sources.legacy import torch_serialization

            torch_serialization(path)  # what is not a torch file at all is said as inspect says it
            report.add("format", False, "is a legacy pickle checkpoint, which records nothing to verify "
                       "against; convert it with `ckptfmt convert`")
            return report
        header = read_header(path)
    except CkptfmtError as exc:
        report.add("format" if isinstance(exc, LegacyCheckpointError) else "header", False, exc.message)
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


def verify_all(paths: Iterable[str | os.PathLike]) -> Iterator[VerifyReport]:
    """`verify` of each file in `paths` and of every checkpoint under each folder (a sharded one
    once, as its index), one report each as it is made, in the order given (a folder's in name
    order).

    A file that cannot be read fails alone and the others are still checked; whatever under a
    folder could not be walked or read (a folder without permission, a link loop) is a failed
    report of its own. No reports at all: there was nothing to verify.

    Example:
        >>> [report.ok for report in verify_all(["converted/multitask_joint"])]
        [True, True]
    """
    for path in map(Path, paths):
        if not path.is_dir():
            yield _verify_alone(path)
            continue
        walk = walk_files(path, (".safetensors", INDEX_SUFFIX))
        found: list[Path | CkptfmtError] = [*without_shards(walk.files), *walk.unreadable]
        for item in sorted(found, key=lambda item: str(item.path) if isinstance(item, CkptfmtError) else str(item)):
            yield _failed(Path(item.path), item.message) if isinstance(item, CkptfmtError) else _verify_alone(item)


def _verify_alone(path: Path) -> VerifyReport:
    try:
        return verify(path)
    except (CkptfmtError, OSError) as exc:  # whatever one file meets, it meets alone
        return _failed(path, exc.message if isinstance(exc, CkptfmtError) else (exc.strerror or str(exc)))


def _failed(path: Path, message: str) -> VerifyReport:
    report = VerifyReport(path)
    report.add("read", False, message)
    return report


def _verify_config_and_sidecar(header: Header, report: VerifyReport) -> None:
    config = None
    weights_only = False
    try:
        embedded = header.config_dict()
        if embedded is None:
            weights_only = KEY_OPTIMIZER not in header.metadata
            if weights_only:
                report.weights_only = True
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
        remember(document, get_model_entry(config.model_type).expected_state(config.params))
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
