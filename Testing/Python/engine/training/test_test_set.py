"""A run with a test set (--split) and a reused split (--split-file): test_report.json, printed at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.training.trainer import TrainingConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=5, shape=(24, 32, 32), seed=0)


def arguments(data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), "--depth", "3", "--base-width", "4",
            "--patch-size", "16", "32", "32", "--epochs", "1", "--iterations-per-epoch", "2", "--workers", "0",
            *extra]


def test_split_with_a_test_set_scores_best_pt_on_it_and_prints_the_scores(phantoms, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(arguments(phantoms, output, "--split", "0.6", "0.2", "0.2")) == 0
    split = json.loads((output / "split.json").read_text())
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (3, 1, 1)
    assert not set(split["test"]) & set(split["train"] + split["validation"])
    report = json.loads((output / "test_report.json").read_text())
    assert sorted(report["cases"]) == split["test"] and report["checkpoint"] == str(output / "best.pt")
    assert math.isfinite(report["loss"]) and report["loss"] > 0
    assert set(report["mean"]) == {"1", "2"} and report["labels"] == {"1": "organ", "2": "lesion"}
    for scores in report["mean"].values():
        assert 0 <= scores["dice"] <= 1 and 0 <= scores["iou"] <= scores["dice"] and "hd95" in scores
    printed = capsys.readouterr().err
    assert f"test set: 1 cases scored with {output / 'best.pt'}: loss {report['loss']:.4f}" in printed
    assert f"organ             {report['mean']['1']['dice']:6.4f}  {report['mean']['1']['iou']:6.4f}" in printed
    assert json.loads((output / "run.json").read_text())["split"] == [0.6, 0.2, 0.2]


def test_split_file_reuses_the_sets_of_an_earlier_run(phantoms, tmp_path):
    first = train(TrainingConfig(data=phantoms, output=tmp_path / "first", depth=3, base_width=4,
                                 patch_size=(16, 32, 32), epochs=1, iterations_per_epoch=1, workers=0,
                                 split=(0.4, 0.2, 0.4), seed=3))
    events = []
    again = train(TrainingConfig(data=phantoms, output=tmp_path / "again", depth=3, base_width=4,
                                 patch_size=(16, 32, 32), epochs=1, iterations_per_epoch=1, workers=0,
                                 split_file=first.output / "split.json", seed=0), progress=events.append)
    first_sets, again_sets = ([split[kind] for kind in ("train", "validation", "test")]
                              for split in (json.loads((run.output / "split.json").read_text()) for run in (first, again)))
    assert again_sets == first_sets and all(first_sets)
    assert again.test_report is not None and first.test_report is not None
    test = next(event for event in events if event["event"] == "test")
    assert test["cases"] == 2 and set(test["dice"]) == {"organ", "lesion"} and test["report"] == str(again.test_report)
    assert events[-1]["event"] == "done"


def test_bundled_split_file_names_the_hippocampus_cases(shared_dataset):
    from UNet3DSegmenterLib.datalist import load_datalist
    from UNet3DSegmenterLib.training.splits import check_split_cases, read_split

    folder = shared_dataset("msd_hippocampus")
    bundled = Path(__file__).resolve().parents[4] / "Resources" / "Models" / "hippocampus_split.json"
    names = [case.name for case in load_datalist(folder).cases]
    check_split_cases(read_split(bundled), names, str(bundled), str(folder))  # every case it names is there
