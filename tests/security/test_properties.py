"""Property tests: random configs and state dicts round-trip exactly; random damage is caught."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ckptfmt.models.multitask_unet import MultiTaskUNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import ckptfmt
from ckptfmt import CkptfmtError, ModelConfig
from ckptfmt.checkpoint import build_metadata
from ckptfmt.format.digest import digest_file
from ckptfmt.format.header import read_header
from ckptfmt.format.writer import read_state_dict, weights_digest, write_safetensors

from ..helpers import state_dicts_bit_identical

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)


@st.composite
def configs(draw) -> ModelConfig:
    in_channels = draw(st.integers(1, 8))
    classes = draw(st.integers(1, 6))
    normalization = draw(st.sampled_from([
        {"mode": "none"}, {"mode": "minmax"}, {"mode": "zscore"},
        {"mode": "fixed",
         "mean": draw(st.lists(st.floats(-1e6, 1e6), min_size=in_channels, max_size=in_channels)),
         "std": draw(st.lists(st.floats(1e-6, 1e6), min_size=in_channels, max_size=in_channels))},
    ]))
    return ModelConfig(
        base_filters=draw(st.integers(1, 4096)), depth=draw(st.integers(1, 8)), in_channels=in_channels,
        seg_out_channels=draw(st.integers(1, 16)), cls_num_classes=classes,
        version=draw(text), description=draw(text), trained_on=draw(text), training_config=draw(text),
        class_names=draw(st.none() | st.lists(text, min_size=classes, max_size=classes)),
        normalization=normalization,
        seg_threshold=draw(st.floats(1e-6, 1 - 1e-6)),
    )


@SETTINGS
@given(config=configs())
def test_random_configs_round_trip(tmp_path, config):
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    path = tmp_path / "c.safetensors"
    write_safetensors(path, {}, build_metadata(config, training={}, provenance={}), overwrite=True)
    assert ModelConfig.from_checkpoint(path) == config


# safetensors' torch side reads these back; the rest of DTYPE_NAMES it cannot always.
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
names = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=20)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    result = {}
    for name in draw(st.lists(names, min_size=0, max_size=6, unique=True)):
        if result and draw(st.booleans()) and draw(st.booleans()):
            result[name] = result[draw(st.sampled_from(sorted(result)))]  # a tie
            continue
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
        if dtype == torch.bool:
            raw = bytearray(b & 1 for b in raw)
        flat = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        result[name] = flat.view(dtype).reshape(shape)
    return result


@SETTINGS
@given(state_dict=state_dicts())
def test_random_state_dicts_round_trip_bit_exactly(tmp_path, state_dict):
    path = tmp_path / "t.safetensors"
    digest = write_safetensors(path, state_dict, {"format": "pt"}, overwrite=True)
    assert state_dicts_bit_identical(read_state_dict(path), state_dict)
    stored = load_file(path)
    assert all(state_dicts_bit_identical({k: stored[k]}, {k: state_dict[k]}) for k in stored)
    assert digest_file(read_header(path)) == weights_digest(state_dict) == digest == read_header(path).weights_sha256


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = ModelConfig(base_filters=1, depth=1, description="tiny")
    path = ckptfmt.save_model_with_config(MultiTaskUNet(**config.get_model_params()), folder / "tiny.safetensors", config)
    return path.read_bytes(), read_state_dict(path)


# A mutation that hits a metadata key's name leaves a file with no config, whose architecture the
# loader then identifies from the weights, and says so with a warning: a load, not a failure.
@pytest.mark.filterwarnings("ignore::ckptfmt.errors.CkptfmtWarning")
@settings(SETTINGS, max_examples=200)
@given(mutations=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_byte_mutations_load_identically_or_raise_ours(tmp_path, tiny_checkpoint, mutations):
    original, expected = tiny_checkpoint
    data = bytearray(original)
    for where, value in mutations:
        data[int(where * len(data))] = value
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data))
    try:
        model = ckptfmt.load_model(path, verify=True)
    except CkptfmtError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert state_dicts_bit_identical(model.state_dict(), expected)


# JSON text as a hostile writer makes it: keys that repeat, strings full of quotes, backslashes,
# colons and brackets, numbers of any length and exponent, NaN and Infinity, deep nesting.
json_numbers = st.one_of(
    st.integers(-10**25, 10**25).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e999", "-1E400", "2.5e-3", "NaN", "Infinity", "-Infinity", "0", "-0.0"]),
)
# json.dumps writes a surrogate as a \\udXXX escape: alone, or next to its other half (one valid
# character when read), or after an escaped backslash (no surrogate at all).
json_strings = st.text(st.sampled_from('ab:"\\/[]{},eEIN\u00e9\u4e2d \n\t\ud83d\ude00\udc80'), max_size=8).map(json.dumps)
json_scalars = json_numbers | json_strings | st.sampled_from(["true", "false", "null"])
json_texts = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    | st.lists(st.tuples(st.sampled_from(['"a"', '"b"', '"a:"', '"\\""', '"\\\\"']) | json_strings, inner), max_size=4)
    .map(lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"),
    max_leaves=30,
) | st.integers(28, 36).map(lambda depth: "[" * depth + "1" + "]" * depth)


def outcome(read, text):
    try:
        return "value", json.dumps(read(text), sort_keys=True)
    except CkptfmtError as exc:
        return "refused", str(exc)


@settings(max_examples=400, deadline=None)
@given(json_texts)
def test_the_fast_json_reading_agrees_with_the_exact_one(text):
    """loads_strict reads nearly every document unhooked, checking the rules after the fact; it
    must accept and refuse exactly what the hooked parse does, with the same message."""
    from ckptfmt.io.jsondoc import _loads_hooked, loads_strict

    assert outcome(lambda t: loads_strict(t, what="header"), text) == outcome(
        lambda t: _loads_hooked(t, "header", None, ckptfmt.errors.HeaderError), text)
