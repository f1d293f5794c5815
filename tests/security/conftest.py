from __future__ import annotations

import pytest
import torch

from ..helpers import small_model


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """The bytes of a valid .pth in each of torch's two formats, for the tests to damage."""
    folder = tmp_path_factory.mktemp("valid")
    model, _ = small_model()
    zip_path, legacy_path = folder / "zip.pth", folder / "legacy.pth"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, zip_path)
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, legacy_path, _use_new_zipfile_serialization=False)
    return {"zip": zip_path.read_bytes(), "legacy": legacy_path.read_bytes()}
