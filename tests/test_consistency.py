"""Every command answers from the one resolution of a checkpoint: for each source layout, each
entry point sees the same config (model_type and arguments), from the same origin, with the same
verdict. A layout a command cannot take is refused by every command alike."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from safetensors.torch import save_file

import ckptfmt
from ckptfmt.resolve import read_source, resolve

from .helpers import small_model

ARCHITECTURE = {"base_filters": 4, "depth": 2, "in_channels": 1, "seg_out_channels": 1, "cls_num_classes": 2}


def _lightning_holder(folder: Path) -> Path:
    """A LightningModule that holds the U-Net as `self.seg_model` beside a loss with class
    weights, its hyper-parameters exactly the U-Net's arguments, trained one step by a real
    Trainer."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    class LitHolder(pl.LightningModule):
        def __init__(self, base_filters=4, depth=2, in_channels=1, seg_out_channels=1, cls_num_classes=2):
            super().__init__()
            self.save_hyperparameters()
            self.seg_model = MultiTaskUNet(**self.hparams)
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))

        def training_step(self, batch, _):
            x, y = batch
            seg, cls = self.seg_model(x)
            return seg.square().mean() + self.criterion(cls, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 1, 16, 16), torch.randint(0, 2, (4,))), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and logging
        pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)], default_root_dir=folder,
                   ).fit(LitHolder(**ARCHITECTURE), data)
    return folder / "last.ckpt"


def _dcp_folder(folder: Path, state_dict: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: one process writes it all
        dcp.save({"model": state_dict}, checkpoint_id=folder / "dcp", no_dist=True)
    return folder / "dcp"


def _seed_sidecar(folder: Path, state_dict: dict) -> Path:
    torch.save(state_dict, folder / "best_model.pth")
    (folder / "model_config.json").write_text(json.dumps({**ARCHITECTURE, "model_type": "multitask", "version": "1.0"}))
    return folder / "best_model.pth"


# Each layout: how it is made from the U-Net's state dict, and where its config comes from.
LAYOUTS = {
    "ckptfmt file": (lambda f, m, sd: ckptfmt.save(m, f / "m.safetensors"), "embedded"),
    "ckptfmt shards": (lambda f, m, sd: ckptfmt.save(m, f / "m.safetensors", max_shard_size=20_000), "embedded"),
    "bare state dict": (lambda f, m, sd: (torch.save(sd, f / "m.pth"), f / "m.pth")[1], "inferred"),
    "seed sidecar": (lambda f, m, sd: _seed_sidecar(f, sd), "sidecar"),
    "training dict": (lambda f, m, sd: (torch.save({"model_state_dict": sd, "epoch": 3}, f / "m.pth"), f / "m.pth")[1],
                      "inferred"),
    "DataParallel": (lambda f, m, sd: (torch.save({f"module.{k}": v for k, v in sd.items()}, f / "m.pt"), f / "m.pt")[1],
                     "inferred"),
    "torch.compile in DDP": (lambda f, m, sd: (torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, f / "m.pt"),
                                               f / "m.pt")[1], "inferred"),
    "any attribute": (lambda f, m, sd: (torch.save({"state_dict": {f"student.{k}": v for k, v in sd.items()}}, f / "m.pth"),
                                        f / "m.pth")[1], "inferred"),
    "plain safetensors": (lambda f, m, sd: (save_file(sd, f / "m.safetensors"), f / "m.safetensors")[1], "inferred"),
    "DCP folder": (lambda f, m, sd: _dcp_folder(f, sd), "inferred"),
    "Lightning, network as self.seg_model": (lambda f, m, sd: _lightning_holder(f), "hyper_parameters"),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    model, _ = small_model()
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    made = {}
    for name, (make, origin) in LAYOUTS.items():
        folder = tmp_path_factory.mktemp(name.replace(" ", "_").replace(",", "").replace(".", "_"))
        made[name] = (Path(make(folder, model, state_dict)), origin)
    return made


def _load_model_with_config(path: Path, tmp_path: Path) -> tuple[dict, str, bool]:
    _, config, checkpoint = ckptfmt.load_model_with_config(path)
    return config.to_dict(), checkpoint["config_source"], True


def _load_model(path: Path, tmp_path: Path) -> tuple[dict, str, bool]:
    model = ckptfmt.load_model(path)
    return ckptfmt.ModelConfig.from_model(model).to_dict(), None, True


def _convert(path: Path, tmp_path: Path) -> tuple[dict, str, bool]:
    result = ckptfmt.convert(path, output=tmp_path / "out" / "converted.safetensors")
    return result.config.to_dict(), result.config_source, ckptfmt.verify(result.output).ok


def _inspect(path: Path, tmp_path: Path) -> tuple[dict, str, bool]:
    info = ckptfmt.inspect_checkpoint(path)
    return info["config"], info["config_source"], "error" not in info


def _predict(path: Path, tmp_path: Path) -> tuple[dict, str, bool]:
    predictor = ckptfmt.MultiTaskPredictor(path)
    return predictor.config.to_dict(), predictor.checkpoint["config_source"], True


def _resolution(path: Path, tmp_path: Path) -> tuple[dict, str, bool]:
    resolution = resolve(read_source(path))
    return resolution.config.to_dict(), resolution.origin, resolution.unresolved is None


ENTRY_POINTS = {
    "load_model_with_config": _load_model_with_config,
    "load_model": _load_model,
    "convert": _convert,
    "inspect": _inspect,
    "MultiTaskPredictor": _predict,
    "resolve": _resolution,
}
# ckptfmt files are not sources to convert: every layout but those.
NOT_CONVERTED = {"ckptfmt file", "ckptfmt shards"}


@pytest.mark.parametrize(("layout", "entry_point"), [
    (layout, entry_point) for layout in LAYOUTS for entry_point in ENTRY_POINTS
    if not (entry_point == "convert" and layout in NOT_CONVERTED)
])
def test_every_entry_point_sees_the_same_config_from_the_same_origin(layouts, layout, entry_point, tmp_path):
    """One resolution: before it, a Lightning checkpoint known only by its hyper-parameters was
    'not recognised' by inspect while load_model rebuilt it, and a network under an attribute
    other than `model.`/`net.` was converted weights only."""
    path, origin = layouts[layout]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckptfmt.CkptfmtWarning)  # an inferred config says so; asserted elsewhere
        config, said_origin, ok = ENTRY_POINTS[entry_point](path, tmp_path)
    if (layout, entry_point) == ("plain safetensors", "inspect"):
        # inspect reads a .safetensors by its header alone and imports no torch, so it cannot ask
        # the architectures: it shows the tensors, and no config.
        assert (config, said_origin, ok) == (None, None, True)
        return
    checked = ckptfmt.ModelConfig.from_dict(config).checked()
    assert (checked.model_type, checked.params) == ("multitask", ARCHITECTURE)
    if said_origin is not None:
        assert said_origin == origin
    assert ok


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS) - NOT_CONVERTED))
def test_the_converted_file_loads_the_same_weights_as_its_source(layouts, layout, tmp_path):
    """Whatever the layout, the tensors load_model gives from the source are those it gives
    from the conversion, bit for bit: the network found, nothing of it lost or renamed."""
    path, _ = layouts[layout]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckptfmt.CkptfmtWarning)
        from_source = ckptfmt.load_model(path).state_dict()
        output = ckptfmt.convert(path, output=tmp_path / "converted.safetensors").output
    from_output = ckptfmt.load_model(output).state_dict()
    assert from_source.keys() == from_output.keys()
    assert all(torch.equal(from_source[name], from_output[name]) for name in from_source)


def test_a_lightning_module_s_other_tensors_go_to_the_companion_by_name(layouts, tmp_path):
    path, _ = layouts["Lightning, network as self.seg_model"]
    result = ckptfmt.convert(path, output=tmp_path / "last.safetensors")
    assert result.warnings[0] == (
        "the network is the module's 'seg_model'; its other tensors (criterion.weight) go to the companion")
    assert result.carried["companion"][0] == "tensors outside 'seg_model.'"
    from ckptfmt.format.companion import read_training_state

    extra = read_training_state(result.optimizer_file)["extra"]
    assert torch.equal(extra["tensors outside 'seg_model.'"]["criterion.weight"], torch.tensor([1.0, 3.0]))


def test_a_network_is_never_taken_for_a_part_of_itself(tmp_path):
    """The whole is asked first: a U-Net whose first child could itself be read as a network is
    the U-Net."""
    model, _ = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    resolution = resolve(read_source(tmp_path / "m.pth"))
    assert resolution.legacy.stripped_prefixes == [] and resolution.identification.prefix == ""
