"""Input images for the predictor, read safely.

`.npy` arrays are never unpickled, and image files are decoded by Pillow. Both declare their
size before their data: a 192-byte `.npy` can declare a 37 GiB array, a small PNG 144
megapixels. The declared size is checked against a limit before anything is allocated or
decoded; the limit (MAX_PIXELS, sized for what the model then needs) can be changed
(`max_pixels=`, `ckptfmt predict --max-pixels`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CkptfmtWarning, InputError, Words
from .files import FolderWalk, open_regular, walk_files

if TYPE_CHECKING:
    import numpy as np

__all__ = ["IMAGE_SUFFIXES", "INPUT_SUFFIXES", "MAX_PIXELS", "find_inputs", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
INPUT_SUFFIXES = (".npy", *IMAGE_SUFFIXES)
# What the predictor can then run in memory, not only what can be decoded: on the CPU the demo
# U-Net (base_filters=4, depth=3) takes about 140 bytes per pixel in its forward pass, on top of
# some 250 MB for Python, torch and the model. Peak RSS of `ckptfmt predict` on one image,
# measured: 4 MP 1.03 GB, 8 MP 1.48 GB, 10 MP 1.72 GB, 12 MP 1.96 GB, 16 MP 2.53 GB. 8 megapixels
# (2,828 x 2,828) keeps it under 1.5 GB; Pillow's default, 89.5 megapixels, would take some 13 GB.
# A wider model needs more per pixel: an input it runs out of memory on fails alone, and the
# limit is the user's to lower.
MAX_PIXELS = 8_000_000


def read_image(path: str | os.PathLike, *, in_channels: int = 1, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an input file as float32: H x W or C x H x W, or N x C x H x W for an array of several.

    `.npy` arrays are taken as they are. Image files are scaled to [0, 1] by their bit depth and
    converted to grayscale or RGB to match `in_channels`.

    Raises:
        InputError: not a regular file, unreadable, not numbers, or declaring more than
            `max_pixels` pixels (an array's values divided by `in_channels`), before decoding.

    Example:
        >>> read_image("scans/a.png").shape
        (256, 256)
    """
    path = Path(path)
    fd = open_regular(path, error=InputError)
    with open(fd, "rb") as f:
        if path.suffix.lower() == ".npy":
            return _read_npy(f, path, in_channels=in_channels, max_pixels=max_pixels)
        return _read_picture(f, path, in_channels=in_channels, max_pixels=max_pixels)


def _too_big(declared: str, pixels: int, max_pixels: int, path: Path) -> InputError:
    refused = ("refused before decoding (a decompression bomb, or more than the model has memory for: raise the "
               "limit with {} where more is free)")
    return InputError(
        f"declares {declared}, {pixels:,} pixels, over the limit of {max_pixels:,}", path=path,
        fix=Words(refused.format("max_pixels="), refused.format("--max-pixels")),
    )


def _read_npy(f, path: Path, *, in_channels: int, max_pixels: int) -> np.ndarray:
    import numpy as np  # here: the CLI imports this module for its limit, and must start fast

    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"is not a readable .npy array ({str(exc).split('. ')[0]})", path=path) from None
    if dtype.kind not in "biuf":
        raise InputError(f"holds {dtype} data; expected numbers (and nothing that needs unpickling)", path=path)
    pixels = math.prod(shape) // max(in_channels, 1)
    if pixels > max_pixels:
        raise _too_big(f"an array of shape {tuple(shape)}", pixels, max_pixels, path)
    f.seek(0)
    try:
        array = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"is not a readable .npy array ({str(exc).split('. ')[0]})", path=path) from None
    return array.astype(np.float32)


def _read_picture(f, path: Path, *, in_channels: int, max_pixels: int) -> np.ndarray:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Our limit decides; Pillow's own check (a warning, or an error at twice its
            # default) must not overrule a limit the user raised.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(f)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise _too_big(f"a {width} x {height} image", width * height, max_pixels, path)
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32) / (65535.0 if image.mode.startswith("I;16") else 1.0)
            else:
                mode = "RGB" if in_channels == 3 else "L"
                if mode == "L" and image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
                    warnings.warn(CkptfmtWarning(
                        f"is a colour image ({image.mode}); the model takes one channel, so it is read as its luminance",
                        path=path), stacklevel=3)
                array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    except InputError:
        raise
    except UnidentifiedImageError:
        # Pillow's message names its file object (`<_io.BufferedReader name=3>`), not the file.
        raise InputError("cannot be read as an image: it is damaged, truncated or not an image format Pillow "
                         "reads", path=path) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot be read as an image: {exc}", path=path) from None
    return array.transpose(2, 0, 1) if array.ndim == 3 else array


def find_inputs(paths: Sequence[str | os.PathLike]) -> FolderWalk:
    """Files as given; folders as their `.npy` and image files, recursively, sorted, with what
    under them could not be read (`FolderWalk.unreadable`)."""
    found, unreadable = [], []
    for path in map(Path, paths):
        if path.is_dir():
            walk = walk_files(path, INPUT_SUFFIXES + tuple(s.upper() for s in INPUT_SUFFIXES))
            found += walk.files
            unreadable += walk.unreadable
        else:
            found.append(path)
    return FolderWalk(found, unreadable)
