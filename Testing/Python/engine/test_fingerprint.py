"""The training fingerprint: recorded in checkpoints, printed by info, compared with each input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Ensemble, load_checkpoint, save_checkpoint
from UNet3DSegmenterLib.datalist import load_datalist
from UNet3DSegmenterLib.fingerprint import TrainingFingerprint
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.labels import Label
from UNet3DSegmenterLib.models import UNet3D
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.training.planning import training_fingerprint
from UNet3DSegmenterLib.training.splits import read_split
from UNet3DSegmenterLib.volume import Volume

REPOSITORY = Path(__file__).resolve().parents[3]
MODELS = REPOSITORY / "Resources" / "Models"
BUNDLED_WEIGHTS_SHA256 = "b546de1cf381d2827ca62c519e9edf5a90e8f2ad8abd6ba6fe7af35805444b0f"
"""Of the bundled model's weights before its fingerprint was added (keys and bytes, in key order)."""

CROPS = TrainingFingerprint.from_measurements(
    extents=[(31, 40, 26), (35, 50, 35), (42, 59, 47)], spacings=[(1, 1, 1), (1, 1, 1.2), (0.9, 1, 1)],
    percentiles=[(0, 10, 90), (1, 20, 100), (2, 30, 300)], modality="MRI")


def volume(shape_zyx, spacing=(1.0, 1.0, 1.0)) -> Volume:
    return Volume(np.zeros(shape_zyx, np.float32), spacing)


def small_checkpoint(fingerprint: TrainingFingerprint | None) -> Checkpoint:
    torch.manual_seed(0)
    labels = [Label(0, "background", (0, 0, 0)), Label(1, "organ", (1, 0, 0))]
    return Checkpoint.from_model(UNet3D(1, 2, depth=2, base_width=2), labels, Preprocessing((1.0, 1.0, 1.0)),
                                 (16, 16, 16), fingerprint=fingerprint)


def weights_digest(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].numpy().tobytes())
    return digest.hexdigest()


def test_summary_of_the_cases_per_axis():
    assert CROPS.cases == 3
    assert CROPS.extent_min == (31, 40, 26) and CROPS.extent_median == (35, 50, 35) and CROPS.extent_max == (42, 59, 47)
    assert CROPS.spacing_min == (0.9, 1, 1) and CROPS.spacing_max == (1, 1, 1.2)
    assert CROPS.box_max == 42 * 59 * 47
    assert CROPS.intensity_median == (1, 20, 100) and CROPS.intensity_max == (2, 30, 300)


def test_a_checkpoint_carries_it_through_a_weights_only_load(tmp_path):
    path = save_checkpoint(small_checkpoint(CROPS), tmp_path / "model.pt")
    record = torch.load(path, weights_only=True)  # plain types only
    assert record["fingerprint"]["extent_mm"]["median"] == [35, 50, 35]
    assert load_checkpoint(path).fingerprint == CROPS


def test_checkpoints_without_one_still_load_and_say_so(tmp_path):
    path = save_checkpoint(small_checkpoint(None), tmp_path / "old.pt")
    assert "fingerprint" not in torch.load(path, weights_only=True)
    assert load_checkpoint(path).fingerprint is None
    info = subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", "info", str(path)], capture_output=True,
                          text=True, check=True, cwd=REPOSITORY).stdout
    assert "trained on:     not recorded" in info


def test_an_ensemble_keeps_its_members_fingerprint(tmp_path):
    ensemble = Ensemble([small_checkpoint(CROPS), small_checkpoint(None)])
    loaded = load_checkpoint(save_checkpoint(ensemble, tmp_path / "ensemble.pt"))
    assert isinstance(loaded, Ensemble)
    assert [member.fingerprint for member in loaded.members] == [CROPS, None] and loaded.fingerprint == CROPS


def test_a_damaged_fingerprint_is_a_one_line_error(tmp_path):
    record = small_checkpoint(CROPS).to_dict()
    record["fingerprint"] = {"cases": 3}
    torch.save(record, tmp_path / "damaged.pt")
    with pytest.raises(Exception, match="inconsistent checkpoint"):
        load_checkpoint(tmp_path / "damaged.pt")


def test_inputs_like_the_training_crops_raise_no_warning():
    assert CROPS.warnings(volume((47, 59, 42))) == []  # as large as the largest crop
    assert CROPS.warnings(volume((20, 30, 20), (0.5, 0.5, 2.0))) == []  # small, spacing within half..twice


def test_a_whole_head_warns_with_its_size_and_the_training_size():
    [warning] = CROPS.warnings(volume((189, 233, 197)))
    assert warning.startswith("this volume covers 197 x 233 x 189 mm; the model was trained on crops of about "
                              "35 x 50 x 35 mm")
    assert "--roi" in warning and "unreliable" in warning


@pytest.mark.parametrize("shape", [(40, 50, 85), (64, 110, 78)], ids=["one axis over twice", "box over four times"])
def test_an_input_far_larger_on_one_axis_or_in_volume_warns(shape):
    assert len(CROPS.warnings(volume(shape))) == 1


@pytest.mark.parametrize("spacing", [(0.4, 1.0, 1.0), (1.0, 1.0, 2.5)], ids=["finer", "coarser"])
def test_a_spacing_far_outside_the_training_range_warns(spacing):
    [warning] = CROPS.warnings(volume((10, 10, 10), spacing))
    assert warning.startswith("this volume's spacing is ") and "0.9 x 1 x 1 to 1 x 1 x 1.2 mm" in warning


def test_the_bundled_model_has_its_fingerprint_and_unchanged_weights():
    checkpoint = load_checkpoint(MODELS / "hippocampus.pt")
    assert isinstance(checkpoint, Checkpoint)
    assert weights_digest(checkpoint.state_dict) == BUNDLED_WEIGHTS_SHA256
    fingerprint = checkpoint.fingerprint
    assert fingerprint is not None and fingerprint.cases == 166 and fingerprint.modality == "MRI"
    assert fingerprint.extent_median == (35, 50, 35.5) and fingerprint.spacing_max == (1, 1, 1)
    assert torch.load(MODELS / "hippocampus.pt", weights_only=True)["format_version"] == 1
    described = checkpoint.describe()
    for line in ["trained on:     166 cases, modality MRI",
                 "extent:         median 35 x 50 x 36 mm (x, y, z), from 31 x 40 x 26 to 42 x 59 x 47 mm",
                 "spacing range:  1 x 1 x 1 to 1 x 1 x 1 mm (x, y, z)",
                 "intensity:      percentiles 0.5, 50, 99.5: median over cases 23.94, 467.5, 834.5"]:
        assert line in described, line


@pytest.mark.slow
def test_the_bundled_fingerprint_is_that_of_its_training_cases(shared_dataset):
    data = shared_dataset("msd_hippocampus")
    cases = load_datalist(data).subset(read_split(MODELS / "hippocampus_split.json").train)
    recomputed = dataclasses.replace(training_fingerprint(cases), modality="MRI")
    assert load_checkpoint(MODELS / "hippocampus.pt").fingerprint == recomputed
    assert all(recomputed.warnings(read_volume(case.image)) == [] for case in cases[::40])


def test_the_script_adds_a_fingerprint_and_nothing_else(shared_dataset, tmp_path):
    data = shared_dataset("msd_hippocampus")
    old = small_checkpoint(None)
    source = save_checkpoint(old, tmp_path / "old.pt")
    names = sorted(path.name.split(".")[0] for path in (data / "images").iterdir())[:3]
    (tmp_path / "split.json").write_text(json.dumps({"train": names, "validation": []}))
    command = [sys.executable, str(REPOSITORY / "docs" / "add_fingerprint.py"), "--checkpoint", str(source),
               "--split", str(tmp_path / "split.json"), "--data", str(data), "--modality", "MRI"]
    refused = subprocess.run(command + ["--output", str(source)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --output") and "Traceback" not in refused.stderr
    subprocess.run(command + ["--output", str(tmp_path / "new.pt")], capture_output=True, text=True, check=True)
    before, after = torch.load(source, weights_only=True), torch.load(tmp_path / "new.pt", weights_only=True)
    assert set(after) - set(before) == {"fingerprint"} and after["fingerprint"]["cases"] == 3
    assert weights_digest(after["state_dict"]) == weights_digest(before["state_dict"])
    assert {key: value for key, value in after.items() if key not in ("state_dict", "fingerprint")} == \
        {key: value for key, value in before.items() if key != "state_dict"}
