"""Sparse annotation: voxels of the ``ignore`` label count nowhere, from the loss to the reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import load_checkpoint
from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.datalist import Case, load_datalist
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume, write_volume
from UNet3DSegmenterLib.labels import IGNORE_INDEX
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.sparse import keep_every_nth_slice
from UNet3DSegmenterLib.training.losses import LOSSES, build_loss
from UNet3DSegmenterLib.training.patches import PatchDataset, prepare_case
from UNet3DSegmenterLib.training.trainer import TrainingConfig, train
from UNet3DSegmenterLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IGNORE = 3


@pytest.fixture(scope="module")
def sparse_phantoms(tmp_path_factory) -> Path:
    """Phantoms whose labelmaps keep every 3rd axial slice; the others hold 3, named 'ignore'."""
    folder = write_phantom_dataset(tmp_path_factory.mktemp("sparse"), cases=5, shape=(24, 32, 32), seed=0)
    for path in sorted((folder / "labels").iterdir()):
        labels = read_volume(path)
        write_volume(labels.with_array(keep_every_nth_slice(labels.array, 3, IGNORE)), path)
    record = json.loads((folder / "dataset.json").read_text())
    record["labels"]["3"] = "ignore"
    (folder / "dataset.json").write_text(json.dumps(record))
    return folder


def half_ignored(labels: torch.Tensor) -> torch.Tensor:
    ignored = labels.clone()
    ignored[:, :4] = IGNORE_INDEX
    return ignored


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_blind_to_unannotated_voxels(name):
    labels = torch.zeros((2, 8, 8, 8), dtype=torch.int64)
    labels[:, 2:7, 2:5, 2:5] = 1
    labels[:, 5:7, 5:7, 5:7] = 2
    sparse = half_ignored(labels)
    logits = torch.randn((2, 3, 8, 8, 8), requires_grad=True)
    loss = build_loss(name, classes=3)
    value = loss(logits, sparse)
    value.backward()
    assert torch.isfinite(value)
    assert logits.grad is not None and float(logits.grad[:, :, :4].abs().max()) == 0.0
    changed = logits.detach().clone()
    changed[:, :, :4] = torch.randn_like(changed[:, :, :4]) * 10
    assert float(loss(changed, sparse)) == pytest.approx(float(loss(logits.detach(), sparse)), rel=1e-5)
    assert float(loss(changed, labels)) != float(loss(logits.detach(), labels))  # dense labels do see them


def test_prepared_cases_mark_unannotated_voxels_and_sampling_finds_annotated_ones(tmp_path):
    labels = np.full((40, 40, 40), IGNORE, np.uint8)
    labels[20] = 0
    labels[20, 10:14, 10:14] = 1
    image = np.random.default_rng(0).normal(size=labels.shape).astype(np.float32)
    for folder, array in (("images", image), ("labels", labels)):
        write_volume(Volume(array), tmp_path / folder / "case.nii.gz")
    case = prepare_case(Case("case", tmp_path / "images" / "case.nii.gz", tmp_path / "labels" / "case.nii.gz"),
                        Preprocessing(spacing=(1.0, 1.0, 1.0)), [0, 1], ignore=IGNORE)
    assert set(np.unique(case.target)) == {0, 1, IGNORE_INDEX}
    assert case.annotated is not None and len(case.annotated) == 40 * 40
    # one annotated slice in 40: a uniform patch of 8 slices would miss it most of the time
    dataset = PatchDataset([case], (8, 16, 16), foreground_fraction=0.0)
    assert all((dataset[sample][1] != IGNORE_INDEX).any() for sample in range(200))


@pytest.mark.parametrize(("names", "message"), [
    ({"3": "ignore", "0": "ignore"}, r"labels \[0, 3\] are all named 'ignore'"),
    ({"3": "lesion 2", "0": "Ignore"}, "label 0 is background and cannot be 'ignore'"),
])
def test_one_value_and_never_background_may_be_named_ignore(sparse_phantoms, tmp_path, names, message):
    record = json.loads((sparse_phantoms / "dataset.json").read_text())
    record["labels"].update(names)
    (tmp_path / "dataset.json").write_text(json.dumps(record))
    for folder in ("images", "labels"):
        (tmp_path / folder).symlink_to(sparse_phantoms / folder)
    with pytest.raises(UserError, match=message):
        train(TrainingConfig(data=tmp_path, output=tmp_path / "run", epochs=1, workers=0))


@pytest.mark.slow
def test_training_on_sparse_slices_records_ignore_and_scores_annotated_voxels_only(sparse_phantoms, tmp_path):
    events: list[dict] = []
    config = TrainingConfig(data=sparse_phantoms, output=tmp_path / "run", depth=3, base_width=4,
                            patch_size=(16, 32, 32), epochs=2, iterations_per_epoch=3, batch_size=2, workers=0,
                            val_fraction=0.4, seed=0)
    result = train(config, progress=events.append)
    checkpoint = load_checkpoint(result.best_checkpoint)
    assert [label.value for label in checkpoint.labels] == [0, 1, 2]
    assert checkpoint.architecture_args["out_channels"] == 3
    assert checkpoint.ignore_value == IGNORE and checkpoint.training["ignore_label"] == IGNORE
    epochs = [event for event in events if event["event"] == "epoch"]
    assert all(event["scored_on"] == "annotated voxels only" for event in epochs)
    report = json.loads((tmp_path / "run" / "validation_report.json").read_text())
    assert report["scored_on"].startswith("annotated voxels only") and "3" not in report["mean"]
    image = read_volume(sparse_phantoms / "images" / "phantom_000.nii.gz")
    labelmap = Predictor(result.best_checkpoint, device="cpu").predict(image).labelmap
    assert IGNORE not in np.unique(labelmap.array)


def test_evaluate_with_an_ignore_label_scores_annotated_voxels_only(tmp_path, capsys):
    reference = np.zeros((6, 8, 8), np.uint8)
    reference[:, 2:6, 2:6] = 1
    reference[::2] = IGNORE  # every other slice was not annotated
    prediction = np.zeros_like(reference)
    prediction[1::2, 2:6, 2:6] = 1  # right on annotated slices
    prediction[::2] = 1  # and anything on the others
    write_volume(Volume(reference), tmp_path / "reference.nii.gz")
    write_volume(Volume(prediction), tmp_path / "prediction.nii.gz")
    arguments = ["evaluate", "--prediction", str(tmp_path / "prediction.nii.gz"),
                 "--reference", str(tmp_path / "reference.nii.gz"), "--json"]
    assert main([*arguments, str(tmp_path / "dense.json")]) == 0
    assert main([*arguments, str(tmp_path / "sparse.json"), "--ignore-label", str(IGNORE)]) == 0
    dense, sparse = (json.loads((tmp_path / name).read_text()) for name in ("dense.json", "sparse.json"))
    assert dense["mean"]["1"]["dice"] < 0.9 and "scored_on" not in dense
    assert sparse["mean"]["1"]["dice"] == 1.0 and sparse["mean_accuracy"] == 1.0 and "3" not in sparse["mean"]
    assert "scored on annotated voxels only" in capsys.readouterr().out


def test_datalist_labels_name_ignore_as_nnunet_spells_it(sparse_phantoms):
    assert load_datalist(sparse_phantoms).label_names == {0: "background", 1: "organ", 2: "lesion", 3: "ignore"}
