"""MultiTaskPredictor and `ckptfmt predict`: the demo model, rebuilt from its file, at work."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import ckptfmt
from ckptfmt import ModelConfig, MultiTaskPredictor, ShapeMismatchError
from ckptfmt.predict import normalize

from .helpers import dice, run, run_cli, save_small, small_model


@pytest.mark.subprocess  # Its own process: nothing of the model is in memory there, only the file.
def test_predicts_in_a_fresh_process_with_no_architecture_argument(demo_model, held_out, tmp_path):
    images, masks, labels = held_out
    index = int(np.flatnonzero(labels == 1)[0])
    np.save(tmp_path / "scan.npy", images[index, 0])
    code = (
        "import sys, json, numpy as np\n"
        "from ckptfmt import MultiTaskPredictor\n"
        "result = MultiTaskPredictor(sys.argv[1]).predict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], result.mask)\n"
        "print(json.dumps(result.to_dict()))\n"
    )
    out = run("-c", code, str(demo_model), str(tmp_path / "scan.npy"), str(tmp_path / "mask.npy"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["class_name"] == "class_1"
    assert dice(np.load(tmp_path / "mask.npy"), masks[index, 0] > 0.5) >= 0.8


def test_masks_reach_dice_08_on_held_out_phantoms(demo_model, held_out):
    images, masks, labels = held_out
    predictions = MultiTaskPredictor(demo_model).predict(images)
    predicted = np.stack([p.mask for p in predictions])
    lesion = labels == 1
    assert dice(predicted[lesion], masks[lesion, 0] > 0.5) >= 0.8
    assert np.mean([p.label for p in predictions] == labels) >= 0.9


def test_cli_predict_writes_masks_and_a_table(demo_model, held_out, tmp_path):
    images = tmp_path / "scans"
    images.mkdir()
    np.save(images / "a.npy", held_out[0][1, 0])
    Image.fromarray((held_out[0][2, 0] * 255).astype(np.uint8)).save(images / "b.png")
    (images / "broken.png").write_bytes(b"not a png")
    result = run_cli("predict", str(demo_model), str(images), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"[OK]   {images}/a.npy: class_{held_out[2][1]} (")
    assert lines[1].startswith(f"[OK]   {images}/b.png: class_{held_out[2][2]} (")
    assert result.stderr.splitlines()[-1].startswith(f"[FAIL] {images}/broken.png: cannot be read as an image")
    assert lines[-1] == f"2 predicted, 0 skipped, 1 failed; table in {tmp_path}/out/predictions.json"
    mask = np.array(Image.open(tmp_path / "out/a_mask.png"))
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, np.load(tmp_path / "out/a_mask.npy"))
    table = json.loads((tmp_path / "out/predictions.json").read_text())
    assert table["class_names"] == ["class_0", "class_1"]
    assert [row["input"] for row in table["predictions"]] == [f"{images}/a.npy", f"{images}/b.png"]
    assert table["predictions"][0]["outputs"] == [f"{tmp_path}/out/a_mask.png", f"{tmp_path}/out/a_mask.npy"]
    csv = run_cli("predict", str(demo_model), str(images / "a.npy"), "--out", str(tmp_path / "csv"), "--format", "csv")
    assert csv.returncode == 0, csv.stderr
    assert (tmp_path / "csv/predictions.csv").read_text().splitlines()[0] == (
        "input,index,input_sha256,label,class_name,p_class_0,p_class_1,mask_pixels,outputs,checkpoint_sha256"
    )


def test_a_rerun_after_a_partial_failure_predicts_only_what_is_left(demo_model, held_out, tmp_path):
    """Regression: a rerun failed on the outputs the first run left, naming the output only."""
    images = tmp_path / "scans"
    images.mkdir()
    np.save(images / "a.npy", held_out[0][1, 0])
    (images / "b.npy").write_bytes(b"not an array")
    first = run_cli("predict", str(demo_model), str(images), "--out", str(tmp_path / "out"))
    assert first.returncode == 1
    np.save(images / "b.npy", held_out[0][2, 0])  # the user fixes the failed input
    again = run_cli("predict", str(demo_model), str(images), "--out", str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"[SKIP] {images}/a.npy: already predicted by this checkpoint -> {tmp_path}/out/a_mask.png"
    assert again.stdout.splitlines()[1].startswith(f"[OK]   {images}/b.npy: ")
    assert again.stdout.splitlines()[-1] == f"1 predicted, 1 skipped, 0 failed; table in {tmp_path}/out/predictions.json"
    table = json.loads((tmp_path / "out/predictions.json").read_text())
    assert [row["input"] for row in table["predictions"]] == [f"{images}/a.npy", f"{images}/b.npy"]
    np.save(images / "a.npy", held_out[0][3, 0])  # another image under the same name
    changed = run_cli("predict", str(demo_model), str(images / "a.npy"), "--out", str(tmp_path / "out"))
    assert changed.returncode == 1
    assert changed.stderr.splitlines()[-1] == (
        f"[FAIL] {images}/a.npy: its output {tmp_path}/out/a_mask.png already exists, not from this input and "
        "checkpoint; pass --force to replace it"
    )
    forced = run_cli("predict", str(demo_model), str(images / "a.npy"), "--out", str(tmp_path / "out"), "--force")
    assert forced.returncode == 0, forced.stderr


def test_an_array_of_several_images_gives_one_output_each(demo_model, held_out, tmp_path):
    """Regression: a 4-D .npy crashed with AttributeError after writing earlier masks."""
    np.save(tmp_path / "batch.npy", held_out[0][:3])
    result = run_cli("predict", str(demo_model), str(tmp_path / "batch.npy"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:3]] == [
        f"[OK]   {tmp_path}/batch.npy[{i}]" for i in range(3)
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        *(f"batch_{i}_mask.{ext}" for i in range(3) for ext in ("npy", "png")), "predictions.json",
    ]
    rows = json.loads((tmp_path / "out/predictions.json").read_text())["predictions"]
    assert [row["index"] for row in rows] == [0, 1, 2]


def test_each_failed_input_names_its_file(demo_model, tmp_path):
    """The predictor's own checks (channels, emptiness, finite values in and out) fail per file,
    each [FAIL] line naming it. Regression: NaN in or out was an [OK] line with probabilities of
    nan, and a table that the rerun's strict reader refused."""
    images = tmp_path / "scans"
    images.mkdir()
    np.save(images / "huge.npy", np.array([[3e38, -3e38] * 8] * 16, np.float32))
    np.save(images / "nan.npy", np.full((16, 16), np.nan, np.float32))
    np.save(images / "rgb.npy", np.zeros((3, 64, 64), np.float32))
    np.save(images / "void.npy", np.zeros((0, 0), np.float32))
    result = run_cli("predict", str(demo_model), str(images), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")] == [
        f"[FAIL] {images}/huge.npy: the model's outputs for it are not finite (NaN or infinity): its values, from "
        "-3e+38 to 3e+38, lie beyond what the model and its normalisation can take",
        f"[FAIL] {images}/nan.npy: holds NaN or infinite values; the model cannot predict from them",
        f"[FAIL] {images}/rgb.npy: the model takes 1-channel images (C x H x W or H x W), not shape (3, 64, 64)",
        f"[FAIL] {images}/void.npy: image of shape (1, 0, 0) is empty",
    ]


def _cli_in_bounded_memory(*args: str, memory_bytes: int) -> subprocess.CompletedProcess:
    """`ckptfmt ARGS` in a fresh process allowed `memory_bytes` of address space beyond what it has
    mapped once ckptfmt, torch and Pillow are imported (that differs by build and machine; what a
    command then allocates does not), so that a regression fails the test, not the machine. One
    thread and two malloc arenas: per-thread arenas reserve address space they never use."""
    code = (
        "import resource, sys\n"
        "import PIL.Image, ckptfmt.predict\n"
        "from ckptfmt.cli import main\n"
        "mapped = int(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmSize:'))) * 1024\n"
        "limit = mapped + int(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "main(sys.argv[2:], prog_name='ckptfmt')\n"
    )
    return run("-c", code, str(memory_bytes), *args, env={"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"})


def _png_of_zeros(path, width: int, height: int) -> None:
    """A grayscale PNG of `width` x `height` zeros, written without an array of that size: a 9000 x
    9000 one is 78 KB."""
    import zlib

    rows = zlib.compress(b"\0" * ((width + 1) * height), 9)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


@pytest.mark.subprocess  # Its own process: the address-space limit is set for the whole process.
def test_decompression_bombs_are_refused_before_decoding(demo_model, tmp_path):
    """A PNG of 144 megapixels (over Pillow's own limit), one of 81 (under it, and the model would
    need 12 GB for it), and a 192-byte .npy that declares 37 GiB: each refused from its header,
    in a process that could not decode any of them."""
    _png_of_zeros(tmp_path / "bomb.png", 12_000, 12_000)
    _png_of_zeros(tmp_path / "big.png", 9_000, 9_000)
    assert (tmp_path / "big.png").stat().st_size < 100_000
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }"
    header += " " * (128 - 10 - len(header) - 1) + "\n"
    (tmp_path / "bomb_array.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64)
    assert (tmp_path / "bomb_array.npy").stat().st_size == 192
    # 144 megapixels decode to 144 MB, and 576 MB as float32: more than this process may map.
    result = _cli_in_bounded_memory("predict", str(demo_model), str(tmp_path / "bomb.png"), str(tmp_path / "big.png"),
                                    str(tmp_path / "bomb_array.npy"), "--out", str(tmp_path / "out"),
                                    memory_bytes=512 << 20)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    failures = [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")]
    after = ("refused before decoding (a decompression bomb, or more than the model has memory for: raise the "
             "limit with --max-pixels where more is free)")
    assert failures == [
        f"[FAIL] {tmp_path}/bomb.png: declares a 12000 x 12000 image, 144,000,000 pixels, over the limit of 8,000,000; {after}",
        f"[FAIL] {tmp_path}/big.png: declares a 9000 x 9000 image, 81,000,000 pixels, over the limit of 8,000,000; {after}",
        f"[FAIL] {tmp_path}/bomb_array.npy: declares an array of shape (100000, 100000), 10,000,000,000 pixels, over "
        f"the limit of 8,000,000; {after}",
    ]
    small = run_cli("predict", str(demo_model), str(tmp_path / "bomb.png"), "--out", str(tmp_path / "out2"),
                    "--max-pixels", "100")
    assert "over the limit of 100;" in small.stderr


@pytest.mark.subprocess  # Its own process: the address-space limit is set for the whole process.
def test_an_input_the_model_runs_out_of_memory_on_fails_alone(demo_model, held_out, tmp_path):
    """Under a raised --max-pixels, a 16-megapixel image needs some 2.2 GB in the demo model; with
    768 MiB to spare it fails, naming the file, its size and the option, and the next input runs."""
    _png_of_zeros(tmp_path / "large.png", 4_000, 4_000)
    np.save(tmp_path / "small.npy", held_out[0][1, 0])
    result = _cli_in_bounded_memory("predict", str(demo_model), str(tmp_path / "large.png"), str(tmp_path / "small.npy"),
                                    "--out", str(tmp_path / "out"), "--max-pixels", "20000000", memory_bytes=768 << 20)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith(("[FAIL]", "Error"))] == [
        f"[FAIL] {tmp_path}/large.png: ran out of memory in the model on a 4000 x 4000 image (16,000,000 pixels); "
        "run it where more memory is free, or lower --max-pixels (now 20,000,000) to refuse inputs this large "
        "before decoding them",
    ]
    assert result.stdout.splitlines()[0].startswith(f"[OK]   {tmp_path}/small.npy: class_{held_out[2][1]} (")
    assert result.stdout.splitlines()[-1] == f"1 predicted, 0 skipped, 1 failed; table in {tmp_path}/out/predictions.json"


def test_an_earlier_table_that_predict_did_not_write_is_our_error(demo_model, tmp_path):
    """The table of an earlier run is read capped and by the strict JSON reader, and its rows are
    checked before a rerun trusts them: anything else is refused naming the table, never a
    RecursionError, a csv.Error or a TypeError from deep inside."""
    import os

    from ckptfmt.predict.files import _checkpoint_identity, predict_files
    from ckptfmt.io.files import sha256_file

    predictor = MultiTaskPredictor(demo_model)
    np.save(tmp_path / "a.npy", np.zeros((16, 16), np.float32))
    row = {"input": str(tmp_path / "a.npy"), "index": None, "input_sha256": sha256_file(tmp_path / "a.npy"),
           "outputs": 5}
    not_ours = "exists but is not a predictions table written by ckptfmt"
    redo = "choose another out_dir=, or pass overwrite=True to replace it"
    tables = {
        "json": [
            ("[" * 200_000, "the predictions table nests deeper than 32 levels"),
            ('{"predictions": [], "predictions": []}', "the predictions table has the key 'predictions' twice"),
            (json.dumps({"checkpoint_sha256": _checkpoint_identity(predictor), "predictions": [row]}), not_ours),
            (json.dumps({"checkpoint_sha256": _checkpoint_identity(predictor), "predictions": {"a": 1}}), not_ours),
        ],
        "csv": [("input,index,input_sha256,outputs\n" + "x" * 200_000 + ",,,\n", not_ours)],
    }
    for table_format, cases in tables.items():
        for number, (text, message) in enumerate(cases):
            out = tmp_path / f"{table_format}{number}"
            out.mkdir()
            (out / f"predictions.{table_format}").write_text(text)
            with pytest.raises(ckptfmt.InputError) as caught:
                predict_files(predictor, [tmp_path / "a.npy"], out, table_format=table_format)
            assert str(caught.value) == f"{out}/predictions.{table_format}: {message}; {redo}"
    os.truncate(tmp_path / "json0/predictions.json", (16 << 20) + 1)  # sparse: nothing read to refuse it
    with pytest.raises(ckptfmt.InputError) as caught:
        predict_files(predictor, [tmp_path / "a.npy"], tmp_path / "json0")
    assert str(caught.value) == (f"{tmp_path}/json0/predictions.json: is 16,777,217 bytes, over the 16,777,216-byte "
                                 f"limit for a predictions table; {redo}")


@pytest.mark.subprocess  # Its own process: the address-space limit is set for the whole process.
def test_an_earlier_table_at_the_size_cap_is_read_in_bounded_memory(demo_model, tmp_path):
    """The cap is sized for the worst JSON per byte, a list of short strings (some 32 bytes of
    memory per byte of text): one of exactly the cap is refused with 1 GiB to spare."""
    from ckptfmt.predict.files import TABLE_LIMIT

    start, end = '{"predictions": [', '"ab"]}'
    body = '"ab",' * ((TABLE_LIMIT - len(start) - len(end)) // 5)
    text = start + body + " " * (TABLE_LIMIT - len(start) - len(body) - len(end)) + end
    (tmp_path / "out").mkdir()
    (tmp_path / "out/predictions.json").write_text(text)
    assert (tmp_path / "out/predictions.json").stat().st_size == TABLE_LIMIT
    np.save(tmp_path / "a.npy", np.zeros((16, 16), np.float32))
    result = _cli_in_bounded_memory("predict", str(demo_model), str(tmp_path / "a.npy"), "--out", str(tmp_path / "out"),
                                    memory_bytes=1 << 30)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {tmp_path}/out/predictions.json: exists but is not a predictions table written by ckptfmt; choose "
        "another --out, or pass --force to replace it"
    )


def test_a_file_name_that_is_not_utf8_is_in_the_table_and_skipped_by_a_rerun(demo_model, tmp_path):
    """Regressions: a name with a byte that is not UTF-8 made writing the CSV table raise
    UnicodeEncodeError, and made the JSON table one that the rerun's strict reader refused; a
    rerun that skipped a CSV row raised KeyError writing it again. The rerun's table is the first's."""
    import os

    from ckptfmt.predict import predict_files

    predictor = MultiTaskPredictor(demo_model)
    image = tmp_path / os.fsdecode(b"scan\xff.npy")
    np.save(image, np.zeros((16, 16), np.float32))
    for table_format in ("json", "csv"):
        first, table = predict_files(predictor, [image], tmp_path / table_format, table_format=table_format)
        assert first[0].error is None
        text = table.read_bytes().decode("utf-8")
        if table_format == "json":
            assert json.loads(text)["predictions"][0]["input"] == f"{tmp_path}/scan\\xff.npy"
        else:
            assert text.splitlines()[1].startswith(f"{tmp_path}/scan\\xff.npy,,")
        again, _ = predict_files(predictor, [image], tmp_path / table_format, table_format=table_format)
        assert again[0].skipped and again[0].outputs == first[0].outputs
        assert table.read_bytes().decode("utf-8") == text


def test_a_checkpoint_converted_to_fp16_predicts_on_the_cpu(tmp_path, held_out):
    """Regression: the model stayed in fp16 while its inputs were fp32 on the CPU."""
    from .helpers import DEMO

    result = ckptfmt.convert(DEMO / "multitask_joint/best_model.pth", output=tmp_path / "half.safetensors", dtype="fp16")
    predictor = MultiTaskPredictor(result.output, device="cpu")
    assert predictor.model.seg_head.weight.dtype == torch.float32
    assert predictor.predict(held_out[0][0, 0]).mask.shape == (64, 64)


def test_wrong_depth_override_fails_before_loading(demo_model, monkeypatch):
    monkeypatch.setattr("ckptfmt.format.writer.load_tensors", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ShapeMismatchError, match=r"depth=4 expects .*\(the weights say depth=3\); remove the override"):
        MultiTaskPredictor(demo_model, depth=4)


def test_fp16_agrees_with_fp32(demo_model, held_out):
    images = held_out[0][:32]
    full = MultiTaskPredictor(demo_model, precision="fp32").predict(images)
    half = MultiTaskPredictor(demo_model, precision="fp16").predict(images)
    assert dice(np.stack([p.mask for p in full]), np.stack([p.mask for p in half])) >= 0.99
    assert max(np.abs(f.class_probabilities - h.class_probabilities).max() for f, h in zip(full, half)) <= 1e-2


def test_input_forms_and_padding(tmp_path):
    path, model, _ = save_small(tmp_path, depth=2, in_channels=2)
    predictor = MultiTaskPredictor(path)
    rng = np.random.default_rng(0)
    image = rng.random((2, 16, 16), dtype=np.float32)
    single = predictor.predict(image)
    with torch.no_grad():
        seg, cls = model(torch.from_numpy(image)[None])
    assert np.allclose(single.probabilities, torch.sigmoid(seg)[0, 0].numpy(), atol=1e-6)
    assert np.allclose(single.class_probabilities, torch.softmax(cls, 1)[0].numpy(), atol=1e-6)
    batch = predictor.predict(np.stack([image, image]))
    assert len(batch) == 2 and np.array_equal(batch[0].mask, single.mask)
    odd = predictor.predict([rng.random((2, 13, 7)), torch.from_numpy(image), (image * 255).astype(np.uint8)])
    assert [p.mask.shape for p in odd] == [(13, 7), (16, 16), (16, 16)]
    with pytest.raises(ckptfmt.InputError, match=r"the model takes 2-channel images \(C x H x W or H x W\), not shape \(3, 16, 16\)"):
        predictor.predict(rng.random((3, 16, 16)))


def test_normalisation_and_threshold_come_from_the_config(tmp_path):
    model, _ = small_model()
    config = ModelConfig(base_filters=4, depth=2, normalization={"mode": "fixed", "mean": 0.5, "std": 0.25},
                         seg_threshold=0.7, class_names=["healthy", "tumour"])
    path = ckptfmt.save_model_with_config(model, tmp_path / "m.safetensors", config)
    predictor = MultiTaskPredictor(path)
    image = np.random.default_rng(1).random((16, 16), dtype=np.float32)
    result = predictor.predict(image)
    with torch.no_grad():
        seg, _ = model((torch.from_numpy(image)[None, None] - 0.5) / 0.25)
    probabilities = torch.sigmoid(seg)[0, 0].numpy()
    assert np.allclose(result.probabilities, probabilities, atol=1e-6)
    assert np.array_equal(result.mask, result.probabilities > 0.7)
    assert np.array_equal(predictor.predict(image, threshold=0.2).mask, result.probabilities > 0.2)
    assert result.class_name in ("healthy", "tumour")


@pytest.mark.parametrize("mode", ["none", "minmax", "zscore"])
def test_per_image_normalisations(mode):
    images = torch.rand(3, 2, 8, 8) * 100 + 7
    out = normalize(images, {"mode": mode})
    if mode == "minmax":
        assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(3)) and torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(3))
    elif mode == "zscore":
        assert torch.allclose(out.mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-5)
    else:
        assert out is images


def test_legacy_pth_predicts_with_an_inferred_config_and_a_warning(tmp_path):
    model, _ = small_model()
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "old.pth")
    with pytest.warns(ckptfmt.CkptfmtWarning, match="architecture inferred from the weights"):
        predictor = MultiTaskPredictor(tmp_path / "old.pth")
    assert predictor.checkpoint["config_source"] == "inferred"


def test_the_cli_shows_a_warning_as_one_line_each_time(tmp_path):
    """A warning reaches the user as one `warning: ...` line on stderr, not in Python's
    file-and-line form, and the next run says it again."""
    model, _ = small_model()
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "old.pth")
    np.save(tmp_path / "scan.npy", np.zeros((16, 16), np.float32))
    for out in ("first", "again"):
        result = run_cli("predict", tmp_path / "old.pth", tmp_path / "scan.npy", "--out", tmp_path / out)
        assert result.returncode == 0, result.stderr
        assert [line for line in result.stderr.splitlines() if "warning" in line.lower()] == [
            f"warning: {tmp_path}/old.pth: no config embedded and no model_config.json beside it; architecture "
            "inferred from the weights: multitask(base_filters=4, cls_num_classes=2, depth=2, in_channels=1, "
            "seg_out_channels=1). Convert it (`ckptfmt convert`) to record it"]


def test_unsupported_precision_is_a_clear_error(demo_model):
    with pytest.raises(ckptfmt.ConfigError, match="precision must be auto, fp32, fp16, bf16, not 'int8'"):
        MultiTaskPredictor(demo_model, precision="int8")
    assert MultiTaskPredictor(demo_model, precision="bf16").model.seg_head.weight.dtype == torch.bfloat16


def test_predictor_is_the_general_name_and_the_seeds_name_stays(demo_model):
    """The predictor runs any architecture that declares its task; the seed's name is the same class."""
    assert ckptfmt.Predictor is ckptfmt.MultiTaskPredictor
    assert "Predictor" in ckptfmt.__all__ and "MultiTaskPredictor" in ckptfmt.__all__
    assert ckptfmt.Predictor(demo_model).config.model_type == "multitask"


def test_a_damaged_image_is_named_and_a_colour_image_read_as_one_channel_says_so(demo_model, tmp_path):
    """Regression: a damaged PNG failed as `cannot identify image file <_io.BufferedReader
    name=3>`, naming no file; a colour image was reduced to one channel without a word."""
    import numpy as np
    from PIL import Image

    (tmp_path / "in").mkdir()
    (tmp_path / "in/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8), "RGB").save(tmp_path / "in/colour.png")
    result = run_cli("predict", demo_model, tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert (f"[FAIL] {tmp_path / 'in/broken.png'}: cannot be read as an image: it is damaged, truncated or not an "
            "image format Pillow reads") in result.stderr
    assert (f"warning: {tmp_path / 'in/colour.png'}: is a colour image (RGB); the model takes one channel, so it is "
            "read as its luminance") in result.stderr


def test_a_run_that_runs_out_of_space_leaves_the_previous_masks_and_table(demo_model, held_out, tmp_path, monkeypatch):
    """The masks and the table that records them are one transaction: a run that fails writing
    the table (here: out of space) leaves the previous run's masks and table as they were,
    rather than new masks that no table records."""
    import errno
    import os

    from ckptfmt.predict.files import predict_files

    images = tmp_path / "scans"
    images.mkdir()
    np.save(images / "a.npy", held_out[0][1, 0])
    predictor = MultiTaskPredictor(demo_model)
    predict_files(predictor, [images / "a.npy"], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    np.save(images / "a.npy", held_out[0][3, 0])
    real_write = os.write

    def table_full(fd, data):
        if ".predictions.json.ckptfmt-tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", table_full)
    with pytest.raises(ckptfmt.WriteError, match="predictions.json: writing failed: no space left on device"):
        predict_files(predictor, [images / "a.npy"], tmp_path / "out", overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
