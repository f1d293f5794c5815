"""`ckptfmt predict`: a checkpoint's model run on image files, one report line per image."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..io.images import MAX_PIXELS
from .app import main, out, user_errors


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
@user_errors
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
    from ..io.images import find_inputs
    from ..predict import MultiTaskPredictor, predict_files

    predictor = MultiTaskPredictor(checkpoint, device=device, precision=precision, batch_size=batch_size)
    walk = find_inputs(inputs)
    files = walk.files
    for error in walk.unreadable:  # what the walk could not read fails first, and counts
        out(f"[FAIL] {error.describe(cli=True)}", err=True)
    if not files:
        if walk.unreadable:
            sys.exit(1)
        raise click.ClickException("no .npy or image files found in the inputs")
    with click.progressbar(length=len(files), label="predicting", file=sys.stderr) as bar:
        results, table = predict_files(
            predictor, files, out_dir, threshold=threshold, table_format=table_format, overwrite=force,
            max_pixels=max_pixels, on_done=lambda _: bar.update(1),
        )
    counts = {"predicted": 0, "skipped": 0, "failed": len(walk.unreadable)}
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
