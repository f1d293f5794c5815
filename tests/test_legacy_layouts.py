"""The legacy checkpoints users actually have: Lightning `.ckpt` files, hand-written training
dicts with `args` and scheduler and GradScaler state, whole-model pickles; converted, rebuilt
from the file alone, and resumed bit for bit. Lightning and OmegaConf are the real libraries."""

from __future__ import annotations

import argparse
import collections
import enum
import json
import pathlib
import shutil
import warnings

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import ModelConfig, convert, load_model, load_training_state, read_header
from ckptfmt.format.companion import read_training_state
from ckptfmt.sources.legacy import read_legacy_checkpoint

from .helpers import run, run_cli, run_cli_in_fresh_process, small_model, state_dicts_bit_identical


class Mode(enum.Enum):
    FAST = "fast"
    CAREFUL = "careful"


class Stage(enum.IntEnum):
    WARMUP = 1
    JOINT = 2


def _lit_modules():
    """The LightningModules, defined where Lightning is imported (a test that needs none of
    them never pays for the import)."""
    import lightning.pytorch as pl

    class LitSeg(pl.LightningModule):
        """A network of a registered architecture in `self.model`, as most Lightning code keeps
        it, beside a loss whose class weights are saved with it."""

        def __init__(self, base_filters=4, depth=2, lr=0.01, mode=Mode.FAST, data_dir=pathlib.Path("/data/brats"),
                     args=argparse.Namespace(seed=0, workers=2)):
            super().__init__()
            self.save_hyperparameters()
            self.model = MultiTaskUNet(base_filters=base_filters, depth=depth)
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))

        def forward(self, x):
            return self.model(x)

        def _loss(self, batch):
            x, y = batch
            seg, cls = self(x)
            return seg.square().mean() + self.criterion(cls, y)

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class LitMLP(pl.LightningModule):
        """A LightningModule that is itself an architecture (registered by the test that needs it)."""

        def __init__(self, width: int = 8, classes: int = 3):
            super().__init__()
            self.save_hyperparameters()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, classes))

        def forward(self, x):
            return self.body(x)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return LitSeg, LitMLP


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory):
    """Two LightningModules trained for two steps by a real Trainer, once per session."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    LitSeg, LitMLP = _lit_modules()
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    images = DataLoader(TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8,))), batch_size=4)
    vectors = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    options = dict(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    seg = LitSeg(mode=Mode.CAREFUL)
    best = ModelCheckpoint(dirpath=root / "lightning_logs/version_0/checkpoints", monitor="val_loss", save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and logging
        pl.Trainer(**options, callbacks=[best, EarlyStopping(monitor="val_loss", patience=3)],
                   default_root_dir=root).fit(seg, images, images)
        mlp = LitMLP(width=6)
        pl.Trainer(**options, callbacks=[ModelCheckpoint(dirpath=root / "mlp", save_last=True)],
                   default_root_dir=root).fit(mlp, vectors)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = seg.model.eval()(x)
    return {
        "root": root, "seg": root / "lightning_logs/version_0/checkpoints/last.ckpt", "x": x, "expected": expected,
        "seg_state": {k: v.clone() for k, v in seg.model.state_dict().items()},
        "seg_optimizer": seg.trainer.optimizers[0].state_dict(), "mlp": root / "mlp/last.ckpt", "LitMLP": LitMLP,
        "mlp_state": {k: v.clone() for k, v in mlp.state_dict().items()},
    }


@pytest.mark.subprocess  # Its own process: there, neither the LightningModules nor this test module can be imported.
def test_lightning_checkpoints_convert_and_rebuild_from_the_file_alone(tmp_path, lightning_run):
    """`ckptfmt convert lightning_logs/` in a fresh process: every .ckpt converted, the network
    under `model.` rebuilt by load_model from the output alone, hyper-parameters in inspect."""
    shutil.copytree(lightning_run["root"] / "lightning_logs", tmp_path / "lightning_logs")
    result = run_cli_in_fresh_process("convert", "lightning_logs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "2 converted, 0 skipped, 0 failed"
    out = tmp_path / "lightning_logs/version_0/checkpoints"
    assert lines[0] == ("[OK]   lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt -> "
                        "lightning_logs/version_0/checkpoints/epoch=0-step=2.safetensors  multitask(base_filters=4, "
                        "cls_num_classes=2, depth=2, in_channels=1, seg_out_channels=1)")
    assert lines[1] == (
        "       weights: state_dict; config: hyper_parameters; training record: hyper_parameters, epoch, global_step, "
        "pytorch-lightning_version, loops, callbacks, hparams_name; companion epoch=0-step=2.optimizer.safetensors: "
        "tensors outside 'model.', optimizer_states, lr_schedulers"
    )

    path = out / "last.safetensors"
    with torch.no_grad():
        seg, cls = load_model(path)(lightning_run["x"])
    assert torch.equal(seg, lightning_run["expected"][0]) and torch.equal(cls, lightning_run["expected"][1])
    assert state_dicts_bit_identical(load_file(path), lightning_run["seg_state"])
    assert ckptfmt.verify(path).ok

    training = read_header(path).training()
    assert training["epoch"] == 0 and training["global_step"] == 2
    assert training["hyper_parameters"] == {
        "base_filters": 4, "depth": 2, "lr": 0.01, "mode": "careful", "data_dir": "/data/brats",
        "args": {"seed": 0, "workers": 2},
    }
    assert training["extra"]["pytorch-lightning_version"] == __import__("lightning").__version__
    callbacks = training["extra"]["callbacks"]
    checkpoint_state = next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint"))
    assert checkpoint_state["best_model_path"].endswith("epoch=0-step=2.ckpt")
    assert next(v for k, v in callbacks.items() if k.startswith("EarlyStopping"))["wait_count"] == 0
    provenance = read_header(path).provenance()["source"]
    assert provenance["stripped_prefixes"] == ["model."]
    assert provenance["read_as_plain"] == [
        "hyper_parameters.mode: tests.test_legacy_layouts.Mode('careful') -> 'careful', read as an Enum member's value",
        "hyper_parameters.data_dir: pathlib.PosixPath -> '/data/brats'",
        "hyper_parameters.args: argparse.Namespace -> dict",
    ]
    shown = run_cli("inspect", str(path)).stdout.splitlines()
    assert 'hparams     {"args": {"seed": 0, "workers": 2}, "base_filters": 4, "data_dir": "/data/brats", "depth": 2, ' \
           '"lr": 0.01, "mode": "careful"}' in shown

    # The optimizer's state is in the companion, int keys and all.
    model = load_model(path).train()
    optimizer = torch.optim.AdamW(model.parameters())
    load_training_state(path, optimizer)
    saved = lightning_run["seg_optimizer"]
    assert optimizer.state_dict()["state"].keys() == saved["state"].keys()
    assert all(torch.equal(optimizer.state_dict()["state"][i][k], saved["state"][i][k]) for i in saved["state"]
               for k in saved["state"][i])
    sections = read_training_state(out / "last.optimizer.safetensors")
    assert sections["scheduler"][0]["last_epoch"] == 2
    # The loss's class weights, beside the network in the module, are kept in the companion.
    assert torch.equal(sections["extra"]["tensors outside 'model.'"]["criterion.weight"], torch.tensor([1.0, 3.0]))
    assert ("warning: lightning_logs/version_0/checkpoints/last.ckpt: the network is the module's 'model'; its "
            "other tensors (criterion.weight) go to the companion") in result.stderr.splitlines()


def test_load_model_of_a_lightning_checkpoint_takes_its_hyper_parameters(lightning_run):
    """As convert does: the config comes from the file's own record, not from the shapes, and no
    warning says it was inferred."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckptfmt.CkptfmtWarning)
        model, config, checkpoint = ckptfmt.load_model_with_config(lightning_run["seg"])
    assert checkpoint["config_source"] == "hyper_parameters"
    assert (config.base_filters, config.depth) == (4, 2)
    with torch.no_grad():
        seg, cls = model(lightning_run["x"])
    assert torch.equal(seg, lightning_run["expected"][0]) and torch.equal(cls, lightning_run["expected"][1])


@pytest.mark.subprocess  # Its own process: one where Lightning, OmegaConf and this module cannot be imported.
def test_reading_a_lightning_checkpoint_imports_neither_lightning_nor_the_users_code(lightning_run):
    """Regression guard: the stand-ins are ours; no class named in the file is imported."""
    code = (
        "import sys, json\n"
        "for name in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'omegaconf', 'tests'):\n"
        "    sys.modules[name] = None  # importing any of them now raises\n"
        "from ckptfmt.sources.legacy import read_legacy_checkpoint\n"
        f"legacy = read_legacy_checkpoint({str(lightning_run['seg'])!r})\n"
        "print(json.dumps(legacy.training['hyper_parameters']))\n"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mode"] == "careful"


def test_a_registered_lightning_module_is_its_own_config(tmp_path, lightning_run, monkeypatch):
    from ckptfmt.config import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    registry.register_model("lit_mlp")(lightning_run["LitMLP"])
    result = convert(lightning_run["mlp"], output=tmp_path / "mlp.safetensors")
    assert (result.config_source, result.config.params) == ("hyper_parameters", {"width": 6, "classes": 3})
    assert read_header(result.output).provenance()["source"].get("stripped_prefixes") is None
    model = load_model(result.output)
    assert type(model).__name__ == "LitMLP"
    assert state_dicts_bit_identical(model.state_dict(), lightning_run["mlp_state"])


def _train(model, optimizer, scheduler, scaler, batches, *, plateau: bool) -> None:
    for step, (x, y) in enumerate(batches):
        seg, cls = model(x)
        loss = seg.square().mean() + torch.nn.functional.cross_entropy(cls, y)
        if step == 1:
            loss = loss * float("inf")  # an overflow: the scaler skips this step and backs off
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if plateau:
            scheduler.step(float(seg.detach().square().mean()))
        else:
            scheduler.step()


def _training_objects(model, scheduler_kind: str, lr: float):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.1)
    if scheduler_kind == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
    return optimizer, scheduler, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


SCHEDULERS = ["onecycle", "plateau"]  # plateau's state holds inf (mode_worse)


@pytest.mark.parametrize("scheduler_kind", SCHEDULERS)
@pytest.mark.parametrize("saved_by", ["training dict, converted", "save_model_with_config"])
def test_resume_with_scheduler_and_scaler_equals_never_stopping(tmp_path, saved_by, scheduler_kind):
    """Save after 3 steps, resume in new objects built with other settings: the next 3 steps
    give bit for bit the parameters, learning rate and loss scale of never stopping."""
    torch.manual_seed(0)
    batches = [(torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2,))) for _ in range(6)]
    model, config = small_model()
    model.train()
    optimizer, scheduler, scaler = _training_objects(model, scheduler_kind, lr=0.01)
    plateau = scheduler_kind == "plateau"
    _train(model, optimizer, scheduler, scaler, batches[:3], plateau=plateau)
    if saved_by == "save_model_with_config":
        path = ckptfmt.save_model_with_config(model, tmp_path / "run.safetensors", config, optimizer=optimizer,
                                              epoch=3, scheduler=scheduler, scaler=scaler)
    else:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": 3,
                    "args": argparse.Namespace(lr=0.01, arch="multitask", data=pathlib.Path("/data"))},
                   tmp_path / "run.pth")
        result = convert(tmp_path / "run.pth")
        assert result.carried == {"weights": ["model"], "companion": ["optimizer", "scheduler", "scaler"],
                                  "training": ["epoch", "args"]}
        assert read_header(result.output).training()["extra"]["args"] == {"lr": 0.01, "arch": "multitask", "data": "/data"}
        path = result.output
    _train(model, optimizer, scheduler, scaler, batches[3:], plateau=plateau)

    resumed = load_model(path).train()
    resumed_objects = _training_objects(resumed, scheduler_kind, lr=1.0)
    record = load_training_state(path, resumed_objects[0], scheduler=resumed_objects[1], scaler=resumed_objects[2])
    assert record["epoch"] == 3
    _train(resumed, *resumed_objects, batches[3:], plateau=plateau)
    assert state_dicts_bit_identical(resumed.state_dict(), model.state_dict())
    for key in ("lr", "betas"):  # OneCycleLR moves beta1 too; betas stay a tuple
        assert resumed_objects[0].param_groups[0][key] == optimizer.param_groups[0][key]
    assert resumed_objects[2].get_scale() == scaler.get_scale() < 2.0**10


def test_resume_asks_for_what_was_not_saved(tmp_path):
    model, config = small_model()
    path = ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", config,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ckptfmt.CheckpointNotFoundError) as excinfo:
        load_training_state(path, scaler=scaler)
    assert str(excinfo.value) == (f"{path}: was saved without scaler state; pass scaler= to save_model_with_config "
                                  "(or ckptfmt.save) to keep it")
    with pytest.raises(ckptfmt.ConfigError, match="its saved optimizer state does not fit the Adam given"):
        load_training_state(path, torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]))


class Unregistered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


def test_whole_model_pickles_are_refused_unless_asked_then_their_state_dict_converted(tmp_path):
    model, config = small_model()
    torch.save(model, tmp_path / "whole.pt")
    refused = run_cli("convert", tmp_path / "whole.pt")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"[FAIL] {tmp_path / 'whole.pt'}: refused to unpickle: it needs the global "
        "ckptfmt.models.multitask_unet.MultiTaskUNet, which the safe (weights-only) loader does not allow because "
        "unpickling it can run code. If you trust this file, convert it with `ckptfmt convert SOURCE --unsafe-pickle`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.pt"]

    converted = run_cli("convert", tmp_path / "whole.pt", "--unsafe-pickle")
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout.splitlines()[1] == (
        "       weights: (the whole file: a pickled model); config: (the pickled model's arguments)")
    path = tmp_path / "whole.safetensors"
    assert ModelConfig.from_checkpoint(path).checked() == config.checked()
    assert state_dicts_bit_identical(load_file(path), model.state_dict())
    assert read_header(path).provenance()["source"]["pickled_model"] == "ckptfmt.models.multitask_unet.MultiTaskUNet"

    (tmp_path / "other").mkdir()
    torch.save({"model": Unregistered(), "epoch": 2}, tmp_path / "other/other.pt")
    result = convert(tmp_path / "other/other.pt", unsafe_pickle=True)
    assert result.config is None and result.carried["training"] == ["epoch"]
    assert result.warnings[0].startswith("the pickled tests.test_legacy_layouts.Unregistered gives no config (Unregistered "
                                         "is not a registered architecture")
    assert result.warnings[1].startswith("converted as weights only, with no config")


@pytest.mark.subprocess  # Its own process: the training script whose __main__ defines the pickled class.
def test_a_pickled_model_whose_class_lived_in_the_training_script_says_so(tmp_path):
    """The full unpickler needs the class; one defined in the script that saved it (__main__)
    exists nowhere else, and the file is not damaged: the message says what to do instead."""
    saved = run("-c", "import sys, torch\n"
                "class MyNet(torch.nn.Module):\n"
                "    def __init__(self):\n"
                "        super().__init__()\n"
                "        self.fc = torch.nn.Linear(3, 2)\n"
                "torch.save(MyNet(), sys.argv[1])\n", str(tmp_path / "mine.pt"))
    assert saved.returncode == 0, saved.stderr
    result = run_cli("convert", "mine.pt", "--unsafe-pickle", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "[FAIL] mine.pt: is a pickled MyNet, a class of the script that saved it (__main__), which no other program "
        "can import; in that program, save model.state_dict() instead, or make the class importable here")


def test_a_folder_of_pth_pt_and_ckpt_converts_every_one(tmp_path, lightning_run):
    model, _ = small_model()
    (tmp_path / "runs/a").mkdir(parents=True)
    (tmp_path / "runs/b").mkdir()
    (tmp_path / "runs/c").mkdir()
    torch.save(model.state_dict(), tmp_path / "runs/a/weights.pth")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "runs/b/train.pt")
    shutil.copy(lightning_run["seg"], tmp_path / "runs/c/last.ckpt")
    (tmp_path / "runs/notes.txt").write_text("not a checkpoint")
    result = run_cli("convert", "runs", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [(r["source"], r["status"]) for r in document["results"]] == [
        ("runs/a/weights.pth", "converted"), ("runs/b/train.pt", "converted"), ("runs/c/last.ckpt", "converted"),
    ]
    assert [r["carried"]["weights"] for r in document["results"]] == [
        ["(the whole file: a bare state dict)"], ["state_dict"], ["state_dict"]]
    assert document["results"][2]["carried"]["config"] == ["hyper_parameters"]


def test_the_report_lists_each_dropped_key_with_why_and_keeps_whatever_holds_tensors(tmp_path):
    model, _ = small_model()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema, "seen": {3, 1}, "best": float("inf"),
                "classes": {0: "healthy", 1: "tumour"}, "note": "joint run"}, tmp_path / "m.pth")
    result = run_cli("convert", tmp_path / "m.pth")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:3] == [
        "       weights: state_dict; config: inferred from the weights; training record: note; companion "
        "m.optimizer.safetensors: state_dict_ema, best, classes",
        "       dropped seen: neither JSON nor the companion can hold it: extra.seen holds a set, which cannot be saved "
        "without pickle",
    ]
    extra = read_training_state(tmp_path / "m.optimizer.safetensors")["extra"]
    assert state_dicts_bit_identical(extra["state_dict_ema"], ema)
    assert extra["best"] == float("inf") and extra["classes"] == {0: "healthy", 1: "tumour"}
    document = json.loads(run_cli("convert", tmp_path / "m.pth", "--force", "--json").stdout)
    assert document["results"][0]["dropped"] == {
        "seen": "neither JSON nor the companion can hold it: extra.seen holds a set, which cannot be saved without pickle"}


def test_one_argument_json_cannot_hold_costs_that_argument_not_all_of_args(tmp_path):
    """A training script's Namespace: dtypes and devices are kept as their names; a set goes,
    alone, named, and every other argument stays in the training record."""
    model, _ = small_model()
    args = argparse.Namespace(lr=0.1, amp_dtype=torch.bfloat16, device=torch.device("cpu"),
                              augment={"flip": True, "seen": {1, 2}}, tag="run\udc80")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3, "args": args}, tmp_path / "run.pth")
    result = convert(tmp_path / "run.pth")
    assert result.dropped["args.augment.seen"] == ("neither JSON nor the companion can hold it: extra.args.augment.seen "
                                                   "holds a set, which cannot be saved without pickle")
    assert list(result.dropped) == ["args.augment.seen", "args.tag"]  # not valid Unicode: no strict reader takes it
    assert read_header(result.output).training()["extra"]["args"] == {
        "lr": 0.1, "amp_dtype": "torch.bfloat16", "device": "cpu", "augment": {"flip": True}}


def test_an_attribute_prefix_is_stripped_only_when_the_rest_is_a_known_architecture(tmp_path):
    """Reading never identifies: the resolution, which does, strips the attribute."""
    from ckptfmt.resolve import read_source, resolve

    model, config = small_model()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "known.pth")
    assert read_legacy_checkpoint(tmp_path / "known.pth").stripped_prefixes == []
    known = resolve(read_source(tmp_path / "known.pth")).legacy
    assert known.stripped_prefixes == ["model."] and known.state_dict.keys() == model.state_dict().keys()
    head = {"net.fc.weight": torch.zeros(2, 3), "net.fc.bias": torch.zeros(2)}
    torch.save(head, tmp_path / "unknown.pth")
    unknown = resolve(read_source(tmp_path / "unknown.pth")).legacy
    assert unknown.stripped_prefixes == [] and list(unknown.state_dict) == list(head)


@pytest.mark.subprocess  # Its own process: one where Lightning, OmegaConf and this module cannot be imported.
def test_omegaconf_attributedict_defaultdict_and_enums_are_read_without_their_libraries(tmp_path):
    """A fresh process that cannot import omegaconf, lightning or this module reads them all."""
    from lightning.fabric.utilities.data import AttributeDict
    from omegaconf import OmegaConf

    model, _ = small_model()
    config = OmegaConf.create({"lr": 0.1, "model": {"depth": 2, "layers": [1, 2]}, "name": "x", "ref": "${name}",
                               "missing": "???", "stage": Stage.JOINT})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": AttributeDict(cfg=config, tags=OmegaConf.create(["a"])),
                "counts": collections.defaultdict(list, a=[1, 2]), "stage": Stage.WARMUP,
                "hparams_type": type(config)}, tmp_path / "m.ckpt")
    code = (
        "import sys, json\n"
        "for name in ('lightning', 'lightning_fabric', 'omegaconf', 'tests'):\n"
        "    sys.modules[name] = None\n"
        "from ckptfmt.sources.legacy import read_legacy_checkpoint\n"
        f"legacy = read_legacy_checkpoint({str(tmp_path / 'm.ckpt')!r})\n"
        "print(json.dumps([legacy.training, legacy.conversions]))\n"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    training, conversions = json.loads(result.stdout)
    assert training == {
        "hyper_parameters": {"cfg": {"lr": 0.1, "model": {"depth": 2, "layers": [1, 2]}, "name": "x", "ref": "${name}",
                                     "missing": "???", "stage": 2}, "tags": ["a"]},
        "extra": {"counts": {"a": [1, 2]}, "stage": 1, "hparams_type": "omegaconf.dictconfig.DictConfig"},
    }
    assert "stage: tests.test_legacy_layouts.Stage(1) -> 1, read as an Enum member's value" in conversions
    assert "hyper_parameters.cfg: omegaconf.dictconfig.DictConfig -> dict" in conversions


class Pair(enum.Enum):
    LEFT = (0, 1)


def test_what_no_stand_in_reads_is_refused_naming_its_global(tmp_path):
    model, _ = small_model()
    for value, name in [(Pair.LEFT, "tests.test_legacy_layouts.Pair"), (collections.deque([1]), "collections.deque"),
                        (Unregistered(), "tests.test_legacy_layouts.Unregistered")]:
        torch.save({"state_dict": model.state_dict(), "value": value}, tmp_path / "m.pth")
        with pytest.raises(ckptfmt.UnsafePickleError, match=f"refused to unpickle: it needs the global {name}, "):
            convert(tmp_path / "m.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]
