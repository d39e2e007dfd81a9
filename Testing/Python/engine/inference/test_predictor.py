"""The predictor returns a labelmap on exactly the input's grid, fast path and plain path alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label
from UNet3DSegmenterLib.choices import ARCHITECTURES, NORMS
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.inference.fast import input_layout, prepare_for_inference
from UNet3DSegmenterLib.inference.postprocess import keep_largest_component
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume

LABELS = [Label(0, "background"), Label(1, "organ", (1, 0, 0)), Label(4, "lesion", (0, 1, 0))]


def checkpoint(spacing=(1.5, 1.5, 1.5), channels=1, norm="instance") -> Checkpoint:
    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=channels, out_channels=3, depth=3, base_width=4, norm=norm))
    return Checkpoint.from_model(model, LABELS, Preprocessing(spacing=spacing, channels=channels), (16, 16, 16))


def oblique_input() -> Volume:
    angle = np.radians(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    array = np.random.default_rng(0).normal(size=(12, 30, 25)).astype(np.float32)
    return Volume(array, spacing=(0.9, 1.1, 3.0), origin=(10, -20, 5), direction=direction)


def test_predict_keeps_oblique_anisotropic_geometry():
    volume = oblique_input()
    result = Predictor(checkpoint(), device="cpu").predict(volume, probabilities=True)
    assert result.labelmap.same_grid(volume)
    assert result.labelmap.array.dtype == np.uint8
    assert set(np.unique(result.labelmap.array)) <= {0, 1, 4}
    assert result.probabilities.shape == volume.shape and result.probabilities.channels == 3
    np.testing.assert_allclose(result.probabilities.array.sum(axis=0), 1.0, atol=1e-4)


def test_fast_path_agrees_with_plain_fp32_forward():
    volume = oblique_input()
    fast = Predictor(checkpoint(spacing=None), device="cpu", precision="fp32").predict(volume, probabilities=True)
    plain = Predictor(checkpoint(spacing=None), device="cpu", precision="fp32")
    plain._prepared_model = lambda device, dtype, member=0: plain._models[member]  # the network exactly as trained
    reference = plain.predict(volume, probabilities=True)
    np.testing.assert_allclose(fast.probabilities.array, reference.probabilities.array, atol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("norm", NORMS)
def test_inference_rewrite_computes_the_same_function(architecture, norm):
    torch.manual_seed(0)
    depth = 4 if architecture == "resnet18unet" else 3  # ResNet-18 has four stages
    model = build_model(architecture, dict(in_channels=1, out_channels=2, depth=depth, base_width=4, norm=norm)).eval()
    for module in model.modules():  # give batch norm non-trivial statistics to fold
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    batch = torch.randn(2, 1, 16, 16, 16) * 5 + 3
    cpu = torch.device("cpu")
    with torch.inference_mode():
        expected = model(batch)
        fast = prepare_for_inference(model, cpu, torch.float32)(input_layout(batch, cpu, torch.float32))
        bf16 = prepare_for_inference(model, cpu, torch.bfloat16)(input_layout(batch, cpu, torch.bfloat16)).float()
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)
    assert (bf16 - expected).abs().mean() < 0.05 * expected.abs().mean() + 0.01


def test_resize_checkpoint_segments_on_the_input_grid():
    resized = Checkpoint.from_model(checkpoint().build_model(), LABELS, Preprocessing(size=(16, 16, 16)), (16, 16, 16))
    volume = oblique_input()
    result = Predictor(resized, device="cpu").predict(volume, probabilities=True)
    assert result.labelmap.same_grid(volume) and result.probabilities.same_grid(volume)
    np.testing.assert_allclose(result.probabilities.array.sum(axis=0), 1.0, atol=1e-4)


def test_channel_mismatch_is_a_clear_error():
    four_channels = Volume(np.zeros((4, 10, 10, 10), np.float32))
    with pytest.raises(UserError, match="4 channels .* expects 1 channel"):
        Predictor(checkpoint(), device="cpu").predict(four_channels)


def test_multichannel_checkpoint_accepts_matching_input():
    volume = Volume(np.random.default_rng(1).random((2, 10, 12, 14)).astype(np.float32))
    result = Predictor(checkpoint(channels=2), device="cpu").predict(volume)
    assert result.labelmap.shape == (10, 12, 14)


def test_missing_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        Predictor(checkpoint(), device="cuda")


def test_largest_component_removes_islands_per_class():
    labelmap = np.zeros((10, 10, 10), np.uint8)
    labelmap[1:5, 1:5, 1:5] = 1
    labelmap[8, 8, 8] = 1
    labelmap[6:9, 1:3, 1:3] = 4
    labelmap[1, 8, 1] = 4
    cleaned = keep_largest_component(labelmap, [1, 4])
    assert cleaned[8, 8, 8] == 0 and cleaned[1, 8, 1] == 0
    assert (cleaned == 1).sum() == 64 and (cleaned == 4).sum() == 12


def test_gpu_out_of_memory_falls_back_to_cpu_accumulator_then_cpu(caplog, monkeypatch):
    """The retry order on CUDA out-of-memory, with the sliding window replaced by one that runs out twice."""
    predictor = Predictor(checkpoint(), device="cpu")
    predictor.device = torch.device("cuda")  # as on a GPU machine; the attempts below never touch CUDA
    attempts = []

    def sliding_window(image, member, compute, accumulate, progress, cancel):
        attempts.append((compute.type, accumulate.type))
        if len(attempts) < 3:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return torch.zeros(3, *image.shape[-3:])

    predictor._sliding_window = sliding_window
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level("WARNING", logger="UNet3DSegmenterLib"):
        predictor._infer(torch.zeros(1, 8, 8, 8), 0, None, None)
    assert attempts == [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cpu")]
    assert "accumulator on the CPU" in caplog.text and "the CPU only" in caplog.text
