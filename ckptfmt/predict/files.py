"""Predicting a list of image files: each image's mask written to a folder, and one table
(`predictions.json` or `.csv`) of the results, which a rerun reads to skip what is already done.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import OVERWRITE_FIX, CkptfmtError, InputError, Words
from ..io.atomic import write_all
from ..io.files import read_capped
from ..io.images import MAX_PIXELS, read_image
from ..io.jsondoc import loads_strict
from ..io.transaction import Transaction, finish_pending
from .predictor import MultiTaskPredictor, Prediction

__all__ = ["FileResult", "predict_files"]

# An earlier run's table is read whole, and parsed JSON takes up to ~32 bytes of memory per byte
# of text (a list of two-letter strings; a list of empty objects ~27): at 16 MiB that is at most
# some 800 MB at its peak with torch loaded, measured. A table as predict writes it takes ~500 bytes
# a row (JSON) or ~250 (CSV): some 30,000 images fit.
TABLE_LIMIT = 16 << 20


@dataclass
class FileResult:
    """What happened to one image of the inputs (an array of several gives one per image,
    `index` 0, 1, ...): predicted, skipped (a rerun found its outputs already made from the
    same input and checkpoint), or failed (`failure` is the error, about the input; `error` says
    it)."""

    input: Path
    index: int | None = None
    prediction: Prediction | None = None
    outputs: tuple[Path, ...] = ()
    row: dict[str, Any] | None = None
    skipped: bool = False
    failure: CkptfmtError | None = None

    @property
    def error(self) -> str | None:
        """Why it failed, naming the input, in Python's words (None when it did not fail)."""
        return None if self.failure is None else str(self.failure)

    @property
    def name(self) -> str:
        return self.input.stem if self.index is None else f"{self.input.stem}_{self.index}"


def predict_files(
    predictor: MultiTaskPredictor, inputs: Sequence[Path], out_dir: str | os.PathLike, *,
    threshold: float | None = None, table_format: str = "json", overwrite: bool = False,
    max_pixels: int = MAX_PIXELS, on_done=None,
) -> tuple[list[FileResult], Path]:
    """Predict each input file; write each image's mask (`NAME_mask.png` and `.npy`, or
    `NAME_0_mask.png`, ... for an array of several) and one table of the results.

    A rerun into the same folder skips the inputs whose outputs the table records as made
    from the same input bytes and the same checkpoint, and predicts the rest: after a partial
    failure, fix the failed inputs and run the same command again. An output that exists for
    any other reason is not replaced without `overwrite`, and the error names the input and the
    output. A bad input is recorded and the rest go on; the table always lists the inputs that
    succeeded.

    Returns:
        The per-image results and the path of the table (`predictions.json` or `.csv`).
    """
    out_dir = Path(out_dir)
    table = out_dir / f"predictions.{table_format}"
    checkpoint_sha256 = _checkpoint_identity(predictor)
    previous = {} if overwrite else _previous_rows(table, table_format, checkpoint_sha256)
    results: list[FileResult] = []
    stems: set[str] = set()
    # The masks and the table that records them take their names together: a run killed or out
    # of space leaves the previous run's files as they were, and nothing that blocks a rerun.
    with Transaction(out_dir, table.name) as transaction:
        for path in inputs:
            done = _predict_file(predictor, path, out_dir, previous, stems, transaction, threshold=threshold,
                                 overwrite=overwrite, max_pixels=max_pixels)
            results += done
            if on_done is not None:
                on_done(done)
        rows = [r.row for r in results if r.row is not None]
        names = [predictor.config.class_name(i) for i in range(predictor.task.classes or 0)]
        text = _table_text(rows, names, table_format, predictor, checkpoint_sha256)
        with transaction.stage(table, overwrite=overwrite or table.exists()) as fd:
            write_all(fd, text.encode())
    return results, table


def _checkpoint_identity(predictor: MultiTaskPredictor) -> str:
    metadata = predictor.checkpoint["metadata"]
    return metadata.get("weights_sha256") or metadata.get("source_sha256") or ""


_REDO = Words("choose another out_dir=, or pass overwrite=True to replace it",
              "choose another --out, or pass --force to replace it")


def _previous_rows(table: Path, table_format: str, checkpoint_sha256: str) -> dict[tuple[str, Any], dict]:
    """The rows of an earlier run's table, by (input, index); refused when that run used another
    checkpoint (its outputs are not this one's)."""
    finish_pending(table)
    if not table.exists():
        return {}
    try:
        data = read_capped(table, limit=TABLE_LIMIT, what="a predictions table", error=InputError)
    except InputError as exc:
        raise exc.at(table, problem=exc.message_words, fix=_REDO) from None
    try:
        text = data.decode("utf-8")
        if table_format == "json":
            document = loads_strict(text, what="the predictions table", path=table, error=InputError)
            rows, recorded = document["predictions"], document.get("checkpoint_sha256")
        else:
            rows, recorded = [], checkpoint_sha256
            # Row by row, each checked before the next is read: a short row would otherwise cost a
            # dict of every column for a couple of bytes of text.
            for line in csv.DictReader(io.StringIO(text)):
                row = _row_of_csv(line)
                if not _is_row(row):
                    raise ValueError(row)
                if not rows:
                    recorded = line.get("checkpoint_sha256")
                rows.append(row)
        if not isinstance(rows, list) or not all(map(_is_row, rows)):
            raise ValueError(rows)
        previous = {(row["input"], row.get("index")): row for row in rows}
    except InputError as exc:
        raise exc.at(table, problem=exc.message_words, fix=_REDO) from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, csv.Error):
        raise InputError("exists but is not a predictions table written by ckptfmt", path=table, fix=_REDO) from None
    if recorded != checkpoint_sha256:
        raise InputError("holds the predictions of another checkpoint", path=table, fix=_REDO)
    return previous


def _row_of_csv(line: dict) -> dict[str, Any]:
    """A CSV table's row in the shape of a JSON table's, the one a rerun writes the rows it skips
    from: label, class_name and class_probabilities (the p_ columns, in order), mask_pixels."""
    row = {"input": line.get("input"), "index": int(line["index"]) if line.get("index") else None,
           "input_sha256": line.get("input_sha256"),
           "outputs": line["outputs"].split(";") if line.get("outputs") else []}
    if "label" in line:
        row.update(label=int(line["label"]), class_name=line["class_name"],
                   class_probabilities=[float(line[key]) for key in line if key.startswith("p_")])
    if "mask_pixels" in line:
        row["mask_pixels"] = int(line["mask_pixels"])
    return row


def _is_row(row: Any) -> bool:
    """Whether `row` has what a rerun reads, of the types the table is written with."""
    return (
        type(row) is dict and type(row.get("input")) is str and (row.get("index") is None or type(row["index"]) is int)
        and type(row.get("input_sha256")) is str and len(row["input_sha256"]) == 64
        and type(row.get("outputs")) is list and all(type(output) is str for output in row["outputs"])
    )


def _predict_file(
    predictor: MultiTaskPredictor, path: Path, out_dir: Path, previous: dict, stems: set[str],
    transaction: Transaction, *,
    threshold: float | None, overwrite: bool, max_pixels: int,
) -> list[FileResult]:
    from ..io.files import sha256_file

    try:
        if path.stem in stems:
            raise InputError("has the same name as an earlier input; its outputs would collide", path=path)
        stems.add(path.stem)
        array = read_image(path, in_channels=predictor.task.in_channels, max_pixels=max_pixels)
        if not np.isfinite(array).all():
            raise InputError("holds NaN or infinite values; the model cannot predict from them", path=path)
        sha256 = sha256_file(path)
        batch = array.ndim == 4
        indices = list(range(len(array))) if batch else [None]
        earlier = [previous.get((_as_text(path), index)) for index in indices]
        if all(row is not None and row.get("input_sha256") == sha256 and all(_as_path(o).exists() for o in row["outputs"])
               for row in earlier):
            return [FileResult(path, index, outputs=tuple(map(_as_path, row["outputs"])), row=row, skipped=True)
                    for index, row in zip(indices, earlier)]
        try:
            predictions = predictor.predict(array, threshold=threshold)
        except (MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            if predictor.device.type == "cuda":
                torch.cuda.empty_cache()
            raise InputError(
                f"ran out of memory in the model on {_size(array, predictor.task.in_channels)}", path=path,
                fix=Words(f"run it where more memory is free, or lower max_pixels= (now {max_pixels:,}) to refuse "
                          "inputs this large before decoding them",
                          f"run it where more memory is free, or lower --max-pixels (now {max_pixels:,}) to refuse "
                          "inputs this large before decoding them"),
            ) from None
        predictions = predictions if batch else [predictions]
        if not all(map(_finite, predictions)):
            # Reported as [OK] with NaN, it also made a table that the rerun's strict reader refuses.
            raise InputError(
                f"the model's outputs for it are not finite (NaN or infinity): its values, from {array.min():g} to "
                f"{array.max():g}, lie beyond what the model and its normalisation can take", path=path,
            )
        results = [FileResult(path, index, prediction) for index, prediction in zip(indices, predictions)]
        for result in results:
            result.outputs = _output_paths(out_dir, result)
        for output in (o for r in results for o in r.outputs):
            if output.exists() and not overwrite:
                raise InputError(
                    f"its output {output} already exists, not from this input and checkpoint", path=path,
                    fix=OVERWRITE_FIX,
                )
        for result in results:
            _write_mask(result, transaction)
            result.row = {"input": _as_text(path), "index": result.index, "input_sha256": sha256,
                          "outputs": [_as_text(o) for o in result.outputs], **result.prediction.to_dict()}
        return results
    except CkptfmtError as exc:  # the predictor's own messages are about an array; this one has a file
        return [FileResult(path, failure=exc if exc.path else exc.at(path))]


def _finite(prediction: Prediction) -> bool:
    return all(np.isfinite(values).all() for values in (prediction.probabilities, prediction.class_probabilities)
               if values is not None)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: Python's MemoryError, torch's OutOfMemoryError
    (CUDA's), or the RuntimeError of torch's CPU allocator."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    # The one message read: torch's CPU allocator (and a kernel's failed `new`, as std::bad_alloc)
    # raises a plain RuntimeError with no class of its own (torch 2.13), so only its text says
    # that memory ran out rather than the model failing.
    return type(exc) is RuntimeError and any(words in str(exc) for words in ("can't allocate memory", "std::bad_alloc"))


def _size(array: np.ndarray, in_channels: int) -> str:
    """An input array's images, as a person says them: "a 9000 x 9000 image (81,000,000 pixels)"."""
    height, width = array.shape[-2:]
    pixels = array.size // max(in_channels, 1)
    images = "a" if array.ndim < 4 else f"{array.shape[0]}"
    return f"{images} {width} x {height} image{'s' if array.ndim == 4 else ''} ({pixels:,} pixels)"


def _as_text(path: Path) -> str:
    """A path as the table holds it: Unicode text, which strict JSON readers (a rerun's among them)
    and a UTF-8 CSV can hold. A file name's byte that is not UTF-8 (a surrogate in Python's str)
    is written escaped, as \\xff."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")  # only bytes over 0x7f fail to decode


def _as_path(text: str) -> Path:
    """The path that `_as_text` wrote as `text`."""
    return Path(_ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text))


def _output_paths(out_dir: Path, result: FileResult) -> tuple[Path, ...]:
    if result.prediction.mask is None:
        return ()
    return out_dir / f"{result.name}_mask.png", out_dir / f"{result.name}_mask.npy"


def _write_mask(result: FileResult, transaction: Transaction) -> None:
    from PIL import Image

    if not result.outputs:
        return
    mask = result.prediction.mask
    png, npy = result.outputs
    planes = mask if mask.ndim == 2 else np.concatenate(list(mask), axis=0)
    buffer = io.BytesIO()
    Image.fromarray(planes.astype(np.uint8) * 255).save(buffer, format="PNG")
    with transaction.stage(png, overwrite=True) as fd:  # existence was checked, naming the input
        write_all(fd, buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, mask)
    with transaction.stage(npy, overwrite=True) as fd:
        write_all(fd, buffer.getvalue())


def _table_text(rows: list[dict], names: list[str], table_format: str, predictor: MultiTaskPredictor,
                checkpoint_sha256: str) -> str:
    import json

    if table_format == "json":
        document = {"checkpoint": _as_text(predictor.checkpoint_path), "checkpoint_sha256": checkpoint_sha256,
                    "class_names": names, "predictions": rows}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    classes = predictor.task.classes is not None
    masks = "segmentation" in predictor.task.kind
    writer.writerow(["input", "index", "input_sha256", *(["label", "class_name", *(f"p_{n}" for n in names)] if classes else []),
                     *(["mask_pixels"] if masks else []), "outputs", "checkpoint_sha256"])
    for row in rows:
        writer.writerow([
            row["input"], "" if row["index"] is None else row["index"], row["input_sha256"],
            *([row["label"], row["class_name"], *row["class_probabilities"]] if classes else []),
            *([row["mask_pixels"]] if masks else []), ";".join(row["outputs"]), checkpoint_sha256,
        ])
    return buffer.getvalue()
