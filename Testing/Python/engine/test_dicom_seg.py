"""DICOM SEG files: written with highdicom from a labelmap on a DICOM series' grid, read back by highdicom and
by dcmqi (an independent reader) to exactly that labelmap, on series of several orientations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import ORIENTATIONS, dcmqi_converter, dcmqi_labelmap, write_ct_series

from UNet3DSegmenterLib.dicom_seg import (
    INSTALL_HINT,
    is_dicom_seg_file,
    read_dicom_seg,
    segment_codes,
    series_files,
    write_dicom_seg,
)
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.labels import Label
from UNet3DSegmenterLib.volume import Volume

LABELS = [Label(0, "background"), Label(1, "Liver", (0.8, 0.2, 0.1)), Label(2, "left kidney", (0.1, 0.6, 0.9)),
          Label(3, "anterior", (0.3, 0.9, 0.3))]


def labelmap_for(volume: Volume) -> np.ndarray:
    """Labels 1 and 2 on a few slices (with whole slices empty between), label 3 nowhere."""
    labelmap = np.zeros(volume.shape, np.uint8)
    labelmap[2:5, 4:12, 3:9] = 1
    labelmap[8:9, 10:16, 12:20] = 2
    labelmap[3, 0, 0] = 2
    return labelmap


@pytest.fixture(params=ORIENTATIONS)
def written(request, tmp_path) -> tuple[Path, Volume, np.ndarray, Path]:
    """(series folder, its volume, the labelmap, the SEG file written from it)."""
    series = tmp_path / request.param
    volume = write_ct_series(series, request.param)
    labelmap = labelmap_for(volume)
    seg = write_dicom_seg(volume.with_array(labelmap), series, LABELS, tmp_path / "result.dcm", model="liver.pt")
    return series, volume, labelmap, seg


def test_highdicom_reads_the_seg_back_to_the_labelmap_on_the_series_grid(written):
    series, volume, labelmap, seg = written
    read = read_dicom_seg(seg, grid=volume)
    assert read.labelmap.same_grid(volume)
    np.testing.assert_array_equal(read.labelmap.array, labelmap)
    assert read.segmentation_type == "BINARY"


@pytest.mark.skipif(dcmqi_converter() is None, reason="dcmqi is not installed (pip install dcmqi)")
def test_dcmqi_reads_the_seg_back_to_the_labelmap(written, tmp_path):
    series, volume, labelmap, seg = written
    np.testing.assert_array_equal(dcmqi_labelmap(seg, volume, tmp_path / "dcmqi"), labelmap)


def test_each_frame_references_the_source_image_at_its_position(written):
    series, volume, labelmap, seg = written
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path) for path in series_files(series))}
    dataset = pydicom.dcmread(seg)
    first = next(iter(sources.values()))
    assert dataset.StudyInstanceUID == first.StudyInstanceUID
    assert dataset.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(value) for value in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(value) for value in sources[source_uid].ImagePositionPatient],
                                   atol=1e-3)


def test_segments_carry_names_colours_codes_and_the_algorithm(tmp_path):
    series = tmp_path / "ct"
    volume = write_ct_series(series)
    seg = write_dicom_seg(volume.with_array(labelmap_for(volume)), series, LABELS, tmp_path / "r.dcm", model="liver.pt")
    dataset = pydicom.dcmread(seg)
    segments = dataset.SegmentSequence
    assert [item.SegmentLabel for item in segments] == ["Liver", "left kidney", "anterior"]
    assert [item.SegmentNumber for item in segments] == [1, 2, 3]
    liver, kidney, generic = (item.SegmentedPropertyTypeCodeSequence[0] for item in segments)
    assert (liver.CodeValue, liver.CodingSchemeDesignator) == ("10200004", "SCT")
    assert kidney.CodeMeaning == "Kidney"
    assert generic.CodeMeaning == "Tissue"
    assert segments[0].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    algorithm = segments[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "UNet3DSegmenter" and algorithm.AlgorithmVersion
    assert "liver.pt" in algorithm.AlgorithmParameters
    assert dataset.SegmentationType == "BINARY" and segments[0].SegmentAlgorithmType == "AUTOMATIC"
    colours = [label.color for label in read_dicom_seg(seg).labels]
    np.testing.assert_allclose(colours, [label.color for label in LABELS[1:]], atol=0.02)


def test_an_empty_segment_is_kept_and_empty_frames_are_left_out(written):
    series, volume, labelmap, seg = written
    dataset = pydicom.dcmread(seg)
    assert len(dataset.SegmentSequence) == 3  # label 3 found nowhere is still a segment
    slices_with = {value: int((labelmap == value).any(axis=(1, 2)).sum()) for value in (1, 2)}
    assert int(dataset.NumberOfFrames) == slices_with[1] + slices_with[2]


def test_a_result_with_nothing_found_is_a_seg_of_empty_segments(tmp_path):
    series = tmp_path / "ct"
    volume = write_ct_series(series)
    nothing = volume.with_array(np.zeros(volume.shape, np.uint8))
    seg = write_dicom_seg(nothing, series, LABELS, tmp_path / "empty.dcm")
    read = read_dicom_seg(seg, grid=volume)
    assert not read.labelmap.array.any() and len(read.labels) == 3


def test_probabilities_make_a_fractional_seg(tmp_path):
    series = tmp_path / "ct"
    volume = write_ct_series(series)
    labelmap = labelmap_for(volume)
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(4), size=volume.shape).astype(np.float32)
    probabilities = np.moveaxis(probabilities, -1, 0)
    seg = write_dicom_seg(volume.with_array(labelmap), series, LABELS, tmp_path / "p.dcm", "m.pt",
                          probabilities=volume.with_array(probabilities))
    dataset = pydicom.dcmread(seg)
    assert dataset.SegmentationType == "FRACTIONAL" and dataset.SegmentationFractionalType == "PROBABILITY"
    to_index = np.linalg.inv(volume.index_to_physical())
    for frame, pixels in zip(dataset.PerFrameFunctionalGroupsSequence, dataset.pixel_array):
        segment = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        position = [float(value) for value in frame.PlanePositionSequence[0].ImagePositionPatient]
        z = int(round((to_index @ [*position, 1])[2]))
        np.testing.assert_allclose(pixels / 255, probabilities[segment, z], atol=0.5 / 255 + 1e-6)
    stored = np.round(probabilities[1:] * 255) / 255  # background: what the segments leave
    candidates = np.concatenate([1 - stored.sum(axis=0, keepdims=True), stored])
    ordered = np.sort(candidates, axis=0)
    clear = ordered[-1] - ordered[-2] > 1e-4  # no near-tie, which float sums could decide either way
    read = read_dicom_seg(seg, grid=volume)
    np.testing.assert_array_equal(read.labelmap.array[clear], np.argmax(candidates, axis=0)[clear])
    assert clear.mean() > 0.9


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
@pytest.mark.parametrize("fractional", [False, True])
def test_dciodvfy_finds_no_error(tmp_path, fractional):
    series = tmp_path / "ct"
    volume = write_ct_series(series, "oblique")
    labelmap = labelmap_for(volume)
    probabilities = volume.with_array(np.stack([labelmap == value for value in range(4)]).astype(np.float32))
    seg = write_dicom_seg(volume.with_array(labelmap), series, LABELS, tmp_path / "v.dcm", "m.pt",
                          probabilities=probabilities if fractional else None)
    report = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
    assert "Segmentation" in report.stdout + report.stderr


def test_only_seg_files_are_taken_for_seg_files(written, tmp_path):
    series, _, _, seg = written
    (tmp_path / "notes.dcm").write_text("not DICOM at all")
    assert is_dicom_seg_file(seg)
    assert not is_dicom_seg_file(series_files(series)[0])
    assert not is_dicom_seg_file(tmp_path / "notes.dcm")
    with pytest.raises(UserError, match="not a DICOM SEG"):
        read_dicom_seg(series_files(series)[0])


def test_a_seg_cut_short_is_refused_in_one_line(written, tmp_path):
    _, _, _, seg = written
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(seg.read_bytes()[:-200])
    with pytest.raises(UserError, match="cut.dcm") as error:
        read_dicom_seg(cut)
    assert "\n" not in str(error.value)


def test_a_seg_off_the_grid_it_is_compared_with_is_refused(written):
    _, volume, _, seg = written
    shifted = Volume(np.zeros(volume.shape, np.uint8), volume.spacing,
                     tuple(value + 0.4 for value in volume.origin), volume.direction)
    with pytest.raises(UserError, match="does not lie on the grid"):
        read_dicom_seg(seg, grid=shifted)


def test_known_and_generic_codes():
    assert segment_codes("spleen")[1].value == "78961009" and segment_codes("spleen")[2]
    assert segment_codes("Liver tumour")[0].meaning == "Morphologically Abnormal Structure"
    category, kind, known = segment_codes("posterior")
    assert (category.meaning, kind.meaning, known) == ("Tissue", "Tissue", False)


def test_without_highdicom_the_refusal_says_how_to_install(tmp_path):
    script = ("import sys; sys.modules['highdicom'] = None\n"
              "import numpy\n"
              "from UNet3DSegmenterLib.dicom_seg import write_dicom_seg\n"
              "from UNet3DSegmenterLib.errors import UserError\n"
              "from UNet3DSegmenterLib.labels import Label\n"
              "from UNet3DSegmenterLib.volume import Volume\n"
              "try:\n    write_dicom_seg(Volume(numpy.zeros((3, 3, 3))), sys.argv[1], [Label(1, 'liver')], sys.argv[2])\n"
              "except UserError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "x.dcm")], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == INSTALL_HINT


def test_importing_the_module_loads_neither_highdicom_nor_pydicom():
    script = ("import sys, UNet3DSegmenterLib.dicom_seg\n"
              "print(sorted(name for name in ('highdicom', 'pydicom', 'torch') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
