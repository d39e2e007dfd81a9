"""The hippocampus sample in Slicer's Sample Data module: registered at start-up, loaded, segmented."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from UNet3DSegmenterLib.io import read_volume  # noqa: E402
from UNet3DSegmenterLib.slicer import samples  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[3]
SAMPLE = REPOSITORY / "Resources" / "Samples" / samples.SAMPLE_FILE
BUNDLED_MODEL = REPOSITORY / "Resources" / "Models" / "hippocampus.pt"


def _registered(slicer_scene):
    slicer_scene.loadModule()
    slicer_scene.completeStartup()
    return slicer.modules.sampleDataSources[samples.CATEGORY]


def test_the_sample_is_registered_once_the_application_has_started(slicer_scene):
    import SampleData

    slicer.modules.__dict__.pop("sampleDataSources", None)
    slicer_scene.loadModule()
    assert "sampleDataSources" not in vars(slicer.modules), "registered before the application finished starting"
    [source] = _registered(slicer_scene)
    assert _registered(slicer_scene) == [source], "registered twice"
    assert source.sampleName == "HippocampusCrop" and source.nodeNames == ["HippocampusCrop"]
    assert source.uris == [SAMPLE.as_uri()] and source.fileNames == ["hippocampus_001.nii.gz"]
    assert source.checksums == [f"SHA256:{hashlib.sha256(SAMPLE.read_bytes()).hexdigest()}"]
    assert SampleData.SampleDataLogic is not None


def test_the_sample_is_small_licensed_and_not_a_training_case():
    assert SAMPLE.stat().st_size < 100_000
    licence = (SAMPLE.parent / "README.md").read_text(encoding="utf-8")
    for words in ("Medical Segmentation Decathlon", "CC-BY-SA 4.0", "Simpson et al.", samples.SAMPLE_SHA256):
        assert words in licence
    import json

    split = json.loads((REPOSITORY / "Resources" / "Models" / "hippocampus_split.json").read_text())
    assert "hippocampus_001" in split["validation"] and "hippocampus_001" not in split["train"]


def test_the_loaded_sample_is_the_file_and_the_bundled_model_segments_it_without_a_warning(slicer_scene, logic,
                                                                                             shared_dataset):
    import SampleData

    [source] = _registered(slicer_scene)
    [node] = SampleData.SampleDataLogic().downloadFromSource(source)
    assert node.GetName() == "HippocampusCrop"
    volume, original = logic.volumeFromNode(node), read_volume(SAMPLE)
    assert volume.same_grid(original) and np.array_equal(volume.array, original.array)
    warnings: list[str] = []
    segmentation = logic.segment(node, BUNDLED_MODEL, device="cpu", warn=warnings.append)
    assert warnings == [] and logic.segmentNames(segmentation) == ["anterior", "posterior"]
    labelmap = logic.labelmapFromSegmentation(segmentation, node, ["anterior", "posterior"])
    truth = read_volume(shared_dataset("msd_hippocampus") / "labels" / samples.SAMPLE_FILE).array
    for value in (1, 2):
        dice = 2 * np.sum((labelmap == value) & (truth == value)) / (np.sum(labelmap == value) + np.sum(truth == value))
        assert dice > 0.75, (value, dice)


def test_a_damaged_copy_is_refused_as_sample_data_refuses_it(slicer_scene, tmp_path):
    import SampleData

    [source] = _registered(slicer_scene)
    damaged = tmp_path / samples.SAMPLE_FILE
    damaged.write_bytes(SAMPLE.read_bytes()[:-10])
    source = type(source)(**{**vars(source), "uris": [damaged.as_uri()]})
    with pytest.raises(ValueError, match="Checksum verification failed"):
        SampleData.SampleDataLogic().downloadFromSource(source)
