"""Checkpoints describe themselves, load safely and are written whole or not at all."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import FORMAT_VERSION, Checkpoint, Label, load_checkpoint, save_checkpoint
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.metrics import dice
from UNet3DSegmenterLib.models import UNet3D
from UNet3DSegmenterLib.preprocess import Preprocessing

BUNDLED_MODEL = Path(__file__).resolve().parents[3] / "Resources" / "Models" / "hippocampus.pt"

LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "liver", (0.8, 0.3, 0.2)), Label(3, "tumour", (0.1, 0.9, 0.1))]


def small_checkpoint(**training) -> Checkpoint:
    torch.manual_seed(0)
    model = UNet3D(1, 3, depth=3, base_width=4)
    preprocessing = Preprocessing(spacing=(0.8, 0.8, 2.5), normalization="ct", clip=(-100, 200), mean=50, std=40)
    return Checkpoint.from_model(model, LABELS, preprocessing, (16, 32, 32), overlap=0.25, training=training)


def test_checkpoint_round_trips_every_field(tmp_path):
    original = small_checkpoint(epochs=3, dice={"liver": 0.9})
    loaded = load_checkpoint(save_checkpoint(original, tmp_path / "model.pt"))
    assert loaded.labels == original.labels
    assert loaded.preprocessing == original.preprocessing
    assert loaded.patch_size == (16, 32, 32) and loaded.overlap == 0.25
    assert loaded.training == {"epochs": 3, "dice": {"liver": 0.9}}
    for key, value in original.state_dict.items():
        assert torch.equal(loaded.state_dict[key], value)


def test_rebuilt_model_computes_the_same_output(tmp_path):
    original = small_checkpoint()
    loaded = load_checkpoint(save_checkpoint(original, tmp_path / "model.pt"))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(original.build_model()(x), loaded.build_model()(x))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    record = small_checkpoint().to_dict()
    record["training"] = {"note": _Payload()}
    with open(path, "wb") as handle:
        pickle.dump(record, handle)  # old-style pickle, as a hostile file would be
    torch.save(record, tmp_path / "evil2.pt")
    for candidate in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UserError, match="refused|cannot read"):
            load_checkpoint(candidate)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("preprocessing, version", [
    (Preprocessing(spacing=(1, 1, 1)), 1),
    (Preprocessing(size=(16, 32, 32)), 2),
    (Preprocessing(spacing=(1, 1, 1), normalization="window", clip=(-160, 240)), 2),
])
def test_a_checkpoint_is_written_in_the_oldest_format_that_holds_it(tmp_path, preprocessing, version):
    # Format-1 readers would ignore a resize and predict on the wrong grid: such checkpoints say format 2.
    checkpoint = dataclasses.replace(small_checkpoint(), preprocessing=preprocessing)
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    assert torch.load(path, weights_only=True)["format_version"] == version
    assert load_checkpoint(path).preprocessing == preprocessing


def test_bundled_model_is_a_format_1_checkpoint_that_still_segments_a_validation_case(shared_dataset):
    checkpoint = load_checkpoint(BUNDLED_MODEL)
    assert torch.load(BUNDLED_MODEL, weights_only=True)["format_version"] == 1
    assert checkpoint.preprocessing.size is None and checkpoint.preprocessing.normalization == "zscore"
    folder = shared_dataset("msd_hippocampus")  # hippocampus_011 is in the model's validation split
    image, reference = (read_volume(folder / kind / "hippocampus_011.nii.gz") for kind in ("images", "labels"))
    labelmap = Predictor(checkpoint, device="cpu", precision="fp32").predict(image).labelmap
    for value in (1, 2):  # anterior and posterior hippocampus
        assert dice(labelmap.array == value, np.asarray(reference.array) == value) > 0.85


def test_newer_format_version_is_refused(tmp_path):
    record = small_checkpoint().to_dict()
    record["format_version"] = FORMAT_VERSION + 1
    torch.save(record, tmp_path / "future.pt")
    with pytest.raises(UserError, match="newer"):
        load_checkpoint(tmp_path / "future.pt")


def test_missing_fields_are_named(tmp_path):
    record = small_checkpoint().to_dict()
    del record["labels"], record["inference"]
    torch.save(record, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="labels, inference"):
        load_checkpoint(tmp_path / "partial.pt")


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    record = small_checkpoint().to_dict()
    record["architecture_args"]["base_width"] = 8
    torch.save(record, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="inconsistent"):
        load_checkpoint(tmp_path / "mismatch.pt")


def test_foreign_and_missing_files_are_user_errors(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="not a unet3d-segmenter checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_failed_save_keeps_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = save_checkpoint(small_checkpoint(epochs=1), tmp_path / "last.pt")

    def crash(obj, file, *args, **kwargs):
        open(file, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(UserError, match="last.pt: the write stopped part-way .*disk is full"):
        save_checkpoint(small_checkpoint(epochs=2), path)
    assert load_checkpoint(path).training == {"epochs": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_info_describes_the_checkpoint_in_words(tmp_path):
    path = save_checkpoint(small_checkpoint(epochs=5), tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", "info", str(path)],
                            capture_output=True, text=True, check=True)
    for expected in ["unet3d", "parameters", "liver", "tumour", "0.8 x 0.8 x 2.5 mm", "clip -100..200",
                     "16 x 32 x 32", "epochs 5"]:
        assert expected in result.stdout
