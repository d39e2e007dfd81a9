"""The module's Logic takes an ensemble file or a folder of fold checkpoints wherever it takes a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from UNet3DSegmenterLib import Checkpoint, Ensemble, Predictor, UNet3D, load_checkpoint, save_checkpoint  # noqa: E402


def _second_network(first: Checkpoint) -> Checkpoint:
    model = UNet3D(**first.architecture_args)
    model.load_state_dict(first.state_dict)
    for parameter in model.head.parameters():
        parameter.data.mul_(0.5)  # a different but sensible network, as another fold would be
    return Checkpoint.from_model(model, first.labels, first.preprocessing, first.patch_size, first.overlap)


@pytest.fixture(scope="module")
def cross_validation(tmp_path_factory, checkpoint_path):
    first = load_checkpoint(checkpoint_path)
    folder = tmp_path_factory.mktemp("cv")
    save_checkpoint(first, folder / "fold_0" / "best.pt")
    save_checkpoint(_second_network(first), folder / "fold_1" / "best.pt")
    save_checkpoint(load_checkpoint(folder), folder / "ensemble.pt")
    return folder


@pytest.mark.parametrize("source", ["ensemble.pt", "."], ids=["ensemble file", "folder of folds"])
def test_segment_with_an_ensemble_gives_the_ensembles_labelmap(slicer_scene, logic, cross_validation, source):
    from UNet3DSegmenterLib.slicer.selftest import addPhantom

    node = addPhantom(seed=2)[0]
    model = cross_validation / source
    assert logic.describeModel(model) == "organ, lesion"
    segmentation = logic.segment(node, model, device="cpu")
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]
    expected = Predictor(model, device="cpu").predict(logic.volumeFromNode(node)).labelmap.array
    assert isinstance(Predictor(model, device="cpu").checkpoint, Ensemble)
    assert np.count_nonzero(expected) > 0
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(segmentation, node, ["organ", "lesion"]), expected)
