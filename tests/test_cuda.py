"""The CUDA path: fp16 by default, channels_last, agreeing with fp32. Skipped without a GPU;
run on one through tools/gpu_check.sh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckptfmt
from ckptfmt import MultiTaskPredictor

from .helpers import dice, save_small

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (tools/gpu_check.sh)"),
]


def test_auto_precision_is_fp16_channels_last(demo_model):
    predictor = MultiTaskPredictor(demo_model)
    assert predictor.device.type == "cuda" and predictor.precision == "fp16"
    weight = predictor.model.enc[0][0].weight
    assert weight.dtype == torch.float16 and weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark


def test_fp16_on_cuda_agrees_with_fp32_on_the_cpu(demo_model, held_out):
    images = held_out[0][:64]
    cpu = MultiTaskPredictor(demo_model, device="cpu").predict(images)
    gpu = MultiTaskPredictor(demo_model, device="cuda").predict(images)
    assert dice(np.stack([p.mask for p in cpu]), np.stack([p.mask for p in gpu])) >= 0.99
    assert max(np.abs(c.class_probabilities - g.class_probabilities).max() for c, g in zip(cpu, gpu)) <= 1e-2


def test_held_out_dice_on_cuda(demo_model, held_out):
    images, masks, labels = held_out
    predicted = np.stack([p.mask for p in MultiTaskPredictor(demo_model, device="cuda").predict(images)])
    assert dice(predicted[labels == 1], masks[labels == 1, 0] > 0.5) >= 0.8


def test_load_model_straight_to_cuda(tmp_path):
    path, model, _ = save_small(tmp_path)
    loaded = ckptfmt.load_model(path, device="cuda")
    assert all(t.is_cuda for t in loaded.state_dict().values())
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x.cuda())[0].cpu(), model(x)[0], atol=1e-4)


def test_bf16_is_honoured_or_refused_clearly(demo_model):
    if torch.cuda.is_bf16_supported():
        assert MultiTaskPredictor(demo_model, precision="bf16").model.seg_head.weight.dtype == torch.bfloat16
    else:
        with pytest.raises(ckptfmt.DeviceError, match="precision bf16 is not supported"):
            MultiTaskPredictor(demo_model, precision="bf16")


def test_an_async_save_of_a_cuda_model_stages_in_pinned_memory_and_writes_the_state_of_the_call(tmp_path):
    from ckptfmt.staging import StagingBuffer

    from .helpers import small_model

    model = small_model(base_filters=8, depth=3)[0].cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    seg, cls = model(torch.rand(2, 1, 16, 16, device="cuda"))
    (seg.mean() + cls.mean()).backward()
    optimizer.step()
    blocking = ckptfmt.save(model, tmp_path / "blocking/model.safetensors", optimizer=optimizer)
    future = ckptfmt.async_save(model, tmp_path / "async/model.safetensors", optimizer=optimizer)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1)
    assert ckptfmt.read_header(future.result()).weights_sha256 == ckptfmt.read_header(blocking).weights_sha256
    copy = StagingBuffer().snapshot(model.state_dict())
    assert all(tensor.is_pinned() and tensor.device.type == "cpu" for tensor in copy.values())
