"""What ckptfmt keeps between processes never answers for code that changed, and what it
stopped keeping is worked out as fast, and as exactly, without."""

from __future__ import annotations

import json
import sys
import zipfile
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

from ckptfmt.config import entry_points

from .helpers import run

NET = """
import torch
from plugarch import layers


class PlugNet(torch.nn.Module):
    def __init__(self, features: int = 2):
        super().__init__()
        self.fc = torch.nn.Linear(features, layers.WIDTH)
"""

VERIFY = """
import sys
from ckptfmt.verifier import verify
report = verify(sys.argv[1])
print(report.ok, 'torch' in sys.modules, *report.failures, sep='\\n')
"""


def _dist(folder: Path, name: str, entry_points: str | None) -> None:
    dist = folder / name
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.split('-')[0]}\nVersion: 1.0\n")
    if entry_points is not None:
        (dist / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def plugin(tmp_path) -> tuple[Path, dict[str, str]]:
    """A plugin package installed in its own folder: its entry point names `plugarch.net`, whose
    layer width lives in another module, `plugarch.layers`."""
    site = tmp_path / "site"
    (site / "plugarch").mkdir(parents=True)
    (site / "plugarch/__init__.py").write_text("")
    (site / "plugarch/layers.py").write_text("WIDTH = 3\n")
    (site / "plugarch/net.py").write_text(NET)
    _dist(site, "plugarch-1.0.dist-info", "[ckptfmt.models]\nplugnet = plugarch.net:PlugNet\n")
    env = {"PYTHONPATH": str(site), "CKPTFMT_CACHE_DIR": str(tmp_path / "cache")}
    saved = run("-c", "import sys, ckptfmt; ckptfmt.save(ckptfmt.create_model('plugnet'), sys.argv[1])",
                str(tmp_path / "plug.safetensors"), env=env)
    assert saved.returncode == 0, saved.stderr
    return tmp_path / "plug.safetensors", env


@pytest.mark.subprocess  # Its own processes: what one remembers, the next one reads.
def test_a_plugin_edited_in_any_of_its_modules_is_asked_again_by_verify(plugin):
    """Regression: after a plugin's module (not the one its entry point names) changed, verify
    still said [OK] from what it remembered, while load_model raised ShapeMismatchError."""
    path, env = plugin
    site = Path(env["PYTHONPATH"])
    for _ in range(2):  # a module written in the second a process starts is not trusted by it
        assert run("-c", VERIFY, str(path), env=env).stdout.splitlines()[0] == "True"
    remembered = run("-c", VERIFY, str(path), env=env)
    assert remembered.stdout.splitlines() == ["True", "False"], remembered.stderr  # no torch: remembered

    (site / "plugarch/layers.py").write_text("WIDTH = 4\n")  # the same size: only its times tell
    verified = run("-c", VERIFY, str(path), env=env)
    assert verified.stdout.splitlines()[:2] == ["False", "True"], verified.stderr
    assert verified.stdout.splitlines()[2].startswith(f"{path}: config does not match the tensors: ")
    loaded = run("-c", "import sys, ckptfmt\ntry:\n    ckptfmt.load_model(sys.argv[1])\n"
                 "except ckptfmt.ShapeMismatchError:\n    print('ShapeMismatchError')", str(path), env=env)
    assert loaded.stdout.strip() == "ShapeMismatchError", loaded.stderr


@pytest.mark.subprocess  # Its own processes: the code one holds in memory, the file the next one reads.
def test_nothing_is_remembered_from_code_that_changed_while_the_process_ran(plugin):
    """A module edited after it was imported: the process's answer comes from the code in its
    memory, not from the file, so it is not kept for the processes that will read the file."""
    path, env = plugin
    site = Path(env["PYTHONPATH"])
    edited = (
        "import sys, pathlib, plugarch.net\n"
        "pathlib.Path(sys.argv[2], 'plugarch/layers.py').write_text('WIDTH = 4\\n')\n" + VERIFY
    )
    result = run("-c", edited, str(path), str(site), env=env)
    assert result.stdout.splitlines() == ["True", "True"], result.stderr  # the code in memory still fits
    assert not list((Path(env["CKPTFMT_CACHE_DIR"]) / "facts").glob("*.json"))
    assert run("-c", VERIFY, str(path), env=env).stdout.splitlines()[:2] == ["False", "True"]


def test_the_installed_architectures_are_listed_as_importlib_metadata_lists_them(tmp_path, monkeypatch):
    """ckptfmt reads the entry points without importing importlib.metadata: the same ones, the
    first distribution of a name on the path winning, whatever their folders' names and files;
    a zip file on the path is left to importlib.metadata."""
    first, second = tmp_path / "first", tmp_path / "second"
    group = "[ckptfmt.models]"
    _dist(first, "Plug.Arch-1.0.dist-info", f"# made by hand\n\n{group}\n  alpha =  plug_arch:Alpha  \n"
          "[console_scripts]\nalpha-cli = plug_arch:main\n")
    _dist(first, "other-2.0.dist-info", None)
    _dist(first, "legacy.egg-info", f"{group}\nbeta=legacy:Beta [extra]\n")
    (first / "flat.egg-info").write_text("Metadata-Version: 1.0\nName: flat\n")  # a distutils file, no folder
    _dist(second, "plug_arch-2.0.dist-info", f"{group}\ngamma = shadowed:Gamma\n")  # shadowed by Plug.Arch
    _dist(second, "delta-1.0.dist-info", f"{group}\ndelta = d:D\n[another.group]\nalpha = x:y\n")
    monkeypatch.setattr(sys, "path", [str(first), str(tmp_path / "gone"), str(second)])
    assert [finder for finder in sys.meta_path if hasattr(finder, "find_distributions")] == [PathFinder]

    listed = entry_points.installed_entry_points.__wrapped__()
    assert listed == entry_points._listed_by_importlib()
    assert sorted(listed) == [("alpha", "plug_arch:Alpha"), ("beta", "legacy:Beta [extra]"), ("delta", "d:D")]

    with zipfile.ZipFile(tmp_path / "zipped.zip", "w") as archive:
        archive.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\nVersion: 1.0\n")
        archive.writestr("zipped-1.0.dist-info/entry_points.txt", f"{group}\nzeta = zipped:Zeta\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path / "zipped.zip")])
    assert ("zeta", "zipped:Zeta") in entry_points.installed_entry_points.__wrapped__()


@pytest.mark.subprocess  # Its own process: only a fresh one shows what learning the facts imports.
def test_facts_name_every_module_they_were_learned_with(tmp_path, cache_folder):
    """What verify remembers holds, besides the tensors, every module loaded where it was
    learned: the architecture's, torch's, ckptfmt's; none of the standard library's."""
    from .helpers import save_small

    path, _, _ = save_small(tmp_path, base_filters=3, depth=2)  # a config no other test verifies
    before = set((cache_folder / "facts").glob("*.json"))
    assert run("-c", VERIFY, str(path)).stdout.splitlines()[0] == "True"
    (learned,) = set((cache_folder / "facts").glob("*.json")) - before
    modules = [file for file, *_ in json.loads(learned.read_text())["modules"]]
    assert any(file.endswith("multitask_unet.py") for file in modules)
    assert any(file.endswith("torch/__init__.py") for file in modules)
    assert any(file.endswith("ckptfmt/verifier.py") for file in modules)
    assert not any(file.endswith(("/json/__init__.py", "/os.py")) for file in modules)
