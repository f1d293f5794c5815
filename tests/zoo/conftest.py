from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ckptfmt.io.files import cache_folder

# A folder of signature indexes (cache_folder()/signatures/*.json) to start the session with, so that a
# developer's rerun does not rebuild timm's (minutes); CI leaves it unset and builds each once.
SEED_ENV = "CKPTFMT_TEST_SIGNATURES"


@pytest.fixture(scope="session", autouse=True)
def signature_indexes():
    source = os.environ.get(SEED_ENV)
    if source:
        target = cache_folder() / "signatures"
        target.mkdir(parents=True, exist_ok=True)
        for index in Path(source).expanduser().glob("*.json"):
            shutil.copyfile(index, target / index.name)
