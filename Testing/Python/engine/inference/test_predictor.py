"""The predictor returns a labelmap on exactly the input's grid, fast path and plain path alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.inference.postprocess import keep_largest_component
from UNet3DSegmenterLib.inference.predictor import Predictor, _reuse_pays
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

    def sliding_window(image, member, compute, accumulate, output, progress, cancel):
        attempts.append((compute.type, accumulate.type))
        if len(attempts) < 3:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return np.zeros(image.shape[-3:], np.uint8)

    predictor._sliding_window = sliding_window
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level("WARNING", logger="UNet3DSegmenterLib"):
        predictor._infer(torch.zeros(1, 8, 8, 8), 0, None, None, None)
    assert attempts == [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cpu")]
    assert "accumulator on the CPU" in caplog.text and "the CPU only" in caplog.text


def test_labelmap_alone_equals_the_argmax_of_the_probabilities():
    """Without probabilities the labelmap comes straight from the window sums; it must be the same."""
    volume = Volume(np.random.default_rng(3).normal(size=(40, 30, 36)).astype(np.float32))
    predictor = Predictor(checkpoint(spacing=None), device="cpu", precision="fp32")
    alone = predictor.predict(volume).labelmap.array
    with_probabilities = predictor.predict(volume, probabilities=True)
    np.testing.assert_array_equal(alone, with_probabilities.labelmap.array)
    assert with_probabilities.probabilities is not None


def test_labelmap_resampled_block_by_block_equals_resampling_the_probabilities():
    """On a model grid unlike the input's, the labelmap alone is resampled in blocks of slices."""
    volume = oblique_input()
    predictor = Predictor(checkpoint(spacing=(1.5, 1.5, 1.5)), device="cpu", precision="fp32")
    alone = predictor.predict(volume).labelmap
    with_probabilities = predictor.predict(volume, probabilities=True).labelmap
    assert alone.same_grid(volume)
    np.testing.assert_array_equal(alone.array, with_probabilities.array)


def test_predict_files_reads_ahead_writes_behind_and_keeps_going_past_a_bad_case(tmp_path):
    from UNet3DSegmenterLib.inference.predictor import predict_file, predict_files
    from UNet3DSegmenterLib.io import read_volume, write_volume

    sources = []
    for index in range(4):
        sources.append(write_volume(oblique_input().with_array(
            np.random.default_rng(index).normal(size=(12, 30, 25)).astype(np.float32)), tmp_path / f"c{index}.nii.gz"))
    (tmp_path / "c2.nii.gz").write_bytes(b"not a volume")
    cases = [(source, tmp_path / "out" / source.name, None) for source in sources]
    predictor = Predictor(checkpoint(), device="cpu", precision="fp32")
    progressed = []
    outcomes = list(predict_files(predictor, cases, lambda index: lambda done, total: progressed.append(index)))
    assert [index for index, _ in outcomes] == [0, 1, 2, 3]
    assert [error is None for _, error in outcomes] == [True, True, False, True]
    assert "c2.nii.gz" in str(outcomes[2][1]) and sorted(set(progressed)) == [0, 1, 3]
    assert not (tmp_path / "out" / "c2.nii.gz").exists()
    for index in (0, 1, 3):
        one_by_one = predict_file(predictor, sources[index], tmp_path / f"single{index}.nii.gz")
        np.testing.assert_array_equal(read_volume(cases[index][1]).array, one_by_one.labelmap.array)


@pytest.mark.slow
def test_large_volume_peak_memory_stays_below_three_times_the_input(tmp_path):
    """Extra memory while segmenting a large volume stays below 3x its float32 size plus what the model
    itself needs (weights and one batch of activations, measured on a one-band volume first): the
    preprocessed copy, one band of window sums and the labelmap, never a class-sized volume."""
    import os
    import subprocess
    import sys

    script = f"""
import ctypes, sys, numpy as np, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[4])!r})
from UNet3DSegmenterLib.checkpoint import Checkpoint, Label
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume

def resident():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

def peak():  # this process's own peak: ru_maxrss would keep the parent's from the fork
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024

torch.manual_seed(0)
model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=2, base_width=4))
labels = [Label(0, "background"), Label(1, "a"), Label(2, "b")]
checkpoint = Checkpoint.from_model(model, labels, Preprocessing(spacing=None), (32, 128, 128))
predictor = Predictor(checkpoint, device="cpu", overlap=0.25)
before = resident()
predictor.predict(Volume(np.zeros((32, 256, 256), np.float32)))  # one band: the model's own needs
model_needs = peak() - before
volume = Volume(np.random.default_rng(0).standard_normal((96, 384, 384), dtype=np.float32))
before = resident()
labelmap = predictor.predict(volume).labelmap.array
print((peak() - before - model_needs) / volume.array.nbytes)
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "UNET3D_SEGMENTER_CACHE": str(tmp_path)})
    assert finished.returncode == 0, finished.stderr
    ratio = float(finished.stdout.split()[-1])
    assert ratio < 3.0, f"peak memory rose by {ratio:.2f}x the input's float32 size beyond the model's needs"


def test_options_and_keywords_configure_the_predictor_and_the_checkpoint_gives_the_overlap():
    import dataclasses

    from UNet3DSegmenterLib.segment_options import SegmentOptions

    recorded = dataclasses.replace(checkpoint(), overlap=0.75)
    assert Predictor(recorded, device="cpu").overlap == 0.75
    predictor = Predictor(recorded, SegmentOptions(device="cpu", overlap=0.25, tta=True), largest_component=True)
    assert (predictor.overlap, predictor.tta, predictor.largest_component) == (0.25, True, True)
    with pytest.raises(TypeError, match="unknown segment option 'mirror'"):
        Predictor(recorded, mirror=True)


def test_the_roi_option_segments_inside_its_box_as_the_roi_argument_does():
    from UNet3DSegmenterLib.roi import RegionOfInterest

    volume = oblique_input()
    corners = (-20.0, -10.0, 6.0, 0.0, 15.0, 30.0)
    chosen = Predictor(checkpoint(), device="cpu", roi=corners).predict(volume).labelmap.array
    given = Predictor(checkpoint(), device="cpu").predict(volume, roi=RegionOfInterest.from_values(corners))
    np.testing.assert_array_equal(chosen, given.labelmap.array)
    whole = Predictor(checkpoint(), device="cpu").predict(volume).labelmap.array
    assert not np.array_equal(chosen, whole), "the box changed nothing: choose one that leaves voxels out"


def test_the_predictor_runs_on_the_checkpoints_own_weights_and_training_gets_a_copy():
    """A second copy of a large network's weights is hundreds of megabytes: the predictor only reads
    them, so it shares the checkpoint's tensors; a network built to train copies them."""
    source = checkpoint(norm="batch")
    predictor = Predictor(source, device="cpu")
    shared = {name: tensor.data_ptr() for name, tensor in predictor._models[0].state_dict().items()}
    assert shared == {name: tensor.data_ptr() for name, tensor in source.state_dict.items()}
    trained = source.build_model()
    assert all(tensor.data_ptr() != shared[name] for name, tensor in trained.state_dict().items())
    half = Checkpoint(source.architecture, source.architecture_args,
                      {name: tensor.half() if tensor.is_floating_point() else tensor
                       for name, tensor in source.state_dict.items()},
                      source.labels, source.preprocessing, source.patch_size)
    converted = half.build_model(share_weights=True)  # another type than the network's: copied, converted
    assert all(parameter.dtype == torch.float32 for parameter in converted.parameters())
    torch.testing.assert_close(converted(torch.ones(1, 1, 16, 16, 16)), trained(torch.ones(1, 1, 16, 16, 16)),
                               rtol=1e-2, atol=1e-2)


def test_freed_memory_is_kept_for_small_batches_and_given_back_for_large_ones():
    """Kept, a large network's activations of many sizes fragmented the heap far above their use."""
    sixteen = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3), torch.nn.Conv3d(16, 64, 3))
    thirty_two = torch.nn.Sequential(torch.nn.Conv3d(1, 32, 3), torch.nn.Conv3d(32, 8, 3))
    assert _reuse_pays(sixteen, 2, (96, 96, 96), torch.float32)  # 113 MB at the first convolution
    assert not _reuse_pays(sixteen, 2, (128, 128, 128), torch.float32)  # 268 MB
    assert not _reuse_pays(thirty_two, 1, (24, 256, 256), torch.float32)  # a full-size nnU-Net window: 201 MB
    assert _reuse_pays(thirty_two, 1, (24, 256, 256), torch.bfloat16)
