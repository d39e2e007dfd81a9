"""Ensemble prediction: softmax probabilities averaged over networks, per volume, on the input's grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Ensemble, save_checkpoint
from UNet3DSegmenterLib.inference import calibration
from UNet3DSegmenterLib.inference.postprocess import labelmap_from_probabilities
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.labels import Label
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume

LABELS = [Label(0, "background"), Label(1, "organ", (1, 0, 0)), Label(4, "lesion", (0, 1, 0))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def network(seed: int, architecture: str = "unet3d", patch_size=(16, 16, 16)) -> Checkpoint:
    torch.manual_seed(seed)
    model = build_model(architecture, dict(in_channels=1, out_channels=3, depth=3, base_width=4))
    return Checkpoint.from_model(model, LABELS, Preprocessing(spacing=(1.5, 1.5, 1.5)), patch_size)


def volume() -> Volume:
    array = np.random.default_rng(0).normal(size=(12, 30, 25)).astype(np.float32)
    return Volume(array, spacing=(0.9, 1.1, 3.0), origin=(10, -20, 5))


def predict(model, **options):
    return Predictor(model, device="cpu", precision="fp32", **options).predict(volume(), probabilities=True)


def test_the_same_checkpoint_twice_gives_exactly_what_it_gives_once(tmp_path):
    path = save_checkpoint(network(0), tmp_path / "model.pt")
    once, twice = predict(path), predict([path, path])
    np.testing.assert_array_equal(twice.labelmap.array, once.labelmap.array)
    np.testing.assert_array_equal(twice.probabilities.array, once.probabilities.array)


def test_an_ensemble_averages_the_probabilities_of_its_networks():
    members = [network(0), network(1, "vnet", patch_size=(16, 32, 32)), network(2, "resunet3d")]
    alone = [predict(member).probabilities.array for member in members]
    together = predict(Ensemble(members))
    expected = np.mean(alone, axis=0)
    np.testing.assert_allclose(together.probabilities.array, expected, atol=1e-5)
    assert together.labelmap.same_grid(volume())
    assert not np.array_equal(alone[0].argmax(0), alone[1].argmax(0))  # the members disagree somewhere
    agreement = np.mean(together.labelmap.array == labelmap_from_probabilities(expected, [0, 1, 4]))
    assert agreement > 0.999  # argmax of the average, up to float rounding on near-ties


def test_progress_counts_the_windows_of_every_network():
    calls = []
    members = [network(0), network(1, patch_size=(16, 32, 32))]
    Predictor(Ensemble(members), device="cpu", overlap=0.5).predict(volume(), progress=lambda *c: calls.append(c))
    totals = {total for _, total in calls}
    done = [count for count, _ in calls]
    assert len(totals) == 1 and done == sorted(done) and done[-1] == totals.pop()
    alone = []
    Predictor(members[0], device="cpu", overlap=0.5).predict(volume(), progress=lambda *c: alone.append(c))
    assert alone[-1][1] < calls[-1][1]


def test_a_folder_of_fold_checkpoints_predicts_as_their_ensemble(tmp_path):
    members = [network(seed) for seed in range(2)]
    for fold, member in enumerate(members):
        save_checkpoint(member, tmp_path / "cv" / f"fold_{fold}" / "best.pt")
    from_folder = predict(tmp_path / "cv")
    np.testing.assert_array_equal(from_folder.probabilities.array, predict(Ensemble(members)).probabilities.array)


def test_the_members_of_an_ensemble_give_back_their_working_buffers_after_their_turn(monkeypatch):
    """Each member's compiled network keeps buffers the size of its activations (1.35 GB each for a
    full-size nnU-Net network): members that take turns need one set at a time."""
    turns = []
    monkeypatch.setattr(calibration.CalibratedForward, "release_memory", lambda self: turns.append(id(self)))
    predict(Ensemble([network(0), network(1)]))
    assert len(turns) == 2 and len(set(turns)) == 2
    turns.clear()
    predict(network(0))
    assert turns == []  # one network keeps its buffers for the next volume
