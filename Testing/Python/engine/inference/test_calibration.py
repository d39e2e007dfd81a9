"""The fastest inference path is chosen by measuring, once per network, window and machine, then remembered."""

from __future__ import annotations

import json

import pytest
import torch

from UNet3DSegmenterLib.inference import calibration
from UNet3DSegmenterLib.inference.calibration import CACHE_FILE, CalibratedForward, cache_folder, measure_paths
from UNet3DSegmenterLib.models import build_model

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of its own, on a processor taken as idle (the test suite itself keeps it busy)."""
    monkeypatch.setenv("UNET3D_SEGMENTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "processor_busy", lambda: False)
    return tmp_path / "cache"


@pytest.fixture
def measurements(monkeypatch):
    """Every call of measure_paths, with the real measurement still done."""
    calls = []

    def counted(paths, batch):
        calls.append(tuple(batch.shape))
        return measure_paths(paths, batch)

    monkeypatch.setattr(calibration, "measure_paths", counted)
    return calls


def model(base_width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=base_width))


def test_first_batch_is_measured_and_the_choice_cached(cache, measurements):
    batch = torch.randn(2, 1, 16, 16, 16)
    forward = CalibratedForward(model(), CPU, torch.bfloat16)
    with torch.inference_mode():
        logits = forward(batch)
        forward(batch)
    assert logits.shape == (2, 2, 16, 16, 16)
    assert measurements == [(2, 1, 16, 16, 16)]
    entries = list(json.loads((cache / CACHE_FILE).read_text()).values())
    assert len(entries) == 1 and entries[0]["path"] in ("rewritten", "autocast")
    assert entries[0]["batch"] == [2, 1, 16, 16, 16] and set(entries[0]["milliseconds"]) == {"rewritten", "autocast"}
    assert forward.choices == {(2, 1, 16, 16, 16): entries[0]["path"]}


def test_a_later_run_reads_the_cache_and_measures_nothing(cache, measurements):
    batch = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        CalibratedForward(model(), CPU, torch.bfloat16)(batch)
        again = CalibratedForward(model(), CPU, torch.bfloat16)
        again(batch)
    assert len(measurements) == 1
    assert again.choices[(1, 1, 16, 16, 16)] in again.paths


def test_a_new_window_size_or_network_is_measured_anew(cache, measurements):
    with torch.inference_mode():
        CalibratedForward(model(), CPU, torch.bfloat16)(torch.randn(1, 1, 16, 16, 16))
        CalibratedForward(model(), CPU, torch.bfloat16)(torch.randn(1, 1, 16, 16, 24))
        CalibratedForward(model(base_width=8), CPU, torch.bfloat16)(torch.randn(1, 1, 16, 16, 16))
    assert len(measurements) == 3
    assert len(json.loads((cache / CACHE_FILE).read_text())) == 3


def test_a_damaged_cache_file_is_measured_over(cache, measurements):
    cache.mkdir(parents=True)
    (cache / CACHE_FILE).write_text("{not json")
    with torch.inference_mode():
        CalibratedForward(model(), CPU, torch.bfloat16)(torch.randn(1, 1, 16, 16, 16))
    assert len(measurements) == 1
    assert len(json.loads((cache / CACHE_FILE).read_text())) == 1


def test_an_unwritable_cache_folder_only_costs_a_new_measurement(tmp_path, monkeypatch, measurements):
    monkeypatch.setattr(calibration, "processor_busy", lambda: False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("UNET3D_SEGMENTER_CACHE", str(blocker / "cache"))
    with torch.inference_mode():
        logits = CalibratedForward(model(), CPU, torch.bfloat16)(torch.randn(1, 1, 16, 16, 16))
    assert logits.shape == (1, 2, 16, 16, 16) and len(measurements) == 1


def test_a_measurement_on_a_busy_processor_is_used_but_not_remembered(cache, measurements, monkeypatch):
    monkeypatch.setattr(calibration, "processor_busy", lambda: True)
    forward = CalibratedForward(model(), CPU, torch.bfloat16)
    with torch.inference_mode():
        forward(torch.randn(1, 1, 16, 16, 16))
    assert len(measurements) == 1 and forward.choices[(1, 1, 16, 16, 16)] in forward.paths
    assert not (cache / CACHE_FILE).exists()


def test_without_calibration_the_rewrite_is_used_unmeasured(cache, measurements):
    forward = CalibratedForward(model(), CPU, torch.bfloat16, calibrate=False)
    with torch.inference_mode():
        forward(torch.randn(1, 1, 16, 16, 16))
    assert measurements == [] and forward.choices == {(1, 1, 16, 16, 16): "rewritten"}
    assert not (cache / CACHE_FILE).exists()


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNET3D_SEGMENTER_CACHE", str(tmp_path))
    assert cache_folder() == tmp_path
    monkeypatch.delenv("UNET3D_SEGMENTER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if cache_folder().parent == tmp_path / "xdg":  # Linux and other XDG platforms
        assert cache_folder().name == "unet3d-segmenter"
