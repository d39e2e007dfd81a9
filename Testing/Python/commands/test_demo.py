"""`unet3d-segmenter demo --fast` runs the whole tool end to end on generated data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from UNet3DSegmenterLib.checkpoint import load_checkpoint


def test_fast_demo_trains_segments_and_leaves_its_outputs(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", "demo", "--fast", "--device", "cpu",
                             "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Dice per class" in result.stdout and "organ" in result.stdout and "lesion" in result.stdout
    checkpoint = load_checkpoint(output / "model" / "best.pt")
    assert [label.name for label in checkpoint.foreground_labels] == ["organ", "lesion"]
    for produced in ["model/curves.png", "model/log.csv", "overlay.png"]:
        assert (output / produced).stat().st_size > 0
    assert len(list((output / "predictions").glob("*.nii.gz"))) == 1


@pytest.mark.slow
def test_the_demo_run_again_replaces_its_own_model_but_never_another(tmp_path):
    output = tmp_path / "demo"
    command = [sys.executable, "-m", "UNet3DSegmenterLib", "demo", "--fast", "--device", "cpu", "--output", str(output)]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    run = output / "model" / "run.json"
    run.write_text(run.read_text().replace(str((output / "data" / "train").resolve()), str(tmp_path / "mine")))
    model = (output / "model" / "best.pt").read_bytes()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "already holds a model" in result.stderr
    assert (output / "model" / "best.pt").read_bytes() == model
