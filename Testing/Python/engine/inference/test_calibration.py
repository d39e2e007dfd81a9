"""The fastest inference path is chosen by measuring, once per network, window and machine, then kept."""

from __future__ import annotations

import json

import pytest
import torch

from UNet3DSegmenterLib.inference import calibration
from UNet3DSegmenterLib.inference.calibration import CACHE_FILE, CalibratedForward, cache_folder, measure_paths
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.runtime import cpu_computes_bf16

CPU = torch.device("cpu")
# bfloat16 where this processor computes it (two paths: rewritten, autocast), else float32 (rewritten, plain)
DTYPE = torch.bfloat16 if cpu_computes_bf16() else torch.float32


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of its own, on a processor taken as idle (the test suite itself keeps it busy),
    in a process that has chosen nothing yet."""
    monkeypatch.setenv("UNET3D_SEGMENTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "processor_busy", lambda: False)
    monkeypatch.setattr(calibration, "_chosen", {})
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
    forward = CalibratedForward(model(), CPU, DTYPE)
    with torch.inference_mode():
        logits = forward(batch)
        forward(batch)
    assert logits.shape == (2, 2, 16, 16, 16)
    assert measurements == [(2, 1, 16, 16, 16)]
    entries = list(json.loads((cache / CACHE_FILE).read_text()).values())
    assert len(entries) == 1 and entries[0]["path"] in forward.paths and len(forward.paths) == 2
    assert entries[0]["batch"] == [2, 1, 16, 16, 16] and set(entries[0]["milliseconds"]) == set(forward.paths)
    assert forward.choices == {(2, 1, 16, 16, 16): entries[0]["path"]}


def test_a_later_run_reads_the_cache_and_measures_nothing(cache, measurements):
    batch = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        CalibratedForward(model(), CPU, DTYPE)(batch)
        again = CalibratedForward(model(), CPU, DTYPE)
        again(batch)
    assert len(measurements) == 1
    assert again.choices[(1, 1, 16, 16, 16)] in again.paths


def test_a_new_window_size_or_network_is_measured_anew(cache, measurements):
    with torch.inference_mode():
        CalibratedForward(model(), CPU, DTYPE)(torch.randn(1, 1, 16, 16, 16))
        CalibratedForward(model(), CPU, DTYPE)(torch.randn(1, 1, 16, 16, 24))
        CalibratedForward(model(base_width=8), CPU, DTYPE)(torch.randn(1, 1, 16, 16, 16))
    assert len(measurements) == 3
    assert len(json.loads((cache / CACHE_FILE).read_text())) == 3


def test_a_damaged_cache_file_is_measured_over(cache, measurements):
    cache.mkdir(parents=True)
    (cache / CACHE_FILE).write_text("{not json")
    with torch.inference_mode():
        CalibratedForward(model(), CPU, DTYPE)(torch.randn(1, 1, 16, 16, 16))
    assert len(measurements) == 1
    assert len(json.loads((cache / CACHE_FILE).read_text())) == 1


def test_an_unwritable_cache_folder_only_costs_a_new_measurement_in_a_new_process(tmp_path, monkeypatch,
                                                                                  measurements):
    monkeypatch.setattr(calibration, "processor_busy", lambda: False)
    monkeypatch.setattr(calibration, "_chosen", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("UNET3D_SEGMENTER_CACHE", str(blocker / "cache"))
    with torch.inference_mode():
        first = CalibratedForward(model(), CPU, DTYPE)
        logits = first(torch.randn(1, 1, 16, 16, 16))
        second = CalibratedForward(model(), CPU, DTYPE)  # the same checkpoint again: the same path
        second(torch.randn(1, 1, 16, 16, 16))
    assert logits.shape == (1, 2, 16, 16, 16) and len(measurements) == 1
    assert first.choices == second.choices


def test_a_measurement_on_a_busy_processor_is_kept_so_that_results_stay_the_same(cache, measurements, monkeypatch):
    monkeypatch.setattr(calibration, "processor_busy", lambda: True)
    forward = CalibratedForward(model(), CPU, DTYPE)
    with torch.inference_mode():
        forward(torch.randn(1, 1, 16, 16, 16))
    entries = list(json.loads((cache / CACHE_FILE).read_text()).values())
    assert len(measurements) == 1 and entries[0]["busy"] is True
    assert entries[0]["path"] == forward.choices[(1, 1, 16, 16, 16)]
    monkeypatch.setattr(calibration, "_chosen", {})  # a later process reads the file
    again = CalibratedForward(model(), CPU, DTYPE)
    with torch.inference_mode():
        again(torch.randn(1, 1, 16, 16, 16))
    assert len(measurements) == 1 and again.choices == forward.choices


def test_a_path_that_raises_is_dropped_and_the_next_one_used(cache, measurements):
    """As oneDNN's bf16 convolutions do on an AVX2-only processor."""
    def missing_kernel(batch):
        raise RuntimeError("mkldnn_convolution: bf16 path needs the cpu support avx_ne_convert or avx512bw")

    forward = CalibratedForward(model(), CPU, DTYPE)
    working = dict(forward.paths)
    forward.paths = {"broken": missing_kernel, **working}
    with torch.inference_mode():
        logits = forward(torch.randn(1, 1, 16, 16, 16))
    assert forward.choices[(1, 1, 16, 16, 16)] in working and logits.shape == (1, 2, 16, 16, 16)
    entry = next(iter(json.loads((cache / CACHE_FILE).read_text()).values()))
    assert entry["failed"] == ["broken"] and set(entry["milliseconds"]) == set(working)


def test_when_every_path_raises_the_error_is_the_last_one(cache):
    def missing(message):
        def forward(batch):
            raise RuntimeError(message)
        return forward

    forward = CalibratedForward(model(), CPU, DTYPE)
    forward.paths = {"first": missing("first kernel missing"), "second": missing("second kernel missing")}
    with pytest.raises(RuntimeError, match="second kernel missing"), torch.inference_mode():
        forward(torch.randn(1, 1, 16, 16, 16))


def test_without_calibration_the_rewrite_is_used_unmeasured(cache, measurements):
    forward = CalibratedForward(model(), CPU, DTYPE, calibrate=False)
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


class _Watched:
    """A path that notes, at each of its calls, which of ``lazy``'s paths hold a built network."""

    def __init__(self, path, lazy: dict, notes: list):
        self.path, self.lazy, self.notes = path, lazy, notes

    def __call__(self, batch):
        result = self.path(batch)
        self.notes.append(sorted(name for name, path in self.lazy.items() if path.built))
        return result

    def release(self):
        self.path.release()


def test_paths_are_measured_one_at_a_time_and_only_the_chosen_one_stays(cache):
    """Each path holds a copy of the weights (and its activations in the heap): measuring them side by
    side held them all at once, and the losers stayed for the rest of the run."""
    forward = CalibratedForward(model(), CPU, DTYPE)
    lazy, notes = dict(forward.paths), []
    assert not any(path.built for path in lazy.values())  # nothing is built before a batch comes
    forward.paths = {name: _Watched(path, lazy, notes) for name, path in lazy.items()}
    with torch.inference_mode():
        forward(torch.randn(1, 1, 16, 16, 16))
    chosen = forward.choices[(1, 1, 16, 16, 16)]
    assert len(notes) >= 2 * len(lazy) and all(len(built) == 1 for built in notes)
    assert [name for name, path in lazy.items() if path.built] == [chosen]
    with torch.inference_mode():
        forward(torch.randn(1, 1, 16, 16, 16))
    assert notes[-1] == [chosen]


def test_a_choice_read_from_the_cache_builds_that_path_only(cache):
    with torch.inference_mode():
        CalibratedForward(model(), CPU, DTYPE)(torch.randn(1, 1, 16, 16, 16))
    again = CalibratedForward(model(), CPU, DTYPE)
    with torch.inference_mode():
        again(torch.randn(1, 1, 16, 16, 16))
    assert [name for name, path in again.paths.items() if path.built] == [again.choices[(1, 1, 16, 16, 16)]]
