"""The `ckptfmt` command: a thin layer over the library.

Results go to stdout (pure JSON with --json); progress, warnings and errors to stderr. A user
error is one line, `Error: FILE: problem; fix`, and exit 1 (usage errors exit 2); never a
traceback. Commands that take many files report each failed one as one `[FAIL] FILE: problem`
line on stderr, go on with the rest, and exit 1.
Heavy modules are imported inside the commands, so `ckptfmt --help` and `ckptfmt inspect` of a
.safetensors never import torch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import CkptfmtError, CkptfmtWarning, Words
from .io.images import MAX_PIXELS
from .version import __version__

logger = logging.getLogger("ckptfmt")


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        # A record that names an argument is logged as Words; here it says the option.
        text = record.msg.cli if isinstance(record.msg, Words) and not record.args else record.getMessage()
        out(f"{prefix}{text}", err=True)


# Control characters, and surrogates (a file name that is not valid UTF-8, as Python reads it):
# printed raw, a surrogate becomes a stray byte, a C1 control on an 8-bit terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def shown(text: Any) -> str:
    """`text` with control characters escaped (\\n, \\e, \\x07, ...), as ls and git show
    names: file names, tensor names and strings from files are untrusted, and a raw escape
    sequence or newline in them could rewrite the terminal or forge a report line."""
    return _CONTROL.sub(_escaped, str(text))


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8: shown as that byte
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return _NAMED.get(match.group(), f"\\x{code:02x}")


def out(line: str = "", *, err: bool = False) -> None:
    """One report line, made safe: every line the CLI prints goes through here (JSON output is
    safe by construction and goes through `_echo_json`)."""
    click.echo(shown(line), err=err)


def _user_errors(command):
    """Turn our errors, and the OS errors a user can cause, into one line and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            try:
                return command(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, where click ends the command quietly
        except BrokenPipeError:
            raise  # `ckptfmt inspect X --tensors | head -1`: click exits quietly, as ls does
        except CkptfmtError as exc:
            raise click.ClickException(shown(exc.describe(cli=True))) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own ending of a command, said by click
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(shown(f"{where}{exc.strerror or exc}")) from None
        except Exception as exc:
            # A bug here or in an architecture's code: one line all the same; the traceback on request.
            if os.environ.get("CKPTFMT_TRACEBACK"):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(shown(
                f"unexpected {type(exc).__name__}: {first_line} (a bug: please report it, with the traceback "
                "that CKPTFMT_TRACEBACK=1 shows)")) from None

    return wrapper


def run() -> None:
    """The `ckptfmt` command. Once a command has flushed its output (every file it wrote is
    already synced and closed), the process ends at once when torch was imported, rather than
    spending half a second in torch's interpreter teardown."""
    try:
        main.main(prog_name="ckptfmt")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    if "torch" in sys.modules:
        os._exit(code)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptfmt")
@click.option("-v", "--verbose", is_flag=True, help="Also show informational messages on stderr.")
def main(verbose: bool) -> None:
    """Self-describing PyTorch checkpoints.

    One .safetensors file holds the weights and, in its header, the architecture config,
    training record, provenance and a digest of the weights.

    \b
    Example:
        ckptfmt convert checkpoints/ -o converted/    # every .pth, .pt and .ckpt under a folder
        ckptfmt inspect converted/multitask_joint/best_model.safetensors
    """
    logger.handlers[:] = [_StderrHandler()]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach the user as one `warning: ...` line, not Python's file-and-line form, in
    the command line's words."""
    text = message.describe(cli=True) if isinstance(message, CkptfmtWarning) else str(message)
    out(f"warning: {text}", err=True)


def _parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    from .io.jsondoc import loads_strict

    overrides = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            overrides[key] = loads_strict(raw, what=f"--set {key}")
        except CkptfmtError:
            overrides[key] = raw  # not JSON: a plain string, as in --set description=joint run
    return overrides


def _echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))  # json.dumps escapes control characters


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="A .safetensors file (one source) or a folder mirroring the sources' layout. "
                   "Default: beside each source.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A model_config.json to use instead of the sidecar or the inferred config.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Set a config field (repeatable); checked against the weights.")
@click.option("--model-type", help="Only try this registered architecture (with --config: attach it).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
              help="Cast floating-point tensors; the cast is recorded in provenance.")
@click.option("--max-shard-size", metavar="SIZE",
              help="Write shards of at most SIZE (2GB, 500MiB, bytes) and an index, as Hugging Face does, "
                   "when the weights do not fit in one.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs and a disagreeing sidecar.")
@click.option("--unsafe-pickle", is_flag=True,
              help="Unpickle with weights_only=False: allows any pickled object (a whole model included, whose "
                   "state_dict() is converted). This RUNS CODE from the file: only for files you trust.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@_user_errors
def convert(paths, output, config_path, sets, model_type, dtype, max_shard_size, force, unsafe_pickle, as_json):
    """Convert legacy .pth, .pt and Lightning .ckpt checkpoints to self-describing .safetensors.

    PATHS are files or folders (every .pth/.pt/.ckpt under them). Each becomes NAME.safetensors
    with the architecture config embedded, plus model_config.json beside it; optimizer,
    scheduler and scaler states go to NAME.optimizer.safetensors. The config comes from
    --config, else the sidecar beside the source, else the file's hyper_parameters, else the
    tensor shapes. Each file's report says where its keys went, and which were dropped and why.
    Files already converted from the same source bytes are skipped.

    \b
    Example:
        ckptfmt convert checkpoints/ -o converted/
        ckptfmt convert checkpoints/multitask_seg_warmup/best_model.pth -o warmup.safetensors --set description="warm-up"
    """
    from .converter import convert_all

    overrides = _parse_set(sets)

    def progress(index: int, total: int, source: Path) -> None:
        if total > 1 and not as_json:
            out(f"[{index + 1}/{total}] {source}", err=True)

    results = convert_all(
        paths, output=output, on_start=progress, config=config_path, overrides=overrides,
        model_type=model_type, dtype=dtype, force=force, unsafe_pickle=unsafe_pickle, max_shard_size=max_shard_size,
    )
    counts = {status: sum(r.status == status for r in results) for status in ("converted", "skipped", "failed")}
    if as_json:
        _echo_json({"results": [r.to_dict() for r in results], **counts})
    else:
        for r in results:
            for warning in r.warnings:  # plain strings, or Words where they name an argument
                out(f"warning: {r.source}: {warning.cli if isinstance(warning, Words) else warning}", err=True)
            if r.status == "failed":
                out(f"[FAIL] {_failure_line(r)}", err=True)
            elif r.status == "skipped":
                out(f"[SKIP] {r.source}: already converted to {r.output} (same source sha256)")
            else:
                arch = r.config.summary() if r.config else "(weights only, no config)"
                out(f"[OK]   {r.source} -> {r.output}  {arch}")
                out(f"       {_carried_line(r)}")
                for key, reason in r.dropped.items():
                    out(f"       dropped {key}: {reason}")
        if not results:
            out("No .pth, .pt or .ckpt files found.", err=True)
        out(f"{counts['converted']} converted, {counts['skipped']} skipped, {counts['failed']} failed")
    if counts["failed"]:
        sys.exit(1)


def _failure_line(result) -> str:
    """Why a conversion failed, in the command line's words, starting with the source it is about."""
    failure = result.failure
    if not isinstance(failure, CkptfmtError):
        return result.error  # an OS error or a bug: no argument of ours to name
    text = failure.describe(cli=True)
    return text if failure.path == str(result.source) else f"{result.source}: {text}"


_CONFIG_ORIGINS = {
    "inferred": "inferred from the weights", "sidecar": "the sidecar", "--config": "--config",
    "--model-type and --set": "--model-type and --set", None: "none (weights only)",
}


def _carried_line(result) -> str:
    """Where the source's keys went: `weights: state_dict; config: hyper_parameters; ...`."""
    carried = result.carried
    parts = [f"weights: {', '.join(carried.get('weights', []))}"]
    parts.append(f"config: {', '.join(carried['config'])}" if "config" in carried
                 else f"config: {_CONFIG_ORIGINS.get(result.config_source, result.config_source)}")
    if carried.get("training"):
        parts.append(f"training record: {', '.join(carried['training'])}")
    if carried.get("companion"):
        parts.append(f"companion {result.optimizer_file.name}: {', '.join(carried['companion'])}")
    return "; ".join(parts)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:,} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _summary_line(info: dict[str, Any]) -> str:
    if "error" in info:
        return f"{info['file']}  ERROR {info['error']}"
    config = info.get("config")
    arch = _config_summary(config) if config else "no config"
    if info.get("config_source") == "inferred":
        arch += " (inferred)"
    if info.get("registered") is False:
        arch += " (not registered here)"
    sidecar = (info.get("sidecar") or {}).get("status", "-")
    return (f"{info['file']}  {info['kind']}  {arch}  {info['tensors']['parameters']:,} params  "
            f"{_size(info['size'])}  sidecar: {sidecar}")


def _config_summary(config: dict[str, Any]) -> str:
    from .config.arguments import RESERVED_NAMES

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
        line = sidecar["status"]
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
@_user_errors
def inspect_command(path, tensors, as_json):
    """Show what a checkpoint is: config, training record, provenance, tensors, sidecar.

    A .safetensors is answered from its header alone, in milliseconds whatever its size. A
    legacy .pth is loaded safely (weights only) and its config inferred. A folder gives one
    line per checkpoint.

    \b
    Example:
        ckptfmt inspect converted/multitask_joint/best_model.safetensors
        ckptfmt inspect converted/ --json
    """
    from .inspect import inspect_checkpoint, inspect_folder

    if path.is_dir():
        rows = inspect_folder(path)
        if as_json:
            _echo_json(rows)
        else:
            for row in rows:
                out(_summary_line(row))
        return
    info = inspect_checkpoint(path, tensors=tensors)
    if as_json:
        _echo_json(info)
    else:
        _render_inspect(info)


@main.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@_user_errors
def verify_command(paths, as_json):
    """Check checkpoints are intact and consistent; exit 0 only if every check passes.

    PATHS are .safetensors files, indexes of sharded checkpoints, or folders (every checkpoint
    under them, a sharded one once). Checks the header
    (strict rules), the config, the config against the tensor shapes, the sidecar, the weights
    digest (every byte read once) and the optimizer companion. One line per file on stdout
    ([FAIL] lines on stderr), then a summary.

    \b
    Example:
        ckptfmt verify converted/multitask_joint/best_model.safetensors
        ckptfmt verify converted/
    """
    from .format.header import INDEX_SUFFIX
    from .format.index import without_shards
    from .inspect import verify
    from .io.files import walk_files

    files = [found for path in paths
             for found in (without_shards(walk_files(path, (".safetensors", INDEX_SUFFIX))) if path.is_dir() else [path])]
    reports = []
    for path in files:
        report = verify(path)
        reports.append(report)
        if as_json:
            continue
        if report.ok:
            speed = report.to_dict()["gb_per_s"]
            detail = f"digest read {_size(report.bytes_hashed)}" + (f" at {speed} GB/s" if speed else "")
            out(f"[OK]   {report.path}: {_checks_line(report)} ({detail})")
        for failure in report.failures:
            out(f"[FAIL] {failure}", err=True)
    failed = sum(not r.ok for r in reports)
    if as_json:
        _echo_json([r.to_dict() for r in reports])
    elif len(reports) != 1 or any(path.is_dir() for path in paths):
        out(f"{len(reports) - failed} verified, {failed} failed" + ("" if reports else "; no .safetensors files found"))
    if failed:
        sys.exit(1)


def _checks_line(report) -> str:
    weights_only = any(c["check"] == "config" and "weights only" in c["message"] for c in report.checks)
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
@_user_errors
def diff_command(a, b, values, as_json):
    """Compare two checkpoints (.pth or .safetensors, in any mix): everything they hold.

    A and B are files, indexes of sharded checkpoints, or the folders that hold one.

    Shows config, training-record and provenance differences (creation dates are shown, not
    compared), tensors in one file only, shape and dtype changes, and which common tensors
    differ. Exits 0 when the checkpoints are identical in all of it, 1 when they differ.

    \b
    Example:
        ckptfmt diff checkpoints/multitask_joint/best_model.pth converted/multitask_joint/best_model.safetensors
        ckptfmt diff converted/multitask_joint/best_model.safetensors converted/multitask_joint/last_model.safetensors --values
    """
    from .compare import diff

    result = diff(a, b, values=values)
    if as_json:
        _echo_json(result)
    else:
        for part, lines in (("config", result["config"]), ("training", result["training"]),
                            ("provenance", result["provenance"])):
            for line in lines:
                out(f"{part:<12}{line}")
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


@main.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the masks (NAME_mask.png, NAME_mask.npy) and the predictions table.")
@click.option("--device", help="cuda or cpu; default CUDA when available.")
@click.option("--precision", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto",
              show_default=True, help="auto: fp16 on CUDA, fp32 on the CPU.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Mask threshold; default the one in the checkpoint's config.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--format", "table_format", type=click.Choice(["json", "csv"]), default="json", show_default=True,
              help="Format of the predictions table.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True,
              help="Refuse an input that declares more pixels than this (all its images together), before "
                   "decoding it. The default keeps the demo model under 1.5 GB of memory on the CPU (about 140 "
                   "bytes a pixel); a wider model needs more per pixel, so lower it for one.")
@click.option("--force", is_flag=True, help="Predict every input again, replacing existing outputs and table.")
@_user_errors
def predict_command(checkpoint, inputs, out_dir, device, precision, threshold, batch_size, table_format, max_pixels,
                    force):
    """Run a checkpoint's model on images: masks and class probabilities, as its task has them.

    INPUTS are .npy arrays (H x W, C x H x W, or N x C x H x W for several images) and image
    files (PNG, JPEG, TIFF, BMP), or folders of them. Image files are scaled to [0, 1] by bit
    depth; then the normalisation recorded in the checkpoint applies. Each image gets
    NAME_mask.png and NAME_mask.npy (NAME_0, NAME_1, ... for an array of several) when the model
    segments, and a row in predictions.json (or .csv).

    A bad input is reported and the others still run (exit code 1): one that declares more than
    --max-pixels is refused before it is decoded, and one that the model runs out of memory on
    fails alone. Running the same command
    again skips the inputs whose outputs the table records as made from the same input and
    checkpoint, and predicts the rest; an output that exists for another reason is replaced
    only with --force.

    \b
    Example:
        ckptfmt predict converted/multitask_joint/best_model.safetensors checkpoints/scans/ --out masks/
    """
    from .io.images import find_inputs
    from .predict import MultiTaskPredictor, predict_files

    predictor = MultiTaskPredictor(checkpoint, device=device, precision=precision, batch_size=batch_size)
    files = find_inputs(inputs)
    if not files:
        raise click.ClickException("no .npy or image files found in the inputs")
    with click.progressbar(length=len(files), label="predicting", file=sys.stderr) as bar:
        results, table = predict_files(
            predictor, files, out_dir, threshold=threshold, table_format=table_format, overwrite=force,
            max_pixels=max_pixels, on_done=lambda _: bar.update(1),
        )
    counts = {"predicted": 0, "skipped": 0, "failed": 0}
    for result in results:
        where = result.input if result.index is None else f"{result.input}[{result.index}]"
        if result.failure is not None:
            counts["failed"] += 1
            out(f"[FAIL] {result.failure.describe(cli=True)}", err=True)
        elif result.skipped:
            counts["skipped"] += 1
            out(f"[SKIP] {where}: already predicted by this checkpoint"
                + (f" -> {result.outputs[0]}" if result.outputs else ""))
        else:
            counts["predicted"] += 1
            p, parts = result.prediction, []
            if p.class_probabilities is not None:
                parts.append(f"{p.class_name} ({p.class_probabilities[p.label]:.3f})")
            if p.mask is not None:
                parts.append(f"{int(p.mask.sum())} mask pixels -> {result.outputs[0]}")
            out(f"[OK]   {where}: {', '.join(parts)}")
    out(f"{counts['predicted']} predicted, {counts['skipped']} skipped, {counts['failed']} failed; table in {table}")
    if counts["failed"]:
        sys.exit(1)
