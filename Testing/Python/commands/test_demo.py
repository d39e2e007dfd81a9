"""`unet3d-segmenter demo --fast` runs the whole tool end to end on generated data."""

from __future__ import annotations

import subprocess
import sys

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
