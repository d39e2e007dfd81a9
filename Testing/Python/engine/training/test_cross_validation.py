"""`train --folds K` without --fold: every fold in turn, by subject, resumable fold by fold, then an ensemble."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from UNet3DSegmenterLib.checkpoint import Ensemble, load_checkpoint
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.training.cross_validation import cross_validate
from UNet3DSegmenterLib.training.trainer import TrainingConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    """Four subjects scanned twice each: Case_000_Week1, Case_000_Week2, ..., Case_003_Week2."""
    phantoms = write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=8, shape=(24, 32, 32), seed=0)
    folder = tmp_path_factory.mktemp("subjects")
    for index in range(8):
        for kind in ("images", "labels"):
            (folder / kind).mkdir(exist_ok=True)
            shutil.copy(phantoms / kind / f"phantom_{index:03d}.nii.gz",
                        folder / kind / f"Case_{index // 2:03d}_Week{index % 2 + 1}.nii.gz")
    return folder


def subject(name: str) -> str:
    return name.rsplit("_", 1)[0]


def folds_config(data: Path, output: Path, **changes) -> TrainingConfig:
    settings = dict(data=data, output=output, depth=3, base_width=4, patch_size=(16, 32, 32), epochs=1,
                    iterations_per_epoch=3, workers=0, folds=3, split=(0.75, 0.0, 0.25), group_by=r"^(Case_\d+)",
                    label_names={1: "organ", 2: "lesion"}, seed=0)
    return TrainingConfig(**{**settings, **changes})


def test_cut_off_cross_validation_resumes_fold_by_fold_and_ends_in_an_ensemble(subjects, tmp_path):
    output = tmp_path / "cv"
    polls = []  # each fold runs 3 iterations: the 5th poll comes after fold 1's second
    stopped = cross_validate(folds_config(subjects, output), cancel=lambda: polls.append(1) or len(polls) >= 5)
    assert stopped.stopped == "cancelled" and stopped.ensemble is None
    partial = json.loads((output / "cv_report.json").read_text())
    assert not partial["complete"] and [entry["fold"] for entry in partial["per_fold"]] == [0]
    fold_0 = (output / "fold_0" / "best.pt").read_bytes()

    events: list[dict] = []
    result = cross_validate(folds_config(subjects, output, resume=True), progress=events.append)

    assert [event["fold"] for event in events if event["event"] == "fold"] == [1, 2]  # fold 0 was kept
    first_iteration = next(event for event in events if event["event"] == "iteration")
    assert (first_iteration["epoch"], first_iteration["iteration"]) == (1, 3)  # fold 1 went on from its last.pt
    assert (output / "fold_0" / "best.pt").read_bytes() == fold_0
    report = result.report
    assert report["complete"] and [entry["fold"] for entry in report["per_fold"]] == [0, 1, 2]
    assert json.loads((output / "cv_report.json").read_text())["complete"]
    assert events[-1]["event"] == "cross_validation" and set(events[-1]["dice"]) == {"organ", "lesion"}

    # by subject: one subject tests, each fold validates another, and every case is used once
    test = report["test"]["cases"]
    validated = [entry["validation_cases"] for entry in report["per_fold"]]
    assert len(test) == 2 and len({subject(name) for name in test}) == 1
    assert all(len(cases) == 2 and len({subject(name) for name in cases}) == 1 for cases in validated)
    names = sorted(path.name.removesuffix(".nii.gz") for path in (subjects / "images").iterdir())
    assert sorted(sum(validated, []) + test) == names

    # per fold and over the folds, per class
    for value in ("1", "2"):
        per_fold = [entry["mean"][value]["dice"] for entry in report["per_fold"]]
        assert report["mean"][value]["dice"] == pytest.approx(np.mean(per_fold))
        assert report["std"][value]["dice"] == pytest.approx(np.std(per_fold))
        assert set(report["mean"][value]) >= {"dice", "iou", "hd95", "asd"}

    # the folds as one ensemble, scored on the test subject
    ensemble = load_checkpoint(result.ensemble)
    assert isinstance(ensemble, Ensemble) and [member.training["fold"] for member in ensemble.members] == [0, 1, 2]
    assert ensemble.training["folds"] == 3 and set(ensemble.training["cv_dice"]) == {"organ", "lesion"}
    test_report = json.loads(result.test_report.read_text())
    assert sorted(test_report["cases"]) == test and test_report["checkpoint"] == str(result.ensemble)
    assert report["test"]["ensemble"]["mean"]["1"]["dice"] == pytest.approx(test_report["mean"]["1"]["dice"])
    assert report["test"]["mean_of_folds"]["1"]["dice"] == pytest.approx(
        np.mean([entry["test"]["mean"]["1"]["dice"] for entry in report["per_fold"]]))
    for fold in range(3):
        fold_test = json.loads((output / f"fold_{fold}" / "test_report.json").read_text())
        assert sorted(fold_test["cases"]) == test


def test_train_needs_a_fold_and_resume_needs_the_same_folds(subjects, tmp_path):
    with pytest.raises(UserError, match="give one fold"):
        train(folds_config(subjects, tmp_path / "cv"))
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv_report.json").write_text(json.dumps({"folds": 5, "per_fold": []}))
    with pytest.raises(UserError, match="holds a 5-fold cross-validation, not 3; give --folds 5"):
        cross_validate(folds_config(subjects, tmp_path / "cv", resume=True))


@pytest.mark.slow
def test_cross_validation_under_torchrun_writes_once_from_the_main_process(subjects, tmp_path):
    repository = Path(__file__).resolve().parents[4]
    environment = {**os.environ, "PYTHONPATH": str(repository), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "UNet3DSegmenterLib", "train", "--data", str(subjects), "--output", str(tmp_path / "cv"),
               "--folds", "2", "--depth", "3", "--base-width", "4", "--patch-size", "16", "32", "32", "--epochs", "1",
               "--iterations-per-epoch", "1", "--workers", "0", "--progress-json"]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=500)
    assert finished.returncode == 0, finished.stderr[-3000:]
    events = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert [event["fold"] for event in events if event["event"] == "fold"] == [0, 1]
    assert [event["event"] for event in events].count("cross_validation") == 1
    assert json.loads((tmp_path / "cv" / "cv_report.json").read_text())["complete"]
    ensemble = load_checkpoint(tmp_path / "cv" / "ensemble.pt")
    assert [member.training["world_size"] for member in ensemble.members] == [2, 2]
