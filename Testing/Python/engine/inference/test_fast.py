"""The fast inference paths compute the network exactly as trained, within rounding, on every fallback."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from UNet3DSegmenterLib import runtime
from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, load_checkpoint
from UNet3DSegmenterLib.choices import ARCHITECTURES, NORMS
from UNet3DSegmenterLib.inference import fast
from UNet3DSegmenterLib.inference.fast import freeze, inference_paths, input_layout, prepare_for_inference
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.runtime import cpu_computes_bf16, return_freed_memory, reuse_freed_memory
from UNet3DSegmenterLib.volume import Volume

CPU = torch.device("cpu")
REPOSITORY = Path(__file__).resolve().parents[4]
BUNDLED = REPOSITORY / "Resources" / "Models" / "hippocampus.pt"


def network(architecture: str, norm: str) -> nn.Module:
    """A small network with non-trivial norm parameters and batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    depth = 4 if architecture == "resnet18unet" else 3  # ResNet-18 has four stages
    model = build_model(architecture, dict(in_channels=1, out_channels=3, depth=depth, base_width=4, norm=norm)).eval()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm3d, nn.InstanceNorm3d)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


needs_bf16_kernels = pytest.mark.skipif(
    not cpu_computes_bf16(), reason="this processor has no bfloat16 kernels (AVX2 only): its float32 fallback is "
    "tested in engine/test_cpu_kinds.py")


def batch(size: int = 2) -> torch.Tensor:
    return torch.randn(size, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 5 + 3


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("fuse", [True, False])
def test_rewritten_network_computes_the_same_function_in_float32(architecture, norm, fuse):
    model = network(architecture, norm)
    with torch.inference_mode():
        expected = model(batch())
        rewritten = prepare_for_inference(model, CPU, torch.float32, fuse=fuse)(input_layout(batch(), CPU, torch.float32))
    torch.testing.assert_close(rewritten, expected, rtol=1e-5, atol=1e-5)


@needs_bf16_kernels
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("norm", NORMS)
def test_every_inference_path_agrees_within_bfloat16_rounding(architecture, norm):
    model = network(architecture, norm)
    with torch.inference_mode():
        expected = model(batch())
        for name, forward in inference_paths(model, CPU, torch.bfloat16).items():
            error = (forward(batch()).float() - expected).abs()
            assert error.mean() < 0.02 * expected.abs().mean() + 0.01, name


def test_rewrite_leaves_the_original_network_untouched():
    model = network("unet3d", "batch")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    prepare_for_inference(model, CPU, torch.bfloat16)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert any(isinstance(module, nn.BatchNorm3d) for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_in_place_instance_norm_matches_pytorch(dtype, affine):
    norm = nn.InstanceNorm3d(8, affine=affine)
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-1, 1)
    x = (torch.randn(3, 8, 6, 7, 5) * 4 + 10).to(dtype=dtype, memory_format=torch.channels_last_3d)
    expected = torch.relu(norm(x.float()))
    with torch.inference_mode():
        result = fast._InstanceNormActivation(norm, nn.ReLU(), in_place=True)(x.clone())
    assert result.dtype == dtype and result.is_contiguous(memory_format=torch.channels_last_3d)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result.float(), expected, rtol=tolerance, atol=tolerance)


def test_an_instance_norm_whose_input_is_read_elsewhere_leaves_it_intact():
    """Only the output of the convolution just before is normalised in place; any other input is kept."""
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.InstanceNorm3d(1, affine=True)

        def forward(self, x):
            return torch.cat([self.norm(x), x], dim=1)

    model = Branches().eval()
    x = torch.randn(2, 1, 8, 8, 8) * 3 + 1
    with torch.inference_mode():
        expected = model(x)
        result = prepare_for_inference(model, CPU, torch.float32)(input_layout(x, CPU, torch.float32))
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_without_fused_kernels_the_rewrite_still_runs(monkeypatch):
    """A PyTorch without oneDNN's fused primitives (or a CPU it refuses) takes the unfused rewrite."""
    monkeypatch.setattr(fast, "fused_kernels_available", lambda: False)
    model = network("unet3d", "batch")
    rewritten = prepare_for_inference(model, CPU, torch.float32)
    assert not any(isinstance(module, fast._OneDNNConv) for module in rewritten.modules())
    with torch.inference_mode():
        torch.testing.assert_close(rewritten(input_layout(batch(), CPU, torch.float32)), model(batch()),
                                   rtol=1e-5, atol=1e-5)


def small_checkpoint(norm: str = "instance") -> Checkpoint:
    labels = [Label(0, "background"), Label(1, "organ"), Label(2, "lesion")]
    return Checkpoint.from_model(network("unet3d", norm), labels, Preprocessing(spacing=None), (16, 16, 16))


def test_without_native_bfloat16_the_predictor_computes_in_float32(monkeypatch):
    """On a processor without AVX512-BF16 or AMX, 'auto' precision is float32 and exact."""
    monkeypatch.setattr("UNet3DSegmenterLib.runtime.cpu_supports_bf16", lambda: False)
    volume = Volume(np.random.default_rng(0).normal(size=(20, 24, 18)).astype(np.float32))
    auto = Predictor(small_checkpoint(), device="cpu")
    result = auto.predict(volume, probabilities=True)
    assert list(auto._prepared) == [("cpu", torch.float32, 0)]
    plain = Predictor(small_checkpoint(), device="cpu", precision="fp32")
    plain._prepared_model = lambda device, dtype, member=0: plain._models[member]  # the network as trained
    reference = plain.predict(volume, probabilities=True)
    np.testing.assert_allclose(result.probabilities.array, reference.probabilities.array, atol=1e-5)


def test_segments_without_a_compiler_and_without_torch_compile(tmp_path):
    """Most Slicer installs have no C++ compiler: nothing in the fast path may build or compile code."""
    checkpoint_path = tmp_path / "model.pt"
    from UNet3DSegmenterLib.checkpoint import save_checkpoint

    save_checkpoint(small_checkpoint(), checkpoint_path)
    script = f"""
import json, sys
import numpy as np, torch, torch.utils.cpp_extension
def refuse(*args, **kwargs):
    raise RuntimeError("a compiler was asked for")
torch.compile = refuse
torch.utils.cpp_extension.load = torch.utils.cpp_extension.load_inline = refuse
sys.path.insert(0, {str(REPOSITORY)!r})
from UNet3DSegmenterLib import Predictor, Volume
volume = Volume(np.random.default_rng(0).normal(size=(20, 24, 18)).astype(np.float32))
for precision in ("auto", "fp32"):
    result = Predictor({str(checkpoint_path)!r}, device="cpu", precision=precision).predict(volume, probabilities=True)
    print(json.dumps(result.probabilities.array.sum(axis=(1, 2, 3)).tolist()))
"""
    environment = {**os.environ, "PATH": str(tmp_path / "no-compilers-here"), "CC": "/nonexistent/cc",
                   "CXX": "/nonexistent/c++", "UNET3D_SEGMENTER_CACHE": str(tmp_path / "cache")}
    finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr
    volume = Volume(np.random.default_rng(0).normal(size=(20, 24, 18)).astype(np.float32))
    expected = Predictor(checkpoint_path, device="cpu", precision="fp32").predict(volume, probabilities=True)
    sums = json.loads(finished.stdout.splitlines()[-1])
    np.testing.assert_allclose(sums, expected.probabilities.array.sum(axis=(1, 2, 3)), rtol=1e-4)


def test_reuse_freed_memory_nests_and_survives_errors():
    with pytest.raises(ValueError), reuse_freed_memory():
        with reuse_freed_memory():
            torch.zeros(64, 1024, 1024).add_(1)  # 256 MB: above glibc's threshold for fresh pages
        raise ValueError("inside")
    assert runtime._reuse_depth == 0
    with reuse_freed_memory():
        assert torch.ones(8).sum() == 8


def _resident_mb() -> float:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(runtime._glibc() is None, reason="the allocator settings are glibc's (Linux)")
@pytest.mark.parametrize("returned", [False, True])
def test_one_off_work_inside_a_reuse_block_gives_its_memory_back(returned):
    """What a network conversion frees is kept by the heap inside a reuse block, unless it runs in
    return_freed_memory; either way the block goes on keeping what the windows after it free."""
    with reuse_freed_memory():
        before = _resident_mb()
        with return_freed_memory() if returned else contextlib.nullcontext():
            one_off = torch.zeros(64, 1024, 1024).add_(1)  # 256 MB
            del one_off
        after_one_off = _resident_mb()
        window = torch.zeros(64, 1024, 1024).add_(1)
        del window
        after_window = _resident_mb()
    assert (after_one_off - before < 64) == returned
    assert after_window - before > 192


@needs_bf16_kernels
@pytest.mark.slow
def test_bfloat16_labelmaps_equal_float32_on_the_bundled_model(shared_dataset):
    """On a trained model every fast path (bf16) gives the fp32 labelmap for at least 99.9% of voxels."""
    images = shared_dataset("msd_hippocampus") / "images"
    names = json.loads((BUNDLED.parent / "hippocampus_split.json").read_text())["validation"][:8]
    checkpoint = load_checkpoint(BUNDLED)
    reference = Predictor(checkpoint, device="cpu", precision="fp32")
    reference._prepared_model = lambda device, dtype, member=0: reference._models[member]
    paths = inference_paths(checkpoint.build_model(), CPU, torch.bfloat16)
    same = dict.fromkeys(paths, 0)
    total = 0
    for name in names:
        volume = read_volume(images / f"{name}.nii.gz")
        expected = reference.predict(volume).labelmap.array
        total += expected.size
        for path, forward in paths.items():
            predictor = Predictor(checkpoint, device="cpu", precision="bf16")
            predictor._prepared_model = lambda device, dtype, member=0, forward=forward: forward
            same[path] += int((predictor.predict(volume).labelmap.array == expected).sum())
    for path, count in same.items():
        assert count / total >= 0.999, f"{path}: {count / total:.5f}"


def test_a_frozen_network_runs_as_it_is_and_any_other_is_copied_and_left_alone():
    """The untouched path needs no second set of weights where the caller's network is ready to run
    (the predictor's are); a network in training mode, or asking for gradients, is not changed."""
    def network() -> nn.Module:
        return build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=4, norm="batch"))

    torch.manual_seed(0)
    frozen = freeze(network())
    plain = inference_paths(frozen, CPU, torch.float32)["plain"]
    batch = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        expected = frozen(batch)
        torch.testing.assert_close(plain(batch), expected, rtol=0, atol=0)
    assert plain._forward is frozen
    training = network().train()
    plain = inference_paths(training, CPU, torch.float32)["plain"]
    with torch.inference_mode():
        plain(batch)
    assert plain._forward is not training and training.training
    assert all(parameter.requires_grad for parameter in training.parameters())
