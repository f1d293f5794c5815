"""`ckptfmt convert`: legacy checkpoints to self-describing .safetensors, one report line each."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import CkptfmtError, Words
from .app import echo_json, main, out, parse_set, user_errors


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
              help="Cast floating-point tensors; the cast is recorded in provenance. A cast that would turn "
                   "finite values into inf is refused, naming the tensor.")
@click.option("--allow-overflow", is_flag=True,
              help="With --dtype: cast even where finite values become inf; provenance's cast record names "
                   "each such tensor and its largest magnitude.")
@click.option("--max-shard-size", metavar="SIZE",
              help="Write shards of at most SIZE (2GB, 500MiB, bytes) and an index, as Hugging Face does, "
                   "when the weights do not fit in one.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs and a disagreeing sidecar.")
@click.option("--unsafe-pickle", is_flag=True,
              help="Unpickle with weights_only=False: allows any pickled object (a whole model included, whose "
                   "state_dict() is converted). This RUNS CODE from the file: only for files you trust.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@user_errors
def convert(paths, output, config_path, sets, model_type, dtype, allow_overflow, max_shard_size, force, unsafe_pickle,
            as_json):
    """Convert legacy .pth, .pt and Lightning .ckpt checkpoints to self-describing .safetensors.

    PATHS are files or folders (every .pth/.pt/.ckpt under them). Each becomes NAME.safetensors
    with the architecture config embedded, plus model_config.json beside it (or
    NAME.model_config.json, when the folder's describes another config); optimizer, scheduler
    and scaler states go to NAME.optimizer.safetensors. The config comes from --config, else
    the sidecar beside the source, else a Hub folder's config.json, else the file's
    hyper_parameters, else the tensor shapes. Each file's report says where its keys went, and
    which were dropped and why. Files already converted from the same source bytes with the
    same options are skipped; one converted with other options (--dtype, --max-shard-size,
    --config, --set, --model-type) is refused without --force.

    \b
    Example:
        ckptfmt convert checkpoints/ -o converted/
        ckptfmt convert checkpoints/multitask_seg_warmup/best_model.pth -o warmup.safetensors --set description="warm-up"
    """
    from ..converter import convert_all

    overrides = parse_set(sets)

    def progress(index: int, total: int, source: Path) -> None:
        if total > 1 and not as_json:
            out(f"[{index + 1}/{total}] {source}", err=True)

    results = convert_all(
        paths, output=output, on_start=progress, config=config_path, overrides=overrides,
        model_type=model_type, dtype=dtype, force=force, unsafe_pickle=unsafe_pickle, max_shard_size=max_shard_size,
        allow_overflow=allow_overflow,
    )
    counts = {status: sum(r.status == status for r in results) for status in ("converted", "skipped", "failed")}
    if as_json:
        echo_json({"results": [r.to_dict() for r in results], **counts})
    else:
        for r in results:
            for warning in r.warnings:  # plain strings, or Words where they name an argument
                out(f"warning: {r.source}: {warning.cli if isinstance(warning, Words) else warning}", err=True)
            if r.status == "failed":
                out(f"[FAIL] {_failure_line(r)}", err=True)
            elif r.status == "skipped":
                out(f"[SKIP] {r.source}: {r.note}")
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
