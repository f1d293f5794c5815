"""MultiTaskPredictor: rebuild a model from its checkpoint and run it on images.

No architecture argument is needed: the config comes from the file (or, for a legacy .pth,
from the sidecar or the weights), and the architecture says what the model does (its `Task`):
segmentation, classification, or both, with how many input channels and to what multiple an
image's sides are padded. The normalisation used in training and the segmentation threshold
are part of the config, so inference cannot drift from training. On CUDA it runs in fp16 by
default (half weights and activations, channels_last, cudnn.benchmark); on the CPU in fp32.
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
import torch.nn.functional as F

from .checkpoint import load_model_with_config, resolve_device
from .config.registry import Task, get_model_entry
from .errors import OVERWRITE_FIX, CkptfmtError, ConfigError, DeviceError, InputError, Words
from .io.atomic import atomic_write, write_all
from .io.files import read_capped
from .io.images import MAX_PIXELS, read_image
from .io.jsondoc import loads_strict

__all__ = ["FileResult", "MultiTaskPredictor", "Prediction", "normalize", "predict_files"]

# An earlier run's table is read whole, and parsed JSON takes up to ~32 bytes of memory per byte
# of text (a list of two-letter strings; a list of empty objects ~27): at 16 MiB that is at most
# some 800 MB at its peak with torch loaded, measured. A table as predict writes it takes ~500 bytes
# a row (JSON) or ~250 (CSV): some 30,000 images fit.
TABLE_LIMIT = 16 << 20
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Prediction:
    """The result for one image; the parts the model's task does not give are None.

    `probabilities` is the segmentation probability map (H x W, or C x H x W when the model has
    several segmentation channels), `mask` the same thresholded, `class_probabilities` one per
    class, `label` the most probable class and `class_name` its name from the config.
    """

    probabilities: np.ndarray | None = None
    mask: np.ndarray | None = None
    class_probabilities: np.ndarray | None = None
    label: int | None = None
    class_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {}
        if self.class_probabilities is not None:
            document.update(
                label=self.label, class_name=self.class_name,
                class_probabilities=[round(float(p), 6) for p in self.class_probabilities],
            )
        if self.mask is not None:
            document["mask_pixels"] = int(self.mask.sum())
        return document


def normalize(images: torch.Tensor, normalization: dict[str, Any]) -> torch.Tensor:
    """Apply a config's normalisation to a float32 batch N x C x H x W (per image, per channel)."""
    mode = normalization["mode"]
    if mode == "none":
        return images
    if mode == "minmax":
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        span = images.amax(dim=(1, 2, 3), keepdim=True) - low
        return (images - low) / torch.where(span > 0, span, torch.ones_like(span))
    if mode == "zscore":
        mean = images.mean(dim=(2, 3), keepdim=True)
        std = images.std(dim=(2, 3), keepdim=True, unbiased=False)
        return (images - mean) / torch.where(std > 0, std, torch.ones_like(std))
    mean = torch.tensor(normalization["mean"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


class MultiTaskPredictor:
    """Segmentation and classification with a checkpoint whose architecture declares its task
    (the multi-task U-Net does both).

    Args:
        checkpoint_path: a .safetensors written by ckptfmt, or a legacy .pth (config from the
            sidecar beside it, else inferred from the weights with a warning).
        base_filters, depth, **overrides: config fields to override (the seed's arguments);
            checked against the weights before anything is loaded.
        device: "cuda", "cpu", ...; default CUDA when available.
        precision: "auto" (fp16 on CUDA, fp32 on the CPU), "fp16", "bf16" or "fp32".
        batch_size: images per forward pass.

    Example:
        >>> predictor = MultiTaskPredictor("checkpoints/multitask_joint/best_model.safetensors")
        >>> result = predictor.predict(np.zeros((64, 64), np.float32))
        >>> result.mask.shape, result.class_name
        ((64, 64), 'class_0')
    """

    def __init__(
        self,
        checkpoint_path: str | os.PathLike,
        *,
        base_filters: int | None = None,
        depth: int | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        batch_size: int = 16,
        **overrides: Any,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = resolve_device(device, checkpoint_path)
        self.precision = self._resolve_precision(precision, checkpoint_path)
        if type(batch_size) is not int or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, not {batch_size!r}", path=checkpoint_path)
        self.batch_size = batch_size
        self.checkpoint_path = Path(checkpoint_path)
        self.model, self.config, self.checkpoint = load_model_with_config(
            checkpoint_path, device=self.device, base_filters=base_filters, depth=depth, **overrides
        )
        task = get_model_entry(self.config.model_type).describe_task(self.config.params)
        if task is None:
            raise ConfigError(
                f"model_type {self.config.model_type!r} does not say what task it does, so the predictor "
                "cannot run it (register it with task=...); use load_model and call the model yourself",
                path=checkpoint_path,
            )
        if task.spatial_dims != 2:
            raise ConfigError(
                f"the predictor runs models of 2-D images; this {self.config.model_type!r} model takes "
                f"{task.spatial_dims}-D inputs; use load_model and call the model yourself",
                path=checkpoint_path,
            )
        self.task: Task = task
        self.dtype = PRECISIONS[self.precision]
        # Whatever dtype the file holds (a file converted with --dtype fp16, say), the model runs
        # in the precision asked for.
        self.model.to(self.dtype)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    def _resolve_precision(self, precision: str, path) -> str:
        if precision == "auto":
            return "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be auto, {', '.join(PRECISIONS)}, not {precision!r}", path=path)
        # Asking the device is the only reliable answer (bf16 on older GPUs, half on some CPUs).
        dtype = PRECISIONS[precision]
        try:
            F.conv2d(torch.zeros(1, 1, 4, 4, dtype=dtype, device=self.device),
                     torch.zeros(1, 1, 3, 3, dtype=dtype, device=self.device))
        except (RuntimeError, TypeError) as exc:
            raise DeviceError(
                f"precision {precision} is not supported on {self.device} ({str(exc).splitlines()[0]}); "
                "use fp32", path=path,
            ) from None
        return precision

    @property
    def multiple(self) -> int:
        return self.task.input_multiple

    def predict(
        self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor], *,
        threshold: float | None = None,
    ) -> Prediction | list[Prediction]:
        """Predict one image (H x W or C x H x W) or a batch (N x C x H x W, or a list of images
        of any sizes). Any dtype; images are normalised as the config records.

        Returns:
            One Prediction for one image, a list for a batch.
        """
        threshold = self.config.seg_threshold if threshold is None else threshold
        if threshold is not None and not 0 < threshold < 1:
            raise ConfigError(f"threshold must lie between 0 and 1, not {threshold!r}")
        if isinstance(images, (list, tuple)):
            batch = [self._as_chw(image) for image in images]
            single = False
        else:
            tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
            single = tensor.dim() in (2, 3)
            if tensor.dim() == 4:
                batch = [self._as_chw(image) for image in tensor]
            elif single:
                batch = [self._as_chw(tensor)]
            else:
                raise InputError(
                    f"images must be H x W, C x H x W or N x C x H x W, not {tuple(tensor.shape)}"
                )
        results: list[Prediction | None] = [None] * len(batch)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(batch):
            by_shape.setdefault(tuple(image.shape), []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for index, prediction in zip(chunk, self._run(torch.stack([batch[i] for i in chunk]), threshold)):
                    results[index] = prediction
        return results[0] if single else results

    def _as_chw(self, image: Any) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 3 or tensor.shape[0] != self.task.in_channels:
            raise InputError(
                f"the model takes {self.task.in_channels}-channel images (C x H x W or H x W), "
                f"not shape {tuple(tensor.shape)}"
            )
        if tensor.shape[1] == 0 or tensor.shape[2] == 0:
            raise InputError(f"image of shape {tuple(tensor.shape)} is empty")
        return tensor.detach().to("cpu", torch.float32)

    @torch.inference_mode()
    def _run(self, images: torch.Tensor, threshold: float) -> list[Prediction]:
        height, width = images.shape[-2:]
        images = normalize(images, self.config.normalization)
        if self.task.input_size is not None:
            # A model that takes one size (a ViT's 224 x 224): resized to it, masks resized back.
            images = F.interpolate(images, size=tuple(self.task.input_size), mode="bilinear", antialias=True)
        else:
            pad_h, pad_w = -height % self.multiple, -width % self.multiple
            if pad_h or pad_w:
                images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        images = images.to(self.device, self.dtype, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        seg_logits, cls_logits = self.task.split(self.model(images))
        results = [Prediction() for _ in range(len(images))]
        if seg_logits is not None:
            seg_logits = seg_logits.float()
            if self.task.input_size is not None:
                seg_logits = F.interpolate(seg_logits, size=(height, width), mode="bilinear")
            probabilities = torch.sigmoid(seg_logits[..., :height, :width]).cpu().numpy()
            for result, probability in zip(results, probabilities):
                if probability.shape[0] == 1:
                    probability = probability[0]
                result.probabilities, result.mask = probability, probability > threshold
        if cls_logits is not None:
            class_probabilities = torch.softmax(cls_logits.float(), dim=1).cpu().numpy()
            for result, classes in zip(results, class_probabilities):
                result.class_probabilities, result.label = classes, int(classes.argmax())
                result.class_name = self.config.class_name(result.label)
        return results


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
    for path in inputs:
        done = _predict_file(predictor, path, out_dir, previous, stems, threshold=threshold, overwrite=overwrite,
                             max_pixels=max_pixels)
        results += done
        if on_done is not None:
            on_done(done)
    rows = [r.row for r in results if r.row is not None]
    names = [predictor.config.class_name(i) for i in range(predictor.task.classes or 0)]
    text = _table_text(rows, names, table_format, predictor, checkpoint_sha256)
    with atomic_write(table, overwrite=overwrite or table.exists()) as fd:
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
    predictor: MultiTaskPredictor, path: Path, out_dir: Path, previous: dict, stems: set[str], *,
    threshold: float | None, overwrite: bool, max_pixels: int,
) -> list[FileResult]:
    from .io.files import sha256_file

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
            _write_mask(result)
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


def _write_mask(result: FileResult) -> None:
    from PIL import Image

    if not result.outputs:
        return
    mask = result.prediction.mask
    png, npy = result.outputs
    planes = mask if mask.ndim == 2 else np.concatenate(list(mask), axis=0)
    buffer = io.BytesIO()
    Image.fromarray(planes.astype(np.uint8) * 255).save(buffer, format="PNG")
    with atomic_write(png, overwrite=True) as fd:  # existence was checked, naming the input
        write_all(fd, buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, mask)
    with atomic_write(npy, overwrite=True) as fd:
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
