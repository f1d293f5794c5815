"""Synthetic MRI-like phantoms: a textured "brain" with bright "lesions".

Images are float32 in [0, 1], shape (1, size, size); the mask marks lesion pixels and the
label is 1 when the image has a lesion. Seeded, so the same seed gives the same phantoms.

Usage: python tools/phantoms.py OUT_DIR [--count N] [--seed S]   (images as .npy, for predict)
"""

from __future__ import annotations

import numpy as np


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.standard_normal((size // scale + 2, size // scale + 2))
    fine = np.kron(coarse, np.ones((scale, scale)))[:size, :size]
    # A box blur softens the blocks into texture.
    for axis in (0, 1):
        fine = (np.roll(fine, 1, axis) + fine + np.roll(fine, -1, axis)) / 3
    return fine


def make_phantoms(count: int, *, size: int = 64, seed: int = 0, lesion_rate: float = 0.5):
    """`count` phantoms as (images [N,1,S,S] float32, masks [N,1,S,S] float32, labels [N] int64)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((count, 1, size, size), np.float32)
    masks = np.zeros((count, 1, size, size), np.float32)
    labels = np.zeros(count, np.int64)
    for i in range(count):
        cy, cx = size / 2 + rng.uniform(-3, 3, 2)
        ry, rx = size * rng.uniform(0.36, 0.44, 2)
        brain = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image = brain * (0.45 + 0.08 * _smooth_noise(rng, size, 4))
        mask = np.zeros((size, size), bool)
        if rng.random() < lesion_rate:
            labels[i] = 1
            for _ in range(rng.integers(1, 4)):
                radius = rng.uniform(3, 7, 2)
                angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
                ly, lx = cy + distance * ry * np.sin(angle), cx + distance * rx * np.cos(angle)
                mask |= ((yy - ly) / radius[0]) ** 2 + ((xx - lx) / radius[1]) ** 2 <= 1
            mask &= brain
            image = np.where(mask, image + rng.uniform(0.25, 0.4), image)
        image = image + 0.03 * rng.standard_normal((size, size))
        images[i, 0] = np.clip(image, 0, 1)
        masks[i, 0] = mask
    return images, masks, labels


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Write phantoms as .npy files, inputs for `ckptfmt predict`.")
    parser.add_argument("out", type=Path, help="folder to write phantom_0.npy, phantom_1.npy, ... into")
    parser.add_argument("--count", type=int, default=8, help="how many (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="the seed (default 0)")
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(make_phantoms(arguments.count, seed=arguments.seed)[0]):
        np.save(arguments.out / f"phantom_{index}.npy", image[0])
