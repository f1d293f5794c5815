"""Malformed .safetensors files and hostile headers: one clear error each, before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
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
