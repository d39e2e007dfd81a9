"""A training run never destroys a model: a new run in a folder that holds one is refused, unless it is
resumed or replaced on purpose (--overwrite), and --init never points at a file the run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.training.config import TrainingConfig
from UNet3DSegmenterLib.training.cross_validation import cross_validate
from UNet3DSegmenterLib.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=3, shape=(16, 24, 24), seed=0)


def arguments(data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), "--depth", "2", "--base-width", "4",
            "--patch-size", "16", "24", "24", "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "1",
            "--workers", "0", "--val-fraction", "0.34", "--device", "cpu", "--progress-json", *extra]


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    """A folder holding a finished run's model."""
    output = tmp_path_factory.mktemp("trained") / "run"
    assert main(arguments(phantoms, output)) == 0
    return output


def test_a_second_run_in_a_folder_with_a_model_is_refused_and_leaves_it_as_it_was(phantoms, trained, capsys):
    before = contents(trained)
    assert {"best.pt", "last.pt", "run.json"} <= set(before)
    capsys.readouterr()
    assert main(arguments(phantoms, trained)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {trained} already holds a model (best.pt)") and "\n" not in error
    assert "--resume" in error and "--overwrite" in error
    assert contents(trained) == before, "the refused run changed the folder"


@pytest.mark.parametrize("marker", ["last.pt", "run.json"])
def test_a_run_stopped_before_its_best_checkpoint_is_a_model_too(phantoms, tmp_path, marker):
    """A run stopped in its first epoch leaves last.pt and run.json only: a new run must not replace them."""
    output = tmp_path / "run"
    config = TrainingConfig(data=phantoms, output=output, depth=2, base_width=4, patch_size=(16, 24, 24), epochs=5,
                            iterations_per_epoch=2, batch_size=1, workers=0, val_fraction=0.34, device="cpu")
    assert train(config, cancel=lambda: True).stopped == "cancelled"
    assert not (output / "best.pt").exists()
    (output / ({"last.pt", "run.json"} - {marker}).pop()).unlink()
    before = contents(output)
    with pytest.raises(UserError, match=f"already holds a model \\({marker}\\)"):
        train(config)
    assert contents(output) == before


def test_overwrite_replaces_the_model_and_is_not_written_into_run_json(phantoms, trained, tmp_path):
    output = tmp_path / "copy"
    output.mkdir()
    for name, data in contents(trained).items():
        (output / name).write_bytes(data)
    assert main(arguments(phantoms, output, "--overwrite", "--seed", "1")) == 0
    assert (output / "best.pt").read_bytes() != (trained / "best.pt").read_bytes()
    record = json.loads((output / "run.json").read_text())
    assert record["seed"] == 1 and record["overwrite"] is False, "repeating run.json must ask again"


def test_resume_and_overwrite_together_are_refused(phantoms, trained, capsys):
    assert main(arguments(phantoms, trained, "--resume", "--overwrite")) == 2
    assert "give --resume (continue the run) or --overwrite (replace it), not both" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_fine_tuning_a_folders_model_into_the_same_folder_is_refused(phantoms, trained, capsys, extra):
    before = contents(trained)
    capsys.readouterr()
    assert main(arguments(phantoms, trained, "--init", str(trained / "best.pt"), *extra)) == 2
    error = capsys.readouterr().err.strip()
    if extra:
        assert f"--init {trained / 'best.pt'} lies in the output folder {trained}" in error and "\n" not in error
    assert contents(trained) == before, "the model to fine-tune was touched"


def test_fine_tuning_into_a_new_folder_keeps_the_original_and_records_it(phantoms, trained, tmp_path):
    original = (trained / "best.pt").read_bytes()
    tuned = tmp_path / "tuned"
    assert main(arguments(phantoms, tuned, "--init", str(trained / "best.pt"))) == 0
    assert (trained / "best.pt").read_bytes() == original
    assert json.loads((tuned / "run.json").read_text())["init"] == str((trained / "best.pt").resolve())


def test_a_cross_validation_refuses_a_fold_folder_that_holds_a_model_before_writing(phantoms, trained, tmp_path):
    output = tmp_path / "cv"
    (output / "fold_1").mkdir(parents=True)
    (output / "fold_1" / "best.pt").write_bytes((trained / "best.pt").read_bytes())
    config = TrainingConfig(data=phantoms, output=output, folds=2, depth=2, base_width=4, patch_size=(16, 24, 24),
                            epochs=1, iterations_per_epoch=1, batch_size=1, workers=0, device="cpu")
    with pytest.raises(UserError, match="fold_1 already holds a model"):
        cross_validate(config)
    assert sorted(path.name for path in output.iterdir()) == ["fold_1"], "it wrote before refusing"
