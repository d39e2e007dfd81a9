"""The kind of input the bundled model expects, one click away in Slicer's Sample Data module.

A new user's first volume is usually a whole head (MRHead), far outside what the bundled hippocampus
model was trained on (crops of about 35 x 50 x 35 mm around the hippocampus). So the module
registers one such crop: case hippocampus_001 of the Medical Segmentation Decathlon, Task04
Hippocampus (CC-BY-SA 4.0, see Resources/Samples/README.md), one of the cases held out from the
bundled model's training. It lies in the module's own Resources/Samples and is loaded from there:
no download. Slicer's Sample Data module lists it under "UNet3DSegmenter" once the application has
started (the module registers it on ``startupCompleted()``, as Slicer's extension template does).
"""

from __future__ import annotations

import logging
import pathlib

log = logging.getLogger("UNet3DSegmenter")

CATEGORY = "UNet3DSegmenter"
SAMPLE_NAME = "HippocampusCrop"
SAMPLE_FILE = "hippocampus_001.nii.gz"
SAMPLE_SHA256 = "ab47d6115b412ffaba041cbf48962967127f199f39eb56c777a6bb3746353b4a"
"""Of the file as shipped: Sample Data checks the copy it loads against it."""


def samplePath(moduleFolder) -> pathlib.Path:
    return pathlib.Path(moduleFolder) / "Resources" / "Samples" / SAMPLE_FILE


def registerSampleData(moduleFolder) -> None:
    """Add the hippocampus crop to Slicer's Sample Data module (category :data:`CATEGORY`)."""
    try:
        import SampleData
    except ImportError:  # a Slicer built without the Sample Data module: nothing to add it to
        log.info("the Sample Data module is not available: the hippocampus sample is not registered")
        return
    resources = pathlib.Path(moduleFolder) / "Resources"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY, sampleName=SAMPLE_NAME, uris=samplePath(moduleFolder).as_uri(), fileNames=SAMPLE_FILE,
        nodeNames=SAMPLE_NAME, thumbnailFileName=str(resources / "Icons" / "UNet3DSegmenter.png"),
        checksums=f"SHA256:{SAMPLE_SHA256}", loadFileTypes="VolumeFile")
