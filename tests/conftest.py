from __future__ import annotations

import os

import pytest

import ckptfmt
from tools.phantoms import make_phantoms

from .helpers import DEMO


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory):
    """The user's cache folder is never touched: the session, and every process it starts,
    caches in a folder of its own that starts empty."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("CKPTFMT_CACHE_DIR")
    os.environ["CKPTFMT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["CKPTFMT_CACHE_DIR"]
    else:
        os.environ["CKPTFMT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The shipped joint checkpoint, converted from its .pth as a user would."""
    folder = tmp_path_factory.mktemp("demo")
    return ckptfmt.convert(DEMO / "multitask_joint/best_model.pth", output=folder / "best_model.safetensors").output


@pytest.fixture(scope="session")
def held_out():
    """Phantoms the demo model never saw (it trained on seed 20201)."""
    return make_phantoms(96, seed=777)
