"""Architectures ckptfmt has never seen, installed for real: a third-party package registered
through its entry point, used in fresh processes with and without it; and ckptfmt itself
installed from its wheel into a project that has its own `models` package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .helpers import ROOT

# Every test: ckptfmt in fresh processes, with the plugin installed and without it.
pytestmark = pytest.mark.subprocess

PLUGIN = ROOT / "tests/plugin"
SITE_PACKAGES = sysconfig.get_paths()["purelib"]


def _install_wheel(project: Path, target: Path) -> Path:
    """Build `project` into a wheel and install that (not the source) into `target`."""
    wheels = target.parent / f"{target.name}-wheel"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--quiet", "-w", wheels, project], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--quiet", "--target", target, wheel], check=True, capture_output=True, timeout=600)
    return target


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    return _install_wheel(PLUGIN, tmp_path_factory.mktemp("plugin") / "site")


def python(code: str, *args, site: Path | None = None, cwd: Path | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh Python process; `site` (an installed package's folder) is on its path or not."""
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def cli(*args, site: Path | None = None, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return python("import sys; from ckptfmt.cli import main; main(sys.argv[1:], prog_name='ckptfmt')",
                  *args, site=site, cwd=cwd, env=env)


SAVE = """
import sys, torch, ckptfmt
from safetensors.torch import save_file
from ckptfmt_testarch import GatedMLP
torch.manual_seed(0)
model = GatedMLP(in_features=5, hidden=(7, 6), classes=4, dropout=0.25, activation="tanh", gated=True,
                 head={"temperature": 2.5}).eval()
ckptfmt.save(model, sys.argv[1], description="a plugin's model", class_names=["a", "b", "c", "d"])
torch.save(model.state_dict(), sys.argv[2])
x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    save_file({"x": x, "y": model(x)}, sys.argv[3])
"""

LOAD = """
import sys, torch, ckptfmt
from safetensors.torch import load_file, save_file
assert "ckptfmt_testarch" not in sys.modules
model = ckptfmt.load_model(sys.argv[1])
assert "ckptfmt_testarch" in sys.modules  # found through its entry point, not imported by a name from the file
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"y": model(x)}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def saved(plugin_site, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    paths = folder / "gated.safetensors", folder / "legacy/gated.pth", folder / "expected.safetensors"
    paths[1].parent.mkdir()
    result = python(SAVE, *paths, site=plugin_site)
    assert result.returncode == 0, result.stderr
    return paths


def test_saved_with_no_config_the_file_records_every_argument(saved):
    from ckptfmt import ModelConfig

    config = ModelConfig.from_checkpoint(saved[0])  # read here, where the plugin is not installed
    assert config.model_type == "gated_mlp"
    assert config.params == {
        "in_features": 5, "hidden": [7, 6], "classes": 4, "dropout": 0.25, "activation": "tanh", "gated": True,
        "head": {"temperature": 2.5},
    }
    assert (config.description, config.class_names) == ("a plugin's model", ("a", "b", "c", "d"))


def test_a_fresh_process_rebuilds_it_from_the_file_alone(plugin_site, saved, tmp_path):
    path, _, expected = saved
    result = python(LOAD, path, expected, tmp_path / "y.safetensors", site=plugin_site)
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], load_file(expected)["y"])


def test_its_legacy_pth_converts_through_its_infer_config(plugin_site, saved, tmp_path):
    _, legacy, expected = saved
    result = cli("convert", legacy, "-o", tmp_path / "converted.safetensors", site=plugin_site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"[OK]   {legacy} -> {tmp_path / 'converted.safetensors'}  gated_mlp(activation=\"gelu\", classes=4, "
        "dropout=0.0, gated=true, head=null, hidden=[7, 6], in_features=5)"
    )
    # The buggy plugin failed for this file, said so, and the batch went on.
    assert result.stderr.splitlines() == [
        f"warning: {legacy}: model_type 'always_fails': infer_config raised TypeError: this plugin's infer_config has a bug"
    ]
    # The shape-changing arguments came back; the others are the defaults, as they must be.
    from ckptfmt import ModelConfig

    config = ModelConfig.from_checkpoint(tmp_path / "converted.safetensors")
    assert config.params["hidden"] == [7, 6] and config.params["activation"] == "gelu"
    loaded = python(
        "import sys, torch, ckptfmt\n"
        "m = ckptfmt.load_model(sys.argv[1])\n"
        "print(m.layers[0].weight.shape[1], m.head.out_features)\n",
        tmp_path / "converted.safetensors", site=plugin_site,
    )
    assert loaded.stdout.split() == ["5", "4"], loaded.stderr


def test_inspect_verify_and_diff_with_the_plugin(plugin_site, saved):
    path = saved[0]
    shown = cli("inspect", path, site=plugin_site)
    assert shown.returncode == 0, shown.stderr
    assert '  model_type        "gated_mlp"' in shown.stdout.splitlines()
    checked = cli("verify", path, site=plugin_site)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"[OK]   {path}: header, config, shapes, sidecar, digest (")
    same = cli("diff", path, path, site=plugin_site)
    assert same.returncode == 0 and same.stdout.strip().endswith("the checkpoints are identical")


def test_without_the_plugin_the_file_is_still_readable(saved):
    path = saved[0]
    shown = cli("inspect", path)
    assert shown.returncode == 0, shown.stderr
    assert (
        '  model_type        "gated_mlp"  (not registered here: import or install what registers it to load this file)'
        in shown.stdout.splitlines()
    )
    document = json.loads(cli("inspect", path, "--json").stdout)
    assert document["config"]["model_type"] == "gated_mlp" and document["registered"] is False
    checked = cli("verify", path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(
        f"[OK]   {path}: header, config, shapes skipped: model_type 'gated_mlp' is not registered here; "
        "import or install what registers it to check the tensors against it, sidecar, digest ("
    )
    same = cli("diff", path, path)
    assert same.returncode == 0, same.stderr


def test_without_the_plugin_load_model_says_what_to_do(saved):
    result = python("import sys, ckptfmt; ckptfmt.load_model(sys.argv[1])", saved[0])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ckptfmt.errors.UnknownModelTypeError: {saved[0]}: model_type 'gated_mlp' is not registered here (known: ")
    assert last.endswith(
        "Import the module that registers it (its @register_model('gated_mlp')), or install the package "
        "that provides it (entry-point group 'ckptfmt.models')"
    )
    cli_result = cli("predict", saved[0], saved[2], "--out", saved[0].parent / "out")
    assert cli_result.returncode == 1 and "Traceback" not in cli_result.stderr
    assert cli_result.stderr.strip().startswith(f"Error: {saved[0]}: model_type 'gated_mlp' is not registered here")


def test_the_builtin_unet_loads_in_a_project_with_its_own_models_package(tmp_path):
    """Regression: the U-Net was installed as a top-level `models` package, which a user's own
    `models/` (the original system had src/models/) shadowed: ModuleNotFoundError."""
    from ckptfmt.models.multitask_unet import MultiTaskUNet

    import ckptfmt

    site = _install_wheel(ROOT, tmp_path / "site")
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models/__init__.py").write_text("")
    (project / "models/unet.py").write_text("NAME = 'the user project own U-Net'\n")
    torch.manual_seed(0)
    model = MultiTaskUNet(base_filters=4, depth=2).eval()
    path = ckptfmt.save(model, tmp_path / "unet.safetensors")
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        save_file({"x": x, "seg": model(x)[0]}, tmp_path / "expected.safetensors")
    # -S: no .pth files, so this checkout's editable install plays no part; torch comes from
    # site-packages, ckptfmt only from the wheel's files.
    code = (
        "import sys, torch\n"
        "import models.unet\n"
        "import ckptfmt\n"
        f"assert ckptfmt.__file__.startswith({str(site)!r}), ckptfmt.__file__\n"
        "from safetensors.torch import load_file\n"
        "expected = load_file(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    seg, _ = ckptfmt.load_model(sys.argv[1])(expected['x'])\n"
        "print(models.unet.NAME, torch.equal(seg, expected['seg']))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{SITE_PACKAGES}"}
    result = subprocess.run([sys.executable, "-S", "-c", code, str(path), str(tmp_path / "expected.safetensors")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "the user project own U-Net True"


# Installed plugins that exit, raise, hang or print when imported (tests/plugin_broken), and how
# long a command waits for one that hangs.
BROKEN_PLUGINS = [
    "warning: model_type 'exits_at_import': the package that provides it failed to import "
    "(ckptfmt_brokenarch.exits:Net: SystemExit: 0)",
    "warning: model_type 'hangs_at_import': the package that provides it did not finish importing "
    "(ckptfmt_brokenarch.hangs:Net: still importing after 5 s; set CKPTFMT_PLUGIN_TIMEOUT=SECONDS to wait longer)",
    "warning: model_type 'prints_at_import': the package that provides it printed while being imported "
    "(ckptfmt_brokenarch.prints:Net); set aside: 'loading prints_at_import'",
    "warning: model_type 'raises_at_import': the package that provides it failed to import "
    "(ckptfmt_brokenarch.raises:Net: RuntimeError: this plugin needs a GPU)",
]
WAIT = {"CKPTFMT_PLUGIN_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    return _install_wheel(ROOT / "tests/plugin_broken", tmp_path_factory.mktemp("broken") / "site")


@pytest.fixture
def bare_pths(tmp_path) -> Path:
    for name in ("a", "b"):
        torch.save({"w": torch.ones(3, 3)}, tmp_path / f"{name}.pth")
    return tmp_path


def test_plugins_that_exit_raise_hang_or_print_at_import_are_said_once_and_convert_goes_on(broken_site, bare_pths):
    """Regression: a plugin that called sys.exit() at import ended `convert bare.pth` with exit
    code 0, no output and nothing written; one that printed wrote into the report."""
    result = cli("convert", ".", site=broken_site, cwd=bare_pths, env=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[OK]   a.pth -> a.safetensors  (weights only, no config)",
        "       weights: (the whole file: a bare state dict); config: none (weights only)",
        "[OK]   b.pth -> b.safetensors  (weights only, no config)",
        "       weights: (the whole file: a bare state dict); config: none (weights only)",
        "2 converted, 0 skipped, 0 failed",
    ]
    # Each plugin that failed to import once, by name, saying what it did; not once per file.
    warnings = [line for line in result.stderr.splitlines() if "_at_import'" in line and "converted as" not in line]
    assert warnings == BROKEN_PLUGINS
    # One whose infer_config exits fails on these weights alone, said for each file.
    assert [line for line in result.stderr.splitlines() if "infer_config raised" in line
            and "converted as" not in line] == [
        f"warning: {name}.pth: model_type 'exits_in_infer_config': infer_config raised SystemExit: 3"
        for name in ("a", "b")]
    assert (bare_pths / "a.safetensors").is_file() and (bare_pths / "b.safetensors").is_file()


def test_inspect_json_stays_json_when_a_plugin_prints_at_import(broken_site, bare_pths):
    """Regression: a plugin that exited at import ended `inspect bare.pth` with exit code 0
    and no output; one that printed corrupted the JSON document."""
    result = cli("inspect", "a.pth", "--json", site=broken_site, cwd=bare_pths, env=WAIT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["file"] == "a.pth"
    assert result.stderr.splitlines() == BROKEN_PLUGINS


def test_a_command_whose_only_architecture_failed_to_import_fails_naming_it(broken_site, bare_pths):
    made = python(
        "import sys, torch, ckptfmt\n"
        "@ckptfmt.register_model('exits_at_import')\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self, width: int = 3):\n"
        "        super().__init__(2, width)\n"
        "ckptfmt.save(Net(), sys.argv[1])\n", bare_pths / "exits.safetensors")  # made where it is not installed
    assert made.returncode == 0, made.stderr
    failure = ("model_type 'exits_at_import': the package that provides it failed to import "
               "(ckptfmt_brokenarch.exits:Net: SystemExit: 0)")
    converted = cli("convert", "a.pth", "--model-type", "exits_at_import", site=broken_site, cwd=bare_pths)
    assert converted.returncode == 1
    assert converted.stderr.splitlines() == [f"warning: {failure}", f"[FAIL] a.pth: {failure}"]
    assert not (bare_pths / "a.safetensors").exists()
    verified = cli("verify", "exits.safetensors", site=broken_site, cwd=bare_pths)
    assert verified.returncode == 1
    assert verified.stderr.splitlines() == [
        f"warning: {failure}", f"[FAIL] exits.safetensors: invalid embedded config: {failure}"]
    loaded = python("import ckptfmt\n"
                    "try:\n"
                    "    ckptfmt.load_model('exits.safetensors')\n"
                    "except ckptfmt.PluginError as exc:\n"
                    "    print(exc)\n", site=broken_site, cwd=bare_pths)
    assert loaded.stdout.strip() == f"exits.safetensors: {failure}", loaded.stderr
