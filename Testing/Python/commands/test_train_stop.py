"""Stopping `unet3d-segmenter train`: a STOP file in the output folder, or Ctrl-C / SIGTERM, ends the run
after its iteration with last.pt, log.csv and the curves written, and exit status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from UNet3DSegmenterLib.checkpoint import load_checkpoint
from UNet3DSegmenterLib.phantom import write_phantom_dataset

REPOSITORY = Path(__file__).resolve().parents[3]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=3, shape=(16, 24, 24), seed=0)


def _train_and_stop(watch, data: Path, output: Path, stop) -> tuple[subprocess.Popen, list[dict], str]:
    """Run the command, call ``stop(process)`` at the first iteration, return the process, its events and stderr."""
    command = [sys.executable, "-m", "UNet3DSegmenterLib", "train", "--data", str(data), "--output", str(output),
               "--depth", "2", "--base-width", "4", "--patch-size", "16", "24", "24", "--epochs", "50",
               "--iterations-per-epoch", "2", "--batch-size", "1", "--workers", "0", "--val-fraction", "0",
               "--device", "cpu", "--progress-json"]
    stopped = []

    def act(process, event) -> bool:
        if event["event"] == "iteration" and not stopped:
            stopped.append(event)
            stop(process)
        return False  # read on to the end: the run finishes its iteration and saves

    return watch(command, ENVIRONMENT, act)


@pytest.mark.parametrize("how", ["STOP file", "SIGTERM"])
def test_train_stops_after_its_iteration_saves_and_exits_zero(phantoms, tmp_path, how, watch_progress):
    output = tmp_path / "run"
    if how == "STOP file":
        stop = lambda process: (output / "STOP").touch()  # noqa: E731
    else:
        stop = lambda process: process.send_signal(signal.SIGTERM)  # noqa: E731
    process, events, stderr = _train_and_stop(watch_progress, phantoms, output, stop)
    assert process.returncode == 0, stderr
    assert "stopped as asked" in stderr and "--resume" in stderr
    assert events[-1]["event"] == "done" and events[-1]["stopped"] == "cancelled"
    assert len([event for event in events if event["event"] == "iteration"]) < 100, "it did not stop"
    state = torch.load(output / "last.state.pt", weights_only=True)
    assert state["epoch"] * 2 + state["iteration"] >= 1, "last.pt holds no training"
    assert load_checkpoint(output / "last.pt").foreground_labels
    assert (output / "log.csv").read_text().startswith("epoch,") and (output / "curves.png").is_file()
    assert not (output / "STOP").exists(), "the STOP file would stop the resumed run at once"
