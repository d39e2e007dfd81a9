"""A checkpoint's record is checked as a whole before any network is built from it (checkpoint_checks.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, load_checkpoint, save_checkpoint
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.models import UNet3D
from UNet3DSegmenterLib.preprocess import Preprocessing


def record() -> dict:
    torch.manual_seed(0)
    model = UNet3D(1, 3, depth=3, base_width=4)
    labels = [Label(0, "background"), Label(1, "liver", (0.8, 0.3, 0.2)), Label(3, "tumour", (0.1, 0.9, 0.1))]
    return Checkpoint.from_model(model, labels, Preprocessing(spacing=(0.8, 0.8, 2.5)), (16, 32, 32)).to_dict()


def edited(**changes):
    """A function that changes a record in place: 'architecture_args.depth' = 6, ..."""
    def change(record: dict) -> None:
        for dotted, value in changes.items():
            *parents, key = dotted.split(".")
            target = record
            for parent in parents:
                target = target[int(parent)] if isinstance(target, list) else target[parent]
            target[key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (edited(**{"architecture_args.depth": 4}), "the weights lack decoder.blocks.2"),
    (edited(**{"architecture_args.base_width": 16}), "where the architecture record gives"),
    (edited(**{"architecture_args.depth": 40}), "depth is 40, not a whole number in 2..8"),
    (edited(**{"architecture_args.base_width": 4096}), "base_width is 4096"),
    (edited(**{"architecture_args.out_channels": 2}), "3 labels for a network with 2 outputs"),
    (edited(**{"architecture_args.in_channels": -1}), "in_channels is -1"),
    (edited(**{"architecture_args.kernel": 7}), "kernel are not those of unet3d"),
    (edited(**{"architecture_args.dropout": 1.5}), "dropout"),
    (edited(**{"architecture": "transformer"}), "unknown architecture"),
    (lambda record: record["labels"][2].update(value=70000), "0..65535"),
    (lambda record: record["labels"][2].update(value=1), "distinct"),
    (edited(**{"inference.patch_size": [0, 32, 32]}), "multiples of 4"),
    (edited(**{"inference.patch_size": [18, 32, 32]}), "multiples of 4"),
    (edited(**{"inference.patch_size": [4096, 4096, 4096]}), "up to 1024"),
    (edited(**{"inference.overlap": 1.0}), "overlap"),
    (edited(**{"preprocessing.spacing": [0, 0.8, 2.5]}), "spacing"),
    (edited(**{"preprocessing.spacing": None, "preprocessing.size": [100000, 64, 64]}), "resize"),
    (edited(**{"preprocessing.std": 0.0}), "positive std"),
    (edited(**{"preprocessing.channels": 2}), "2 channels"),
])
def test_inconsistent_record_is_refused_in_one_line(tmp_path, change, message):
    damaged = record()
    change(damaged)
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match="damaged.pt is an inconsistent checkpoint") as error:
        load_checkpoint(tmp_path / "damaged.pt")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_weights_of_the_wrong_shape_are_named(tmp_path):
    damaged = record()
    name = next(iter(damaged["state_dict"]))
    damaged["state_dict"][name] = torch.zeros(1)
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match=f"weight {name} has shape"):
        load_checkpoint(tmp_path / "damaged.pt")


def test_a_record_inflated_to_gigabytes_is_refused_without_building_it(tmp_path):
    """base width 4 -> 512 at depth 4 describes some 2.7 GB of weights; refusing it must not build them."""
    damaged = record()
    damaged["architecture_args"].update(depth=4, base_width=512)
    torch.save(damaged, tmp_path / "inflated.pt")
    # The child's own peak: VmHWM starts afresh at exec, while ru_maxrss keeps the parent's (this test
    # process, large after a long suite) from the fork.
    script = ("import resource, sys\nfrom pathlib import Path\nfrom UNet3DSegmenterLib.checkpoint import load_checkpoint\n"
              "from UNet3DSegmenterLib.errors import UserError\n"
              f"try:\n    load_checkpoint({str(tmp_path / 'inflated.pt')!r})\nexcept UserError as error:\n"
              "    print(error)\n"
              "status = Path('/proc/self/status')\n"
              "lines = status.read_text().splitlines() if status.is_file() else []\n"
              "print(next((int(line.split()[1]) for line in lines if line.startswith('VmHWM:')),\n"
              "           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    message, peak_kilobytes = result.stdout.strip().splitlines()
    assert "the weights lack" in message, result.stderr
    assert int(peak_kilobytes) < 1_500_000  # torch itself takes a few hundred MB; the network would take 2.7 GB


def test_the_bundled_and_freshly_saved_checkpoints_pass(tmp_path):
    from pathlib import Path

    bundled = Path(__file__).resolve().parents[3] / "Resources" / "Models" / "hippocampus.pt"
    assert load_checkpoint(bundled).labels
    torch.save(record(), tmp_path / "fresh.pt")
    assert save_checkpoint(load_checkpoint(tmp_path / "fresh.pt"), tmp_path / "again.pt").is_file()
