"""Make the demo checkpoints in checkpoints/: a tiny multi-task U-Net trained on phantoms.

The model (base_filters=4, depth=3) is trained in three stages, as the brain-tumour work was:
segmentation warm-up, classification head, joint fine-tuning. Each stage is saved in one of
the legacy layouts users really have, which is what `ckptfmt convert` exists to migrate:

    multitask_seg_warmup/best_model.pth   a bare state_dict
    multitask_cls_head/best_model.pth     {"state_dict": ...} with DataParallel's module. prefix
    multitask_joint/best_model.pth        model_state_dict + optimizer_state_dict + epoch + metrics
    multitask_joint/last_model.pth        the same, in torch's pre-1.6 serialization
    multitask_joint/model_config.json     the original system's sidecar (schema 0)
    scans/scan_0.png ... scan_3.png       held-out phantoms, inputs for `ckptfmt predict`

Seeded and single-threaded, so a rerun on the same machine trains the same weights (the files'
bytes still differ: torch.save stamps each with a fresh serialization id). Takes under a minute
on a laptop CPU.

Usage: python tools/make_demo_checkpoints.py [OUT_DIR]   (default: checkpoints)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ckptfmt.models.multitask_unet import MultiTaskUNet  # noqa: E402

from tools.phantoms import make_phantoms  # noqa: E402

ARCHITECTURE = {"base_filters": 4, "depth": 3, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2}
SEED = 20201


def dice(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    intersection = (probabilities * masks).sum()
    return (2 * intersection + 1) / (probabilities.sum() + masks.sum() + 1)


def train_stage(model, optimizer, images, masks, labels, *, steps, seg_weight, cls_weight, generator):
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(images), (32,), generator=generator)
        seg_logits, cls_logits = model(images[batch])
        loss = seg_weight * (
            F.binary_cross_entropy_with_logits(seg_logits, masks[batch])
            + 1 - dice(torch.sigmoid(seg_logits), masks[batch])
        ) + cls_weight * F.cross_entropy(cls_logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def evaluate(model, images, masks, labels) -> dict[str, float]:
    seg_logits, cls_logits = model(images)
    predicted = (torch.sigmoid(seg_logits) > 0.5).float()
    lesion = labels == 1
    return {
        "dice": round(float(dice(predicted[lesion], masks[lesion])), 4),
        "accuracy": round(float((cls_logits.argmax(1) == labels).float().mean()), 4),
    }


def main(out: Path) -> None:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(SEED)
    train = [torch.from_numpy(a) for a in make_phantoms(512, seed=SEED)]
    held_out = [torch.from_numpy(a) for a in make_phantoms(128, seed=SEED + 1)]

    model = MultiTaskUNet(**ARCHITECTURE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_stage(model, optimizer, *train, steps=150, seg_weight=1.0, cls_weight=0.0, generator=generator)
    stages = {"multitask_seg_warmup": {k: v.clone() for k, v in model.state_dict().items()}}
    print("seg warm-up", evaluate(model, *held_out))
    train_stage(model, optimizer, *train, steps=60, seg_weight=0.2, cls_weight=1.0, generator=generator)
    stages["multitask_cls_head"] = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    print("cls head   ", evaluate(model, *held_out))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_stage(model, optimizer, *train, steps=120, seg_weight=1.0, cls_weight=1.0, generator=generator)
    metrics = evaluate(model, *held_out)
    print("joint      ", metrics)

    for folder in ("multitask_seg_warmup", "multitask_cls_head", "multitask_joint"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    torch.save(stages["multitask_seg_warmup"], out / "multitask_seg_warmup/best_model.pth")
    torch.save({"state_dict": stages["multitask_cls_head"], "epoch": 2}, out / "multitask_cls_head/best_model.pth")
    joint = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": 3,
        "metrics": metrics,
    }
    torch.save(joint, out / "multitask_joint/best_model.pth")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3},
               out / "multitask_joint/last_model.pth", _use_new_zipfile_serialization=False)
    # What the original system's generator wrote: no schema_version, no weights binding.
    seed_sidecar = {
        **ARCHITECTURE,
        "model_type": "multitask",
        "version": "1.0",
        "description": "Multi-task model - Joint fine-tuning (demo)",
        "trained_on": "Synthetic MRI-like phantoms (tools/phantoms.py)",
        "training_config": "tools/make_demo_checkpoints.py",
    }
    (out / "multitask_joint/model_config.json").write_text(json.dumps(seed_sidecar, indent=2) + "\n")
    write_scans(out / "scans")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def write_scans(folder: Path) -> None:
    """Four held-out phantoms as 8-bit PNGs, two with lesions: what `ckptfmt predict` reads."""
    from PIL import Image

    images, _, labels = make_phantoms(16, seed=SEED + 2)
    folder.mkdir(parents=True, exist_ok=True)
    picked = [*np.flatnonzero(labels == 1)[:2], *np.flatnonzero(labels == 0)[:2]]
    for index, which in enumerate(sorted(picked)):
        Image.fromarray((images[which, 0] * 255).round().astype(np.uint8)).save(folder / f"scan_{index}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="checkpoints", type=Path,
                        help="folder to write the demo checkpoints into (default: checkpoints)")
    parser.add_argument("--scans-only", action="store_true", help="only (re)write OUT/scans, without training")
    arguments = parser.parse_args()
    if arguments.scans_only:
        write_scans(arguments.out / "scans")
    else:
        main(arguments.out)
