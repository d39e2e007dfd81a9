"""Every kind of processor users have runs the engine, each through its own code path.

oneDNN's ``ONEDNN_MAX_CPU_ISA`` and PyTorch's ``ATEN_CPU_CAPABILITY`` make this machine behave like a
smaller one in a child process, so the AVX2-only path (most laptops: no bfloat16 kernels at all) and
the AVX-512 path without native bf16 run here whatever machine the suite lands on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, save_checkpoint
from UNet3DSegmenterLib.io import read_volume, write_volume
from UNet3DSegmenterLib.labels import Label
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume

REPOSITORY = Path(__file__).resolve().parents[3]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


FLAGS = _cpu_flags()
# name -> (environment, flags the machine needs to play it, what the engine must conclude there)
KINDS = {
    "avx2-only": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, {"avx2"},
                  {"computes_bf16": False, "native_bf16": False, "auto": "float32", "bf16": "float32"}),
    "avx512-without-native-bf16": (
        {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}, {"avx512f", "avx512bw", "avx512vl"},
        {"computes_bf16": True, "native_bf16": False, "auto": "float32", "bf16": "bfloat16"}),
    "native-bf16": ({}, {"avx512_bf16"},
                    {"computes_bf16": True, "native_bf16": True, "auto": "bfloat16", "bf16": "bfloat16"}),
}

CHILD = """
import json, logging, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from UNet3DSegmenterLib import Predictor
from UNet3DSegmenterLib.inference.calibration import CalibratedForward
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.runtime import cpu_computes_bf16, cpu_supports_bf16, resolve_precision
cpu = torch.device("cpu")
volume = read_volume(sys.argv[3])
report = {"computes_bf16": cpu_computes_bf16(), "native_bf16": cpu_supports_bf16(),
          "auto": str(resolve_precision("auto", cpu)).replace("torch.", ""),
          "bf16": str(resolve_precision("bf16", cpu)).replace("torch.", ""), "probabilities": {}}
for precision in ("auto", "bf16", "fp32"):
    result = Predictor(sys.argv[2], device="cpu", precision=precision).predict(volume, probabilities=True)
    np.save(f"{sys.argv[4]}/{precision}.npy", result.probabilities.array)
predictor = Predictor(sys.argv[2], device="cpu")
forward = CalibratedForward(predictor._models[0], cpu, torch.bfloat16)  # bf16 asked for directly, past the check
with torch.inference_mode():
    logits = forward(torch.randn(1, 1, 16, 16, 16))
report["bf16_paths"] = {"chosen": forward.choices[(1, 1, 16, 16, 16)], "finite": bool(torch.isfinite(logits).all())}
print(json.dumps(report))
"""


def small_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=3, base_width=4, norm="instance"))
    labels = [Label(0, "background"), Label(1, "organ"), Label(2, "lesion")]
    return save_checkpoint(Checkpoint.from_model(model, labels, Preprocessing(spacing=None), (16, 16, 16)), path)


def image(path: Path) -> Path:
    array = np.random.default_rng(0).normal(size=(20, 24, 18)).astype(np.float32)
    write_volume(Volume(array, spacing=(1.0, 1.2, 2.0)), path)
    return path


def run_as(kind: str, *arguments: str, tmp_path: Path) -> subprocess.CompletedProcess:
    environment, needed, _ = KINDS[kind]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the {kind} processor kind is an x86 one; this is {platform.machine()}")
    if not needed <= FLAGS:
        pytest.skip(f"this processor cannot play {kind}: it lacks {', '.join(sorted(needed - FLAGS))}")
    child_environment = {**os.environ, **environment, "UNET3D_SEGMENTER_CACHE": str(tmp_path / f"cache-{kind}"),
                         "UNET3D_SEGMENTER_OPENVINO": "0"}  # PyTorch's own paths
    return subprocess.run([sys.executable, *arguments], env=child_environment, capture_output=True, text=True,
                          timeout=300, cwd=REPOSITORY)  # `-m UNet3DSegmenterLib` is this working tree's


@pytest.mark.parametrize("kind", KINDS)
def test_every_processor_kind_segments_in_the_precision_it_can_compute(kind, tmp_path):
    checkpoint, volume = small_checkpoint(tmp_path / "model.pt"), image(tmp_path / "image.nii.gz")
    finished = run_as(kind, "-c", CHILD, str(REPOSITORY), str(checkpoint), str(volume), str(tmp_path),
                      tmp_path=tmp_path)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.splitlines()[-1])
    expected = KINDS[kind][2]
    assert {key: report[key] for key in expected} == expected
    assert report["bf16_paths"]["finite"]
    if not expected["computes_bf16"]:
        # oneDNN refuses bf16 convolutions here: the calibration drops the rewrite for the untouched network
        assert report["bf16_paths"]["chosen"] == "autocast"
        assert "bf16 was asked for, but this processor has no bfloat16 kernels" in finished.stderr
        assert finished.stderr.count("bf16 was asked for") == 1  # said once a run, not once a case
    probabilities = {name: np.load(tmp_path / f"{name}.npy") for name in ("auto", "bf16", "fp32")}
    reference = float32_reference(checkpoint, volume)
    np.testing.assert_allclose(probabilities["fp32"], reference, atol=1e-5)
    for precision in ("auto", "bf16"):
        if report[precision] == "float32":  # the same dtype, so the same path: bit-identical
            np.testing.assert_array_equal(probabilities[precision], probabilities["fp32"])
        else:
            assert np.abs(probabilities[precision] - reference).mean() < 0.02


def float32_reference(checkpoint: Path, volume: Path) -> np.ndarray:
    """Probabilities of the network exactly as trained, in float32, with no fast path."""
    from UNet3DSegmenterLib.inference.predictor import Predictor

    predictor = Predictor(checkpoint, device="cpu", precision="fp32")
    predictor._prepared_model = lambda device, dtype, member=0: predictor._models[member]
    result = predictor.predict(read_volume(volume), probabilities=True)
    assert result.probabilities is not None
    return result.probabilities.array


def test_predict_bf16_on_an_avx2_only_processor_says_so_in_one_line_and_computes_float32(tmp_path):
    checkpoint, volume = small_checkpoint(tmp_path / "model.pt"), image(tmp_path / "image.nii.gz")
    outputs = {}
    for precision in ("bf16", "fp32"):
        outputs[precision] = tmp_path / f"{precision}.nii.gz"
        finished = run_as("avx2-only", "-m", "UNet3DSegmenterLib", "predict", "-c", str(checkpoint), "-i", str(volume),
                          "-o", str(outputs[precision]), "--precision", precision, tmp_path=tmp_path)
        assert finished.returncode == 0, finished.stderr
        assert "Traceback" not in finished.stderr
        notices = [line for line in finished.stderr.splitlines() if "bf16 was asked for" in line]
        assert len(notices) == (1 if precision == "bf16" else 0), finished.stderr
    np.testing.assert_array_equal(read_volume(outputs["bf16"]).array, read_volume(outputs["fp32"]).array)
