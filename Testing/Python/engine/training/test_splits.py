"""Splits with a test set, by subject (--group-by), from a file, and the options that choose them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.training.config import TrainingConfig
from UNet3DSegmenterLib.training.splits import (
    case_groups,
    check_groups,
    check_split_cases,
    make_split,
    read_split,
    write_split,
)

REPOSITORY = Path(__file__).resolve().parents[4]
BUNDLED_SPLIT = REPOSITORY / "Resources" / "Models" / "hippocampus_split.json"
EARLIER_SPLIT = Path(__file__).resolve().parent / "data" / "hippocampus_split_val_fraction.json"
SUBJECT = r"^(Case_\d+)"


def visits(subjects: int = 12) -> list[str]:
    """Subjects scanned one to three times: Case_000_Week1, Case_001_Week1, Case_001_Week2, ..."""
    return [f"Case_{subject:03d}_Week{week}" for subject in range(subjects) for week in range(1, 2 + subject % 3)]


def subject(name: str) -> str:
    return name.rsplit("_", 1)[0]


def sets_of(split) -> dict[str, list[str]]:
    return {"train": split.train, "validation": split.validation, "test": split.test}


def test_three_way_split_is_a_partition_of_the_requested_sizes():
    names = [f"case_{index:02d}" for index in range(20)]
    split = make_split(names, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert (len(split.train), len(split.validation), len(split.test)) == (14, 2, 4)
    assert sorted(split.train + split.validation + split.test) == names
    assert make_split(list(reversed(names)), val_fraction=0.1, test_fraction=0.2, seed=4) == split
    assert make_split(names, val_fraction=0.1, test_fraction=0.2, seed=5).test != split.test


def test_without_a_test_set_the_split_is_the_one_earlier_versions_drew():
    # Drawn by an earlier version with --val-fraction 0.2 --seed 0 (the previous bundled model's split).
    earlier = json.loads(EARLIER_SPLIT.read_text())
    names = earlier["train"] + earlier["validation"]
    split = make_split(names, val_fraction=earlier["val_fraction"], seed=earlier["seed"])
    assert split.validation == earlier["validation"] and split.train == sorted(earlier["train"])
    assert split.test == []


def test_the_bundled_models_fold_is_drawn_again_from_its_settings():
    bundled = json.loads(BUNDLED_SPLIT.read_text())
    names = bundled["train"] + bundled["validation"]
    split = make_split(names, folds=bundled["folds"], fold=bundled["fold"], seed=bundled["seed"])
    assert split.validation == bundled["validation"] and split.train == sorted(bundled["train"])


def test_group_by_keeps_each_subject_in_one_set():
    names = visits()
    split = make_split(names, val_fraction=0.2, test_fraction=0.2, seed=0, group_by=SUBJECT)
    where = {subject(name): kind for kind, members in sets_of(split).items() for name in members}
    for kind, members in sets_of(split).items():
        assert members and all(where[subject(name)] == kind for name in members)
    assert sorted(split.train + split.validation + split.test) == sorted(names)
    assert split.group_by == SUBJECT
    # without grouping, this seed splits at least one subject between sets
    plain = make_split(names, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert any(len({kind for kind, members in sets_of(plain).items() for name in members
                    if subject(name) == key}) > 1 for key in {subject(name) for name in names})


def test_k_folds_by_subject_hold_out_one_test_set_and_validate_every_other_case_once():
    names, folds = visits(), 4
    splits = [make_split(names, folds=folds, fold=fold, seed=1, test_fraction=0.15, group_by=SUBJECT)
              for fold in range(folds)]
    test = splits[0].test
    assert test and all(split.test == test for split in splits)
    validated = [name for split in splits for name in split.validation]
    assert sorted(validated + test) == sorted(names)  # every non-test case validates exactly once
    for split in splits:
        trained = {subject(name) for name in split.train}
        assert not trained & {subject(name) for name in split.validation + split.test}
    sizes = [len(split.validation) for split in splits]
    assert max(sizes) - min(sizes) <= 3  # balanced to within the largest subject


def test_one_case_per_group_gives_the_ungrouped_folds():
    names = [f"case_{index:02d}" for index in range(11)]
    for fold in range(3):
        grouped = make_split(names, folds=3, fold=fold, seed=2, group_by=r"case_(\d+)")
        plain = make_split(names, folds=3, fold=fold, seed=2)
        assert (grouped.train, grouped.validation) == (plain.train, plain.validation)


TWO_SUBJECTS = [f"Case_00{subject}_Week{week}" for subject in range(2) for week in range(6)]


@pytest.mark.parametrize("names, arguments, message", [
    (visits(6), dict(group_by=r"^(Patient_\d+)"), "case Case_000_Week1 does not match --group-by"),
    (visits(6), dict(group_by=r"^(Case_\d+"), "is not a valid regular expression"),
    (TWO_SUBJECTS, dict(val_fraction=0.2, test_fraction=0.2, group_by=SUBJECT), "leave none for training"),
    (visits(6), dict(folds=5, fold=0, test_fraction=0.5, group_by=SUBJECT),
     "5-fold cross-validation needs at least 5 subjects"),
])
def test_impossible_grouped_splits_are_refused(names, arguments, message):
    with pytest.raises(UserError, match=message):
        make_split(names, **arguments)


def test_case_groups_use_the_first_group_or_the_whole_match():
    assert case_groups(["a_1", "a_2", "b_1"], r"^[a-z]") == {"a": ["a_1", "a_2"], "b": ["b_1"]}
    assert case_groups(["a_1", "b_1"], None) == {"a_1": ["a_1"], "b_1": ["b_1"]}


def test_split_files_round_trip_and_hand_written_ones_read(tmp_path):
    split = make_split(visits(), folds=3, fold=2, seed=7, test_fraction=0.2, group_by=SUBJECT)
    assert read_split(write_split(split, tmp_path / "split.json")) == split
    (tmp_path / "mine.json").write_text(json.dumps({"train": ["a", "b"], "validation": ["c"], "test": ["d"]}))
    mine = read_split(tmp_path / "mine.json")
    assert (mine.train, mine.validation, mine.test) == (["a", "b"], ["c"], ["d"])
    bundled = read_split(BUNDLED_SPLIT)
    assert len(bundled.train) == 166 and len(bundled.validation) == 42 and bundled.test == []


@pytest.mark.parametrize("record, message", [
    ({"train": ["a"], "validation": ["b"], "test": ["a"]}, "puts case a in both train and test"),
    ({"train": [], "validation": ["b"]}, "has no training cases"),
    ({"train": "a", "validation": []}, "\"train\" must be a list of case names"),
    ({"training": ["a"], "validation": []}, "cannot read the split"),
])
def test_broken_split_files_are_refused(tmp_path, record, message):
    (tmp_path / "split.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=message):
        read_split(tmp_path / "split.json")


def test_a_split_file_is_checked_against_the_data(tmp_path, caplog):
    split = read_split(write_split(make_split(["a", "b", "c", "d"], seed=0), tmp_path / "split.json"))
    with pytest.raises(UserError, match=r"names case d \(1 missing in all\), which is not in data/"):
        check_split_cases(split, ["a", "b", "c"], "split.json", "data/")
    with caplog.at_level(logging.INFO, logger="UNet3DSegmenterLib"):
        check_split_cases(split, ["a", "b", "c", "d", "e", "f"], "split.json", "data/")
    assert "2 case(s) of data/ are in none of the sets of split.json" in caplog.text


def test_group_check_finds_a_subject_on_both_sides(tmp_path):
    split = make_split(visits(), val_fraction=0.3, seed=0)  # drawn without grouping
    with pytest.raises(UserError, match=r"puts subject Case_\d+ \(by --group-by .*\) in both train and validation"):
        check_groups(split, SUBJECT, "split.json")
    check_groups(make_split(visits(), val_fraction=0.3, seed=0, group_by=SUBJECT), SUBJECT, "split.json")


@pytest.mark.parametrize("options, message", [
    (dict(split=(0.8, 0.1, 0.2)), "give three shares that add up to 1"),
    (dict(split=(0.0, 0.5, 0.5)), "training above 0"),
    (dict(split=(0.8, 0.1, 0.1), folds=5), "write the split as --split TRAIN 0 TEST, e.g. --split 0.9 0 0.1"),
    (dict(split=(0.8, 0.1, 0.1), val_fraction=0.3), "give --split or --val-fraction, not both"),
    (dict(split_file="split.json", folds=5), "--split-file fixes the sets: leave out --folds"),
    (dict(split_file="split.json", split=(0.8, 0.2, 0.0)), "--split-file fixes the sets: leave out --split"),
    (dict(fold=1), "--fold I needs --folds K"),
    (dict(folds=3, fold=3), r"--fold must be in 0..2"),
    (dict(group_by="(Case"), "is not a valid regular expression"),
])
def test_contradicting_split_options_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        TrainingConfig(data="data", output="run", **options)


def test_split_options_say_what_they_choose():
    config = TrainingConfig(data="data", output="run", split=(0.8, 0.1, 0.1))
    assert (config.validation_fraction, config.test_fraction, config.cross_validation) == (0.1, 0.1, False)
    assert TrainingConfig(data="data", output="run", folds=5).cross_validation
    assert not TrainingConfig(data="data", output="run", folds=5, fold=2).cross_validation
    assert TrainingConfig(data="data", output="run").test_fraction == 0
