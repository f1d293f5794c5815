"""Predictor: rebuild a model from its checkpoint and run it on images.

No architecture argument is needed: the config comes from the file (or, for a legacy .pth,
from the sidecar or the weights), and the architecture says what the model does (its `Task`):
segmentation, classification, or both, with how many input channels and to what multiple an
image's sides are padded. The normalisation used in training and the segmentation threshold
are part of the config, so inference cannot drift from training. On CUDA it runs in fp16 by
default (half weights and activations, channels_last, cudnn.benchmark); on the CPU in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_model_with_config, resolve_device
from ..config.registry import Task, get_model_entry
from ..errors import ConfigError, DeviceError, InputError

__all__ = ["Predictor", "Prediction", "normalize"]

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


class Predictor:
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
        >>> predictor = Predictor("checkpoints/multitask_joint/best_model.safetensors")
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


# The original system's name for it, kept: its examples (`MultiTaskPredictor(checkpoint_path)`)
# run as they were written.
MultiTaskPredictor = Predictor
