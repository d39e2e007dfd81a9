"""The optional OpenVINO path computes the network as PyTorch does, converts it once, and is chosen by measuring."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import load_checkpoint
from UNet3DSegmenterLib.inference import calibration, openvino_path
from UNet3DSegmenterLib.inference.calibration import CACHE_FILE, CalibratedForward
from UNet3DSegmenterLib.inference.fast import inference_paths
from UNet3DSegmenterLib.inference.openvino_path import FOLDER, OpenVINOForward, openvino_available
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.models import build_model

pytest.importorskip("openvino", reason="OpenVINO is an optional extra: pip install '.[openvino]'")

CPU = torch.device("cpu")
REPOSITORY = Path(__file__).resolve().parents[4]
BUNDLED = REPOSITORY / "Resources" / "Models" / "hippocampus.pt"


@pytest.fixture(autouse=True)
def offered(monkeypatch, tmp_path):
    """OpenVINO offered (the suite at large turns it off), with a cache folder of this test's own."""
    monkeypatch.setenv(openvino_path.ON_ENVIRONMENT, "1")
    monkeypatch.setenv("UNET3D_SEGMENTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "_chosen", {})
    return tmp_path / "cache"


def network(architecture: str, norm: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    depth = 4 if architecture == "resnet18unet" else 3
    return build_model(architecture, dict(in_channels=1, out_channels=3, depth=depth, base_width=4, norm=norm)).eval()


def batch() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 5 + 3


@pytest.mark.parametrize("architecture, norm", [("unet3d", "instance"), ("unet3d", "batch"), ("resunet3d", "instance"),
                                                ("resnet18unet", "batch"), ("vnet", "none")])
def test_openvino_computes_the_network_as_pytorch_does_in_float32(architecture, norm):
    model = network(architecture, norm)
    with torch.inference_mode():
        expected = model(batch())
    result = OpenVINOForward(model, torch.float32)(batch())
    assert result.dtype == torch.float32 and result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_each_batch_shape_is_compiled_for_itself_from_one_conversion(monkeypatch):
    model = network("unet3d", "batch")
    forward = OpenVINOForward(model, torch.float32)
    conversions = []
    convert = OpenVINOForward._convert
    monkeypatch.setattr(OpenVINOForward, "_convert", lambda self, batch: conversions.append(1) or convert(self, batch))
    for shape in [(2, 1, 16, 16, 16), (1, 1, 16, 16, 16), (1, 1, 16, 24, 32), (2, 1, 16, 16, 16)]:
        batch = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            torch.testing.assert_close(forward(batch), model(batch), rtol=1e-4, atol=1e-4)
    assert len(forward._requests) == 3 and conversions == [1]


def test_a_network_is_converted_once_and_read_back_later(offered, monkeypatch):
    model = network("unet3d", "instance")
    first = OpenVINOForward(model, torch.float32)(batch())
    kept = sorted(path.name for path in (offered / FOLDER).glob("*.*"))
    assert len(kept) == 2 and {Path(name).suffix for name in kept} == {".xml", ".bin"}
    assert not list((offered / FOLDER).glob(".*partial*"))

    def converting(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(OpenVINOForward, "_convert", converting)
    torch.testing.assert_close(OpenVINOForward(network("unet3d", "instance"), torch.float32)(batch()), first)
    with pytest.raises(RuntimeError, match="converted again"):  # other weights are another network
        OpenVINOForward(network("unet3d", "instance", seed=1), torch.float32)(batch())


def test_the_path_is_offered_where_openvino_is_installed_unless_turned_off(monkeypatch):
    assert "openvino" in inference_paths(network("unet3d", "batch"), CPU, torch.float32)
    monkeypatch.delenv(openvino_path.ON_ENVIRONMENT)
    assert openvino_available()  # on wherever it is installed, unless turned off
    monkeypatch.setenv(openvino_path.ON_ENVIRONMENT, "0")
    assert not openvino_available()
    assert "openvino" not in inference_paths(network("unet3d", "batch"), CPU, torch.float32)


def test_the_calibration_measures_it_beside_the_others(offered):
    forward = CalibratedForward(network("unet3d", "batch"), CPU, torch.float32)
    with torch.inference_mode():
        forward(batch())
    entry = next(iter(json.loads((offered / CACHE_FILE).read_text()).values()))
    assert set(entry["milliseconds"]) == {"rewritten", "plain", "openvino"} and entry["failed"] == []


def test_a_network_openvino_cannot_read_is_left_to_the_other_paths(offered, monkeypatch):
    def unreadable(self, batch):
        raise ValueError("an operation OpenVINO does not know")

    monkeypatch.setattr(OpenVINOForward, "_convert", unreadable)
    forward = CalibratedForward(network("unet3d", "batch"), CPU, torch.float32)
    with torch.inference_mode():
        forward(batch())
    assert forward.choices[tuple(batch().shape)] in ("rewritten", "plain")
    entry = next(iter(json.loads((offered / CACHE_FILE).read_text()).values()))
    assert entry["failed"] == ["openvino"]


def test_openvino_sends_nothing_anywhere(tmp_path):
    """Only the runtime and its PyTorch front end are used, never the converter that reports usage:
    no telemetry session starts and nothing opens a network connection."""
    script = f"""
import socket, sys, torch
attempts = []
socket.socket.connect = socket.socket.connect_ex = lambda self, *address: attempts.append(address)
import openvino_telemetry.main
openvino_telemetry.main.Telemetry.init = lambda *args, **kwargs: attempts.append("telemetry")
sys.path.insert(0, {str(REPOSITORY)!r})
from UNet3DSegmenterLib.inference.openvino_path import OpenVINOForward
from UNet3DSegmenterLib.models import build_model
model = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=4)).eval()
print(OpenVINOForward(model, torch.float32)(torch.randn(1, 1, 8, 8, 8)).shape, attempts)
"""
    environment = {**os.environ, "UNET3D_SEGMENTER_CACHE": str(tmp_path)}
    finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "torch.Size([1, 2, 8, 8, 8]) []"


@pytest.mark.slow
def test_openvino_labelmaps_equal_pytorchs_on_the_bundled_model(shared_dataset, monkeypatch):
    """Pinned to PyTorch: on the trained model, its labelmaps equal float32 PyTorch's on >= 99.99% of voxels."""
    images = shared_dataset("msd_hippocampus") / "images"
    names = json.loads((BUNDLED.parent / "hippocampus_split.json").read_text())["validation"][:6]
    checkpoint = load_checkpoint(BUNDLED)
    reference = Predictor(checkpoint, device="cpu", precision="fp32")
    reference._prepared_model = lambda device, dtype, member=0: reference._models[member]
    monkeypatch.setenv(calibration.PATH_ENVIRONMENT, "openvino")
    openvino = Predictor(checkpoint, device="cpu", precision="fp32")
    same = total = 0
    for name in names:
        volume = read_volume(images / f"{name}.nii.gz")
        expected = reference.predict(volume).labelmap.array
        result = openvino.predict(volume).labelmap.array
        same, total = same + int(np.sum(result == expected)), total + expected.size
    assert openvino._prepared[("cpu", torch.float32, 0)].choices == {
        shape: "openvino" for shape in openvino._prepared[("cpu", torch.float32, 0)].choices}
    assert same / total >= 0.9999, same / total


def signal_stack() -> tuple[int | None, int, int]:
    """This thread's alternate signal stack: (address, flags, size), read with Linux's ``stack_t``."""
    class Stack(ctypes.Structure):
        _fields_ = [("address", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

    stack = Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    return stack.address, stack.flags, stack.size


@pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack's stack_t is read with Linux's layout")
def test_compiled_networks_leave_the_thread_on_its_own_signal_stack():
    before = signal_stack()
    model = network("unet3d", "batch")
    forwards = [OpenVINOForward(model, torch.float32) for _ in range(2)]
    for forward in forwards:  # several compiled networks, destroyed in the order they came (not the reverse)
        for shape in [(2, 1, 16, 16, 16), (1, 1, 16, 16, 16), (1, 1, 16, 24, 32)]:
            forward(torch.randn(*shape))
        assert signal_stack() == before
    del forward
    forwards.clear()
    gc.collect()
    assert signal_stack() == before


def test_the_converted_network_is_not_kept_in_memory_where_the_cache_keeps_it(offered, tmp_path):
    """Its weights are a copy of the model's: read back from the cache folder for another batch shape,
    and kept in memory only where that folder cannot be written."""
    model = network("unet3d", "batch")
    kept = OpenVINOForward(model, torch.float32)
    kept(batch())
    assert kept._network is None and list((offered / FOLDER).glob("*.xml"))
    (tmp_path / "not a folder").write_text("")
    unwritable = OpenVINOForward(model, torch.float32, cache=tmp_path / "not a folder")
    unwritable(batch())
    assert unwritable._network is not None
    smaller = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(unwritable(smaller), model(smaller), rtol=1e-4, atol=1e-4)


def test_a_network_in_training_mode_is_converted_as_in_eval_mode_and_left_as_it_was(offered):
    model = network("unet3d", "batch").train()
    result = OpenVINOForward(model, torch.float32)(batch())
    assert model.training
    with torch.inference_mode():
        expected = model.eval()(batch())
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_working_buffers_given_back_are_allocated_again_at_the_next_batch():
    model = network("unet3d", "instance")
    forward = inference_paths(model, CPU, torch.float32)["openvino"]  # as the calibration holds it
    forward.release_memory()  # not built yet: nothing to give back
    first = forward(batch())
    forward.release_memory()
    torch.testing.assert_close(forward(batch()), first, rtol=0, atol=0)
    forward.release_memory()
    forward.release_memory()  # twice in a row, and with nothing compiled, is harmless
    OpenVINOForward(model, torch.float32).release_memory()
