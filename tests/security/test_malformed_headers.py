"""Malformed .safetensors headers, and metadata documents of the wrong shape: one clear error
each, the same from every reader and the CLI, before any tensor is read; and the writer refuses
whatever the reader would."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open

import ckptfmt
from ckptfmt import ConfigError, HeaderError, ModelConfig, read_header
from ckptfmt.checkpoint import build_metadata
from ckptfmt.format.writer import write_safetensors

from ..helpers import craft_safetensors, run_cli, save_small, small_model

TENSOR = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
DATA = b"\0" * 8


def safetensors_accepts(path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except SafetensorError:
        return False
    return True


# name -> (raw header, tensor data, header length override, our message's start)
REJECTED_BY_BOTH = {
    "header length past EOF": ("{%s}" % TENSOR, DATA, 10**6, "declares a 1000000-byte header but the file is only"),
    "header length over the limit": ("{%s}" % TENSOR, DATA, 200_000_000, "declares a 200000000-byte header, over the"),
    "not UTF-8": (b'{"\xff":1}', b"", None, "header is not valid UTF-8 (byte 2)"),
    "not JSON": ('{"a":', b"", None, "header is not valid JSON: Expecting value at position 5"),
    "trailing bytes": ("{%s}" % TENSOR, DATA + b"\0" * 4, None, "tensor data is 12 bytes but the header describes 8: trailing bytes"),
    "gapped offsets": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', DATA, None, "tensor 'a' leaves a gap (starts at byte 4, expected 0)"),
    "overlapping offsets": (
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        DATA, None, "tensor 'b' overlaps the tensor before it",
    ),
    "shape x dtype does not match the span": (
        '{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', DATA, None,
        "tensor 'a': shape [3] of F32 needs 12 bytes but its data_offsets span 8",
    ),
    "unknown dtype": ('{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', DATA, None, "tensor 'a' has unknown dtype 'F33'"),
    "null metadata value": ('{"__metadata__":{"k":null},%s}' % TENSOR, DATA, None, "metadata 'k' is null; safetensors metadata values must be strings"),
    "byte-order mark": ("\ufeff{%s}" % TENSOR, DATA, None, "header starts with a byte-order mark"),
}

ACCEPTED_BY_SAFETENSORS = {
    "duplicate tensor key": ("{%s,%s}" % (TENSOR, TENSOR), "header has the key 'a' twice"),
    "duplicate metadata key": ('{"__metadata__":{"k":"1","k":"2"},%s}' % TENSOR, "header has the key 'k' twice"),
    "null metadata": ('{"__metadata__":null,%s}' % TENSOR, "__metadata__ is not a JSON object"),
    "empty tensor name": ('{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "tensor '': tensor names must be non-empty and free of NUL"),
    "NUL in metadata": ('{"__metadata__":{"k":"a\\u0000b"},%s}' % TENSOR, "metadata 'k' contains a NUL character"),
}


def test_too_short(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(HeaderError, match="is 3 bytes long, too short for a safetensors file"):
        read_header(tmp_path / "short.safetensors")


@pytest.mark.parametrize("case", REJECTED_BY_BOTH, ids=list(REJECTED_BY_BOTH))
def test_cases_safetensors_rejects_are_ours_too(tmp_path, case):
    header, data, length, message = REJECTED_BY_BOTH[case]
    raw = header.encode() if isinstance(header, str) else header
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    assert not safetensors_accepts(path)
    with pytest.raises(HeaderError) as excinfo:
        read_header(path)
    assert str(excinfo.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("case", ACCEPTED_BY_SAFETENSORS, ids=list(ACCEPTED_BY_SAFETENSORS))
def test_cases_safetensors_accepts_and_we_reject(tmp_path, case):
    header, message = ACCEPTED_BY_SAFETENSORS[case]
    path = craft_safetensors(tmp_path / "bad.safetensors", header, DATA)
    assert safetensors_accepts(path)
    with pytest.raises(HeaderError) as excinfo:
        read_header(path)
    assert str(excinfo.value) == f"{path}: {message}"


def _with_config_text(tmp_path, config_text: str):
    """A file with real weights whose embedded config is `config_text`, raw. Written by
    safetensors itself: ckptfmt's writer refuses what its reader would."""
    from safetensors.torch import save_file

    from ckptfmt.format.writer import weights_digest

    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata["ckptfmt.config"] = config_text
    metadata["ckptfmt.weights_sha256"] = weights_digest(model.state_dict())
    save_file(model.state_dict(), tmp_path / "hostile.safetensors", metadata=metadata)
    return tmp_path / "hostile.safetensors"


def _config(**changes) -> dict:
    return {**ModelConfig(base_filters=4, depth=2).to_dict(), **changes}


# name -> (raw config text, error, message). Refused by the reader: no architecture needed.
HOSTILE_CONFIGS = {
    "huge": (json.dumps(_config(description="x" * (2 << 20))), HeaderError, "metadata is "),
    "100k-deep nesting": ('{"a":' * 100_000 + "1" + "}" * 100_000, HeaderError, "metadata 'ckptfmt.config' nests deeper than 32 levels"),
    "5000-digit int": (json.dumps(_config()).replace('"depth": 2', '"depth": ' + "9" * 5000), HeaderError, "metadata 'ckptfmt.config' contains a 5000-digit integer"),
    "NaN": (json.dumps(_config()).replace('"seg_threshold": 0.5', '"seg_threshold": NaN'), HeaderError, "metadata 'ckptfmt.config' contains NaN, which is not valid JSON"),
    "duplicated model_type": (json.dumps(_config())[:-1] + ', "model_type": "other"}', HeaderError, "metadata 'ckptfmt.config' has the key 'model_type' twice"),
    "BOM": ("\ufeff" + json.dumps(_config()), HeaderError, "metadata 'ckptfmt.config' starts with a byte-order mark"),
    "import-path model_type": (json.dumps(_config(model_type="os.system")), ConfigError, "model_type must be a plain name (letters, digits and _), not 'os.system'; import paths are never followed"),
    "not an object": ("[1, 2]", HeaderError, "metadata 'ckptfmt.config' must be a JSON object, not list"),
}
# Refused by the architecture, when the config is used: reading it needs no architecture.
REFUSED_BY_THE_ARCHITECTURE = {
    "64.0 for an int": (json.dumps(_config(base_filters=64.0)), "base_filters must be an int, not float 64.0"),
    "-1 for an int": (json.dumps(_config(depth=-1)), "depth must lie in 1..8, not -1"),
    "true for an int": (json.dumps(_config(in_channels=True)), "in_channels must be an int, not bool True"),
    "an unknown argument": (json.dumps(_config(dropout=0.5)), "'multitask' (MultiTaskUNet) has no argument 'dropout'"),
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS, ids=list(HOSTILE_CONFIGS))
def test_hostile_config_json_is_refused(tmp_path, case):
    text, error, message = HOSTILE_CONFIGS[case]
    path = _with_config_text(tmp_path, text)
    for read in (ModelConfig.from_checkpoint, ckptfmt.load_model):
        with pytest.raises(error) as excinfo:
            read(path)
        assert str(excinfo.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("case", REFUSED_BY_THE_ARCHITECTURE, ids=list(REFUSED_BY_THE_ARCHITECTURE))
def test_config_the_architecture_refuses(tmp_path, case):
    text, message = REFUSED_BY_THE_ARCHITECTURE[case]
    path = _with_config_text(tmp_path, text)
    config = ModelConfig.from_checkpoint(path)  # read, and shown by inspect, without the architecture
    for use in (config.checked, lambda: ckptfmt.load_model(path)):
        with pytest.raises(ConfigError) as excinfo:
            use()
        assert str(excinfo.value).startswith(f"{path}: {message}")
    report = ckptfmt.verify(path)
    assert report.failures == [f"{path}: invalid embedded config: {str(excinfo.value).split(': ', 1)[1]}"]


def test_cli_shows_one_line_for_a_hostile_header(tmp_path):
    path = _with_config_text(tmp_path, '{"a":' * 100_000 + "1" + "}" * 100_000)
    for command in ("inspect", "verify"):
        result = run_cli(command, str(path))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        output = (result.stderr + result.stdout).strip().splitlines()
        assert len(output) == 1 and "nests deeper than 32 levels" in output[0]


def test_config_that_disagrees_with_its_tensors(tmp_path):
    path = _with_config_text(tmp_path, json.dumps(_config(base_filters=8)))
    with pytest.raises(ckptfmt.ShapeMismatchError, match=r"base_filters=8 expects enc\.0\.0\.weight \[8, 1, 3, 3\]; the file has \[4, 1, 3, 3\]"):
        ckptfmt.load_model(path)
    assert not ckptfmt.verify(path).ok


def test_sidecar_that_disagrees_with_the_header(tmp_path):
    path, _, _ = save_small(tmp_path)
    sidecar = tmp_path / "model_config.json"
    sidecar.write_text(sidecar.read_text().replace('"depth": 2', '"depth": 3'))
    report = ckptfmt.verify(path)
    assert report.failures == [f"{path}: sidecar disagrees with the embedded config: depth: 2 != 3"]
    # Loading uses the embedded config, and says that the sidecar disagrees.
    with pytest.warns(ckptfmt.CkptfmtWarning, match=r"disagrees with the embedded config \(depth: 2 != 3\); using the embedded one"):
        assert ckptfmt.load_model(path).depth == 2


def test_tied_alias_pointing_nowhere(tmp_path):
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata["ckptfmt.aliases"] = json.dumps({"x": "missing"})
    path = tmp_path / "a.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    with pytest.raises(HeaderError, match="ties 'x' to 'missing', which is not a stored tensor"):
        ckptfmt.load_model(path)


@pytest.mark.parametrize(
    "version, message",
    [
        ("999", "written by a newer ckptfmt (format 999); this one reads up to format 3. Upgrade ckptfmt "
                "(pip install -U ckptfmt)"),
        ("4", "written by a newer ckptfmt (format 4); this one reads up to format 3. Upgrade ckptfmt "
              "(pip install -U ckptfmt)"),
        ("-1", "metadata 'ckptfmt.format_version' is '-1', not a format version number; the file is damaged "
               "or was not written by ckptfmt"),
        ("2.0", "metadata 'ckptfmt.format_version' is '2.0', not a format version number; the file is "
                "damaged or was not written by ckptfmt"),
    ],
)
def test_unknown_format_versions_are_refused(tmp_path, version, message):
    """A newer ckptfmt.format_version is refused saying to upgrade, a malformed one as damage:
    the same words from every reader, verify and the CLI."""
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata["ckptfmt.format_version"] = version
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    for read in (read_header, ckptfmt.load_model, ckptfmt.ModelConfig.from_checkpoint):
        with pytest.raises(HeaderError) as excinfo:
            read(path)
        assert str(excinfo.value) == f"{path}: {message}"
    report = ckptfmt.verify(path)
    assert report.failures == [f"{path}: {message}"]
    for command in ("inspect", "verify"):
        result = run_cli(command, str(path))
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith(message)


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({"": torch.zeros(1)}, {}, "tensor '': tensor names must be non-empty and free of NUL"),
        ({"a\x00b": torch.zeros(1)}, {}, "tensor 'a\\x00b': tensor names must be non-empty and free of NUL"),
        ({"__metadata__": torch.zeros(1)}, {}, "tensor '__metadata__': safetensors reserves that name for the metadata"),
        ({"a": torch.zeros(1)}, {"huge": "x" * (1 << 20)}, "metadata is 1048674 bytes, over the 1048576-byte limit"),
        ({"a\udc80": torch.zeros(1)}, {}, "tensor 'a\\udc80': tensor names must be valid Unicode, and this one holds a "
                                            "lone surrogate, which safetensors refuses to read"),
        ({"a": torch.zeros(1)}, {"note": "b\ud800"}, "metadata 'note': its value 'b\\ud800' is not valid Unicode (a lone "
                                                     "surrogate), which safetensors refuses to read"),
        ({"a": torch.zeros(1)}, {"n\udfff": "b"}, "metadata 'n\\udfff': its key is not valid Unicode (a lone surrogate), "
                                                  "which safetensors refuses to read"),
    ],
    ids=["empty name", "NUL in a name", "__metadata__", "metadata over 1 MiB", "lone surrogate in a name",
         "lone surrogate in a metadata value", "lone surrogate in a metadata key"],
)
def test_the_writer_refuses_what_the_reader_would(tmp_path, tensors, metadata, message):
    """The same rule, at one place, for both: nothing is written that verify would reject."""
    with pytest.raises(HeaderError) as excinfo:
        write_safetensors(tmp_path / "out.safetensors", tensors, {"format": "pt", **metadata})
    assert str(excinfo.value) == f"{tmp_path / 'out.safetensors'}: {message}"
    assert list(tmp_path.iterdir()) == []


def test_json_the_reader_refuses_is_not_written(tmp_path):
    """The training record's JSON is held at writing to the reader's rules (depth, digits, NaN,
    keys, lone surrogates); an emoji, written as a surrogate pair escape, reads back as itself."""
    from ckptfmt.io.jsondoc import dumps_strict, loads_strict

    deep: list = []
    for _ in range(40):
        deep = [deep]
    for value, message in [
        ({"a": deep}, "the training record['a'][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]"
                      "[0][0][0][0][0][0][0][0] nests deeper than 32 levels"),
        ({"n": 10**20}, "the training record['n'] is a 21-digit integer; at most 19 digits are allowed"),
        ({"x": float("nan")}, "the training record['x'] is nan, which JSON cannot hold"),
        ({1: "a"}, "the training record has the key 1 (int); JSON keys are strings"),
        ({"args": {"name": ["ok", "x\udc80"]}}, "the training record['args']['name'][1] is the string 'x\\udc80', which is "
                                                "not valid Unicode (a lone surrogate); JSON cannot hold it for "
                                                "safetensors and other strict readers"),
        ({"args": {"k\ud800\udc00": 1}}, "the training record['args'] has the key 'k\\ud800\\udc00', which is not valid "
                                          "Unicode (a lone surrogate); JSON cannot hold it for safetensors and other "
                                          "strict readers"),
    ]:
        with pytest.raises(ckptfmt.ConfigError) as excinfo:
            dumps_strict(value, what="the training record")
        assert str(excinfo.value) == message
    # json writes an emoji as a surrogate pair escape, which reads back as the one character
    ok = {"a": [[[1]]], "n": 10**18, "s": "é\x00\U0001f600"}
    assert "\\ud83d\\ude00" in dumps_strict(ok, what="x")
    assert loads_strict(dumps_strict(ok, what="x"), what="x") == ok


@pytest.mark.parametrize(
    "key, document, message",
    [
        ("ckptfmt.training", {"optimizer": "m.optimizer.safetensors"},
         "metadata 'ckptfmt.training': optimizer must be an object {\"file\": ..., \"sha256\": ...}, not "
         "'m.optimizer.safetensors'; the file is damaged or was not written by ckptfmt"),
        ("ckptfmt.training", {"optimizer": {"file": 7, "sha256": "0" * 64}},
         "metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's folder, not 7; "
         "the file is damaged or was crafted to read elsewhere"),
        ("ckptfmt.training", {"optimizer": {"file": "../elsewhere/x.optimizer.safetensors", "sha256": "0" * 64}},
         "metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's folder, not "
         "'../elsewhere/x.optimizer.safetensors'; the file is damaged or was crafted to read elsewhere"),
        ("ckptfmt.training", {"optimizer": {"file": "/etc/passwd", "sha256": "0" * 64}},
         "metadata 'ckptfmt.training': optimizer.file must be a plain file name in the checkpoint's folder, not "
         "'/etc/passwd'; the file is damaged or was crafted to read elsewhere"),
        ("ckptfmt.training", {"metrics": [0.5, 0.9]},
         "metadata 'ckptfmt.training': metrics must be an object of numbers by name, not [0.5, 0.9]; the file is "
         "damaged or was not written by ckptfmt"),
        ("ckptfmt.training", {"epoch": "3"},
         "metadata 'ckptfmt.training': epoch must be a non-negative int, not '3'; the file is damaged or was not "
         "written by ckptfmt"),
        ("ckptfmt.provenance", {"source": "best_model.pth"},
         "metadata 'ckptfmt.provenance': source must be an object, not 'best_model.pth'; the file is damaged or "
         "was not written by ckptfmt"),
        ("ckptfmt.provenance", {"cast": "F16"},
         "metadata 'ckptfmt.provenance': cast must be an object {\"to\": dtype, \"from\": {dtype: count}}, not "
         "'F16'; the file is damaged or was not written by ckptfmt"),
        ("ckptfmt.provenance", {"cast": {"to": "F16", "overflowed": ["w"]}},
         "metadata 'ckptfmt.provenance': cast.overflowed must be an object of magnitudes by tensor, not ['w']; the "
         "file is damaged or was not written by ckptfmt"),
        ("ckptfmt.provenance", {"options": "fp16"},
         "metadata 'ckptfmt.provenance': options must be an object of the conversion's options, not 'fp16'; the "
         "file is damaged or was not written by ckptfmt"),
    ],
    ids=["binding a string", "binding file a number", "binding traversal", "binding absolute", "metrics a list",
         "epoch a string", "source a string", "cast a string", "cast overflowed a list", "options a string"],
)
def test_metadata_documents_of_the_wrong_shape_are_our_error_everywhere(tmp_path, key, document, message):
    """Validated where read, one function per document: inspect, verify and load see the same."""
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata[key] = json.dumps(document)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    for use in (ckptfmt.inspect_checkpoint, ckptfmt.load_model_with_config):
        with pytest.raises(HeaderError) as excinfo:
            use(path)
        assert str(excinfo.value) == f"{path}: {message}"
    assert not ckptfmt.verify(path).ok
    result = run_cli("inspect", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"Error: {path}: {message}"


def _checkpoint_with(tmp_path, key: str, document) -> object:
    model, config = small_model()
    metadata = build_metadata(config, training={}, provenance={})
    metadata[key] = json.dumps(document)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model.state_dict(), metadata)
    return path


@pytest.mark.parametrize(
    "document, message",
    [
        ({"identified": "multitask(depth=2)"},
         "identified must be an object {\"chosen\": ..., \"twins\": [...], \"probe\": ...}, not 'multitask(depth=2)'"),
        ({"identified": {"chosen": "multitask(depth=2)", "twins": "multitask(depth=3)", "probe": "equal"}},
         "identified.twins must be a list of strings, not 'multitask(depth=3)'"),
        ({"identified": {"chosen": ["multitask(depth=2)"], "twins": [], "probe": "equal"}},
         "identified.chosen must be a string, not ['multitask(depth=2)']"),
        ({"source": {"file": "m.pth", "read_as_plain": "args: argparse.Namespace"}},
         "source.read_as_plain must be a list of strings, not 'args: argparse.Namespace'"),
        ({"source": {"file": "m.pth", "read_as_plain": [3]}},
         "source.read_as_plain must be a list of strings, not [3]"),
        ({"source": {"file": "m.pth", "pickled_model": 3}},
         "source.pickled_model must be a string, not 3"),
    ],
    ids=["identified a string", "twins a string", "chosen a list", "read_as_plain a string",
         "read_as_plain of numbers", "pickled_model a number"],
)
def test_provenance_of_the_wrong_shape_is_our_error_everywhere(tmp_path, document, message):
    """Regression: a plain string where ckptfmt writes an object or a list of strings passed
    inspect and verify."""
    path = _checkpoint_with(tmp_path, "ckptfmt.provenance", document)
    message = (f"metadata 'ckptfmt.provenance': {message}; the file is damaged or was not written by ckptfmt")
    for use in (ckptfmt.inspect_checkpoint, ckptfmt.load_model_with_config, ckptfmt.load_model):
        with pytest.raises(HeaderError) as excinfo:
            use(path)
        assert str(excinfo.value) == f"{path}: {message}"
    assert ckptfmt.verify(path).failures == [f"{path}: {message}"]
    result = run_cli("inspect", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {path}: {message}"


def test_provenance_as_ckptfmt_writes_it_still_passes(tmp_path):
    """The provenance shapes the reader checks are those ckptfmt writes: such a file verifies
    and reads back as written."""
    document = {"identified": {"chosen": "a", "twins": ["b"], "probe": "equal"},
                "source": {"file": "m.pth", "read_as_plain": ["args: argparse.Namespace"], "pickled_model": "Net"}}
    path = _checkpoint_with(tmp_path, "ckptfmt.provenance", document)
    assert ckptfmt.verify(path).ok
    assert ckptfmt.inspect_checkpoint(path)["provenance"] == document
