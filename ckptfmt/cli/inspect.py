"""`ckptfmt inspect`, `verify` and `diff`: what a checkpoint holds, whether it is intact, and how two
differ, rendered as report lines (or one JSON document)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .app import echo_json, main, out, shown, user_errors


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:,} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _summary_line(info: dict[str, Any]) -> str:
    config = info.get("config")
    arch = _config_summary(config) if config else "no config"
    if info.get("config_source") == "inferred":
        arch += " (inferred)"
    if info.get("registered") is False:
        arch += " (not registered here)"
    sidecar = (info.get("sidecar") or {}).get("status", "-")
    return (f"{info['file']}  {info['kind']}  {arch}  {info['tensors']['parameters']:,} params  "
            f"{_size(info['size'])}  sidecar: {sidecar}")


def _folder_failure(row: dict[str, Any]) -> str | None:
    """Why a row of a folder's summary fails it: the checkpoint, or something under the folder,
    could not be read, or its sidecar cannot be read as one."""
    if "error" in row:
        return row["error"]
    sidecar = row.get("sidecar") or {}
    if sidecar.get("status") == "invalid":
        return f"{row['file']}: sidecar is invalid: {sidecar.get('message')}"
    return None


def _config_summary(config: dict[str, Any]) -> str:
    from ..config.arguments import RESERVED_NAMES

    arguments = ", ".join(f"{k}={json.dumps(config[k])}" for k in sorted(config) if k not in RESERVED_NAMES)
    return f"{config['model_type']}({arguments})"


def _render_inspect(info: dict[str, Any]) -> None:
    rows = [("file", info["file"]), ("size", _size(info["size"]))]
    if info["kind"] == "legacy":
        rows.append(("format", f"legacy pickle ({info['serialization']}), read with weights_only=True"))
    else:
        version = info["format_version"]
        rows.append(("format", f"ckptfmt {version}" if version else f"{info['kind']} (not written by ckptfmt)"))
    for row in rows:
        out(f"{row[0]:<12}{row[1]}")
    config = info.get("config")
    if config:
        source = {"inferred": "inferred from the weights (legacy)", "sidecar": "from the sidecar (legacy)"}.get(
            info.get("config_source"), info.get("config_source"))
        out(f"config      {source}")
        for key in sorted(config):
            value = json.dumps(config[key])
            if key == "model_type" and info.get("registered") is False:
                value += "  (not registered here: import or install what registers it to load this file)"
            out(f"  {key:<18}{value}")
    elif info.get("note") or info.get("not_recognised"):
        out(f"config      none: {info.get('note') or info.get('not_recognised')}")
    training = info.get("training") or {}
    if training:
        parts = []
        if "epoch" in training:
            parts.append(f"epoch {training['epoch']}")
        if "global_step" in training:
            parts.append(f"step {training['global_step']}")
        if training.get("metrics"):
            parts.append(", ".join(f"{k}={v}" for k, v in training["metrics"].items()))
        if training.get("optimizer"):
            parts.append(f"optimizer state in {training['optimizer']['file']}")
        if training.get("extra"):
            parts.append(f"also {', '.join(training['extra'])}")
        out(f"training    {'; '.join(parts)}")
        if training.get("hyper_parameters"):
            out(f"hparams     {json.dumps(training['hyper_parameters'], sort_keys=True)}")
    provenance = info.get("provenance") or {}
    if provenance:
        line = f"created {provenance.get('created_at')} by ckptfmt {provenance.get('ckptfmt')}, torch {provenance.get('torch')}"
        source = provenance.get("source")
        if source:
            line += f"; converted from {source['file']} ({source['serialization']}, sha256 {source['sha256'][:12]}...)"
        if provenance.get("cast"):
            line += f"; cast to {provenance['cast']['to']}"
        out(f"provenance  {line}")
    if info.get("shards"):
        out(f"shards      {len(info['shards'])} files: {', '.join(info['shards'])}")
    tensors = info["tensors"]
    dtypes = "; ".join(f"{d}: {v['tensors']} tensors, {_size(v['bytes'])}" for d, v in tensors["dtypes"].items())
    out(f"tensors     {tensors['count']} tensors, {tensors['parameters']:,} parameters; {dtypes}")
    sidecar = info.get("sidecar")
    if sidecar:
        from ..config.sidecar import SIDECAR_NAME

        line = sidecar["status"]
        if sidecar.get("path") and Path(sidecar["path"]).name != SIDECAR_NAME:  # the checkpoint's own
            line += f" ({Path(sidecar['path']).name})"
        if sidecar.get("differences"):
            line += ": " + "; ".join(sidecar["differences"])
        if sidecar.get("message"):
            line += ": " + sidecar["message"]
        out(f"sidecar     {line}")
    for tensor in info.get("tensor_list", []):
        out(f"  {tensor['name']:<40}{tensor['dtype']:<6}{tensor['shape']}")


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--tensors", is_flag=True, help="Also list each tensor's name, dtype and shape.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@user_errors
def inspect_command(path, tensors, as_json):
    """Show what a checkpoint is: config, training record, provenance, tensors, sidecar.

    A .safetensors is answered from its header alone, in milliseconds whatever its size. A
    legacy .pth is loaded safely (weights only) and its config inferred. A folder gives one
    line per checkpoint, and one [FAIL] line on stderr (exit 1) for each that cannot be read or
    whose sidecar cannot be.

    \b
    Example:
        ckptfmt inspect converted/multitask_joint/best_model.safetensors
        ckptfmt inspect converted/ --json
    """
    from ..inspect import inspect_checkpoint, inspect_folder
    from ..sources.dcp import is_dcp_folder

    if path.is_dir() and not is_dcp_folder(path):  # a DCP folder is one checkpoint
        if tensors:
            raise click.UsageError("--tensors lists one checkpoint's tensors: give a checkpoint, not a folder")
        rows = inspect_folder(path)
        failures = [_folder_failure(row) for row in rows]
        if as_json:
            echo_json(rows)
        else:
            for row, failure in zip(rows, failures):
                if "error" not in row:
                    out(_summary_line(row))
                if failure:
                    out(f"[FAIL] {failure}", err=True)
        if any(failures):
            sys.exit(1)
        return
    info = inspect_checkpoint(path, tensors=tensors)
    if as_json:
        echo_json(info)
    else:
        _render_inspect(info)


@main.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--strict", is_flag=True, help="Fail a file whose shape check could not run here (its architecture "
              "not installed), as well as one that fails a check.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@user_errors
def verify_command(paths, strict, as_json):
    """Check checkpoints are intact and consistent; exit 0 only if every check passes.

    PATHS are .safetensors files, indexes of sharded checkpoints, or folders (every checkpoint
    under them, a sharded one once). Checks the header
    (strict rules), the config, the config against the tensor shapes, the sidecar, the weights
    digest (every byte read once) and the optimizer companion. One line per file on stdout
    ([FAIL] lines on stderr), then a summary, which counts the files whose shape check was
    skipped. A folder with nothing to verify is an error, so a typo never passes.

    \b
    Example:
        ckptfmt verify converted/multitask_joint/best_model.safetensors
        ckptfmt verify converted/ --strict
    """
    from ..verifier import verify_all

    reports = []
    for report in verify_all(paths):
        reports.append(report)
        if strict and "shapes" in report.skipped:
            report.add("strict", False, "its shape check was skipped (--strict)")
        if as_json:
            continue
        if report.ok:
            speed = report.to_dict()["gb_per_s"]
            detail = f"digest read {_size(report.bytes_hashed)}" + (f" at {speed} GB/s" if speed else "")
            out(f"[OK]   {report.path}: {_checks_line(report)} ({detail})")
        for failure in report.failures:
            out(f"[FAIL] {failure}", err=True)
    if not reports:
        raise click.ClickException(shown(f"{', '.join(map(str, paths))}: no .safetensors files found; nothing was "
                                         "verified"))
    failed = sum(not r.ok for r in reports)
    if as_json:
        echo_json([r.to_dict() for r in reports])
    elif len(reports) != 1 or any(path.is_dir() for path in paths):
        unchecked = sum("shapes" in r.skipped for r in reports if r.ok)
        out(f"{len(reports) - failed} verified, {failed} failed"
            + (f"; {unchecked} without a shape check (architecture not installed here)" if unchecked else ""))
    if failed:
        sys.exit(1)


def _checks_line(report) -> str:
    weights_only = report.weights_only
    names = [
        f"{c['check']} {c['message']}" if c.get("skipped") else c["check"]
        for c in report.checks if not (weights_only and c["check"] == "config")
    ]
    return ("weights only (no config); " if weights_only else "") + ", ".join(names)


@main.command("diff")
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--values", is_flag=True, help="Add the max absolute difference of differing tensors "
              "(after casting both to the wider dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@user_errors
def diff_command(a, b, values, as_json):
    """Compare two checkpoints (.pth or .safetensors, in any mix): everything they hold.

    A and B are files, indexes of sharded checkpoints, or the folders that hold one.

    Shows config, training-record and provenance differences (creation dates are shown, not
    compared), tensors in one file only, shape and dtype changes, and which common tensors
    differ: by the digests their headers record (format 3), without reading the tensors, else
    by their bytes. Exits 0 when the checkpoints are identical in all of it, 1 when they differ.

    \b
    Example:
        ckptfmt diff checkpoints/multitask_joint/best_model.pth converted/multitask_joint/best_model.safetensors
        ckptfmt diff converted/multitask_joint/best_model.safetensors converted/multitask_joint/last_model.safetensors --values
    """
    from ..compare import diff

    result = diff(a, b, values=values)
    if as_json:
        echo_json(result)
    else:
        for part, lines in (("config", result["config"]), ("training", result["training"]),
                            ("provenance", result["provenance"])):
            for line in lines:
                out(f"{part:<12}{line}")
        if result["conversion"]:
            source = result["conversion"]
            out(f"{'provenance':<12}one is the conversion of the other ({source.get('file')}, sha256 "
                f"{str(source.get('sha256'))[:12]}...), shown for information")
        if result["dates"]:
            out(f"{'dates':<12}created {result['dates']['a']} and {result['dates']['b']} (not compared)")
        for name in result["only_in_a"]:
            out(f"{'only in A':<12}{name}")
        for name in result["only_in_b"]:
            out(f"{'only in B':<12}{name}")
        for change in result["changed"]:
            out(f"{'shape':<12}{change['name']}: {change['a'][0]} {change['a'][1]} -> {change['b'][0]} {change['b'][1]}")
        for tensor in result["tensors"]:
            if tensor["identical"]:
                continue
            extra = f" (max abs diff {tensor['max_abs_diff']:.6g})" if tensor.get("max_abs_diff") is not None else ""
            if "dtype" in tensor:
                out(f"{'dtype':<12}{tensor['name']}: {tensor['dtype'][0]} -> {tensor['dtype'][1]}{extra}")
            else:
                out(f"{'differs':<12}{tensor['name']}{extra}")
        same = sum(t["identical"] for t in result["tensors"])
        verdict = ("the checkpoints are identical" if result["identical"]
                   else f"the checkpoints differ in: {', '.join(result['differs_in'])}")
        out(f"{same} of {len(result['tensors'])} common tensors identical; {verdict}")
    if not result["identical"]:
        sys.exit(1)

