from __future__ import annotations

import pytest

import ckptfmt
from tools.phantoms import make_phantoms

from .helpers import DEMO


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The shipped joint checkpoint, converted from its .pth as a user would."""
    folder = tmp_path_factory.mktemp("demo")
    return ckptfmt.convert(DEMO / "multitask_joint/best_model.pth", output=folder / "best_model.safetensors").output


@pytest.fixture(scope="session")
def held_out():
    """Phantoms the demo model never saw (it trained on seed 20201)."""
    return make_phantoms(96, seed=777)
