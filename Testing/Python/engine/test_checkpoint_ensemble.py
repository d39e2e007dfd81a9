"""Ensemble checkpoints: one file, loaded safely, made from files or folders; single networks unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from UNet3DSegmenterLib.checkpoint import (
    ENSEMBLE_FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    Ensemble,
    checkpoint_files,
    load_checkpoint,
    load_ensemble,
    load_single_checkpoint,
    save_checkpoint,
)
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.labels import Label
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing

REPOSITORY = Path(__file__).resolve().parents[3]
BUNDLED = REPOSITORY / "Resources" / "Models" / "hippocampus.pt"
LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "liver", (0.8, 0.3, 0.2)), Label(2, "tumour", (0.1, 0.9, 0.1))]


def network(seed: int, architecture: str = "unet3d", patch_size=(16, 16, 16), labels=LABELS,
            spacing=(1.0, 1.0, 2.0), channels: int = 1) -> Checkpoint:
    torch.manual_seed(seed)
    model = build_model(architecture, dict(in_channels=channels, out_channels=len(labels), depth=3, base_width=4))
    preprocessing = Preprocessing(spacing=spacing, channels=channels)
    return Checkpoint.from_model(model, labels, preprocessing, patch_size, overlap=0.25, training={"seed": seed})


def same_weights(first: Checkpoint, second: Checkpoint) -> bool:
    return first.state_dict.keys() == second.state_dict.keys() and all(
        torch.equal(first.state_dict[key], second.state_dict[key]) for key in first.state_dict)


def test_an_ensemble_is_one_file_that_loads_with_weights_only(tmp_path):
    members = [network(0), network(1, "vnet", (16, 32, 32))]
    path = save_checkpoint(Ensemble(members, {"folds": 2}), tmp_path / "ensemble.pt")
    record = torch.load(path, weights_only=True)
    assert record["format_version"] == ENSEMBLE_FORMAT and len(record["members"]) == 2
    assert "state_dict" not in record  # a reader of format 1 cannot mistake it for one network
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Ensemble) and loaded.training == {"folds": 2}
    assert [member.architecture for member in loaded.members] == ["unet3d", "vnet"]
    assert [member.patch_size for member in loaded.members] == [(16, 16, 16), (16, 32, 32)]
    assert all(same_weights(a, b) for a, b in zip(members, loaded.members))
    assert [member.training for member in loaded.members] == [{"seed": 0}, {"seed": 1}]
    assert loaded.labels == LABELS and loaded.preprocessing == members[0].preprocessing
    assert loaded.overlap == 0.25 and loaded.in_channels == 1


def test_one_network_is_still_written_and_read_as_format_1(tmp_path):
    path = save_checkpoint(network(0), tmp_path / "one.pt")
    assert torch.load(path, weights_only=True)["format_version"] == 1 < FORMAT_VERSION
    assert isinstance(load_checkpoint(path), Checkpoint)
    bundled = load_checkpoint(BUNDLED)
    assert isinstance(bundled, Checkpoint) and [label.name for label in bundled.foreground_labels] == \
        ["anterior", "posterior"]


def test_a_list_of_checkpoints_is_an_ensemble_of_all_their_networks(tmp_path):
    first = save_checkpoint(network(0), tmp_path / "a.pt")
    pair = save_checkpoint(Ensemble([network(1), network(2)]), tmp_path / "pair.pt")
    joined = load_checkpoint([first, pair])
    assert isinstance(joined, Ensemble) and len(joined.members) == 3
    assert [member.training["seed"] for member in joined.members] == [0, 1, 2]
    assert isinstance(load_checkpoint([first]), Checkpoint)
    single = load_ensemble(first)
    assert isinstance(single, Ensemble) and len(single.members) == 1


def cross_validation_folder(root: Path, folds: int = 3) -> Path:
    for fold in range(folds):
        save_checkpoint(network(fold), root / f"fold_{fold}" / "best.pt")
        save_checkpoint(network(100 + fold), root / f"fold_{fold}" / "last.pt")
    save_checkpoint(network(99), root / "fold_10" / "best.pt")  # folds sort by number, not by name
    return root


def test_a_folder_stands_for_its_folds_its_best_checkpoint_or_its_files(tmp_path):
    folds = cross_validation_folder(tmp_path / "cv")
    assert checkpoint_files(folds) == [folds / f"fold_{fold}" / "best.pt" for fold in (0, 1, 2, 10)]
    model = load_checkpoint(folds)
    assert isinstance(model, Ensemble) and [member.training["seed"] for member in model.members] == [0, 1, 2, 99]
    run = tmp_path / "cv" / "fold_1"  # a training output: best.pt, not last.pt
    assert checkpoint_files(run) == [run / "best.pt"] and load_checkpoint(run).training == {"seed": 1}
    plain = tmp_path / "plain"
    for name in ("b.pt", "a.pt"):
        save_checkpoint(network(len(name)), plain / name)
    assert checkpoint_files(plain) == [plain / "a.pt", plain / "b.pt"]


@pytest.mark.parametrize("layout, message", [
    ({}, "holds no checkpoints"),
    ({"fold_0/best.pt": True, "fold_1/last.pt": True}, "fold_1 holds no best.pt yet"),
])
def test_folders_without_usable_checkpoints_are_refused(tmp_path, layout, message):
    for name in layout:
        save_checkpoint(network(0), tmp_path / name)
    with pytest.raises(UserError, match=message):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("other, message", [
    (dict(labels=LABELS[:2]), r"b.pt cannot join an ensemble with .*a.pt: its labels \(1 liver\) differ"),
    (dict(spacing=(1.0, 1.0, 1.0)), "its preprocessing .* differs .* train the members with the same --spacing"),
    (dict(channels=2), r"it takes 2 input channel\(s\)"),
])
def test_networks_that_cannot_be_averaged_are_refused_by_name(tmp_path, other, message):
    first = save_checkpoint(network(0), tmp_path / "a.pt")
    second = save_checkpoint(network(1, **other), tmp_path / "b.pt")
    with pytest.raises(UserError, match=message):
        load_checkpoint([first, second])
    with pytest.raises(UserError, match="member 2 cannot join"):
        Ensemble([network(0), network(1, **other)])


def test_ensemble_files_are_refused_where_one_network_is_needed(tmp_path):
    path = save_checkpoint(Ensemble([network(0), network(1)]), tmp_path / "ensemble.pt")
    with pytest.raises(UserError, match="ensemble of 2 networks, but fine-tuning takes one network"):
        load_single_checkpoint(path, "fine-tuning")


def test_damaged_ensemble_records_are_named(tmp_path):
    record = Ensemble([network(0), network(1)]).to_dict()
    del record["members"][1]["state_dict"]
    torch.save(record, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"broken.pt \(member 2\) is missing checkpoint fields: state_dict"):
        load_checkpoint(tmp_path / "broken.pt")
    record = Ensemble([network(0)]).to_dict()
    record["format_version"] = FORMAT_VERSION + 1
    torch.save(record, tmp_path / "future.pt")
    with pytest.raises(UserError, match="newer than this version reads"):
        load_checkpoint(tmp_path / "future.pt")


def test_info_describes_shared_settings_once_and_each_member(tmp_path):
    text = Ensemble([network(0), network(1, "vnet")], {"folds": 2}).describe()
    lines = text.splitlines()
    assert lines[0].startswith("ensemble:       2 networks")
    assert sum(line.startswith("labels:") for line in lines) == 1 and "1 liver" in text
    assert "made by:        folds 2" in text
    assert "member 1 of 2:" in lines and "member 2 of 2:" in lines
    assert any(line.strip().startswith("architecture:   vnet") for line in lines)
    assert sum("seed" in line for line in lines) == 2
