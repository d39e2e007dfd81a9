"""Minutes, not epochs: the trainer plans its epochs from its own speed and keeps the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.training.config import TrainingConfig
from UNet3DSegmenterLib.training.time_budget import final_seconds, plan_epochs
from UNet3DSegmenterLib.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=5, shape=(24, 32, 32), seed=0)


def test_planned_epochs_fill_what_is_left_after_the_end_of_the_run():
    # 10 s per epoch of training, 2 s per validation, 20 s kept for the end: 100 s fit 6 epochs
    assert plan_epochs(100, 10, 1.0, 2.0, 1, 20) == 6
    # validating every 2nd epoch costs half as much per epoch, plus the last epoch's validation
    assert plan_epochs(100, 10, 1.0, 2.0, 2, 20) == 7
    assert plan_epochs(10, 10, 1.0, 2.0, 1, 20) == 0
    assert final_seconds(4.0, 4, 2) > 4.0 + 2.0  # the validation report, the test report, a margin


def test_a_budget_must_be_a_positive_number_of_minutes(tmp_path):
    for budget in (0, -1, float("inf")):
        with pytest.raises(UserError, match="time budget must be a positive number of minutes"):
            TrainingConfig(data=tmp_path, output=tmp_path / "run", time_budget=budget)


@pytest.mark.slow
def test_a_budget_plans_epochs_ends_in_time_and_is_recorded(phantoms, tmp_path):
    budget_minutes = 0.5
    config = TrainingConfig(data=phantoms, output=tmp_path / "run", depth=3, base_width=4, patch_size=(16, 32, 32),
                            iterations_per_epoch=5, batch_size=2, workers=0, val_fraction=0.4, seed=0,
                            time_budget=budget_minutes)
    events: list[dict] = []
    result = train(config, progress=events.append)
    assert result.time_plan is not None and result.time_plan.epochs >= 1
    assert result.epochs_completed == result.time_plan.epochs
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["time_budget"] == budget_minutes and record["time_plan"]["epochs"] == result.epochs_completed
    assert record["time_plan"]["seconds_per_iteration"] > 0
    assert TrainingConfig.load(tmp_path / "run" / "run.json").time_budget == budget_minutes  # runs again
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "validation_report.json").is_file()
    assert [event["epochs"] for event in events if event["event"] == "epoch"][-1] == result.epochs_completed



def test_an_epoch_cut_short_by_the_deadline_is_the_plan_run_json_records(phantoms, tmp_path, monkeypatch):
    """The deadline can end the run before the plan did: run.json then says how many epochs it ran."""
    from UNet3DSegmenterLib.training import trainer

    monkeypatch.setattr(trainer._Run, "_past_deadline", lambda self: self.epoch >= 1 and self.iteration >= 2)
    config = TrainingConfig(data=phantoms, output=tmp_path / "run", depth=3, base_width=4, patch_size=(16, 32, 32),
                            iterations_per_epoch=4, batch_size=2, workers=0, val_fraction=0.4, seed=0,
                            time_budget=10)
    result = train(config)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert result.stopped == "time_budget" and result.epochs_completed == 2
    assert record["time_plan"]["epochs"] == result.time_plan.epochs == 2

@pytest.mark.slow
def test_a_budget_spent_before_the_first_epoch_ends_ends_that_epoch_with_validation_and_a_model(phantoms, tmp_path):
    # a budget of 0.06 s is spent before the first iterations are timed: the first epoch is the last
    config = TrainingConfig(data=phantoms, output=tmp_path / "run", depth=3, base_width=4, patch_size=(16, 32, 32),
                            iterations_per_epoch=20, batch_size=2, workers=0, val_fraction=0.4, seed=0,
                            time_budget=0.001)
    events: list[dict] = []
    result = train(config, progress=events.append)
    iterations = [event for event in events if event["event"] == "iteration"]
    assert result.stopped == "time_budget" and result.epochs_completed == 1
    assert len(iterations) == 10  # the iterations it timed, then the end of the run
    assert "mean_dice" in result.history[-1]
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "validation_report.json").is_file()
