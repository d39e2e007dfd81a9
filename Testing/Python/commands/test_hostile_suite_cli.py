"""Hostile and careless command lines, each held to the same promise through the real CLI.

Every case builds its files in a fresh folder, runs one command, and must end cleanly: exit status 2,
one line on stderr that starts with ``error:`` and names the file at fault, no file that was there
before changed (bytes and modification time), and nothing new written anywhere. The cases are those
of an attacker (names and headers that point elsewhere, small files that declare gigabytes) and of a
tired user (an output that is an input, an image given as a label map, options out of range).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, save_checkpoint
from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume

SHAPE = (10, 12, 14)


def image(folder: Path, name: str = "image.nii.gz", **geometry) -> Path:
    array = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)
    return write_volume(Volume(array, **geometry), folder / name)


def labelmap(folder: Path, name: str = "labels.nii.gz", **geometry) -> Path:
    array = np.zeros(SHAPE, np.uint8)
    array[3:7, 4:9, 4:10] = 1
    return write_volume(Volume(array, **geometry), folder / name)


def model(folder: Path, name: str = "model.pt", **changes) -> Path:
    torch.manual_seed(0)
    network = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=2))
    checkpoint = Checkpoint.from_model(network, [Label(0, "background"), Label(1, "organ")],
                                       Preprocessing(spacing=(1.0, 1.0, 1.0)), (16, 16, 16))
    path = save_checkpoint(checkpoint, folder / name)
    if changes:
        record = torch.load(path, weights_only=True)
        record["architecture_args"].update(changes)
        torch.save(record, path)
    return path


def nrrd(folder: Path, name: str, sizes: str, encoding: str = "raw", extra: str = "", data: bytes = b"") -> Path:
    header = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\n{extra}"
              "space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\n\n")
    (folder / name).write_bytes(header.encode() + data)
    return folder / name


def mha(folder: Path, name: str, data_file: str) -> Path:
    (folder / name).write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 40 10\nElementType = MET_FLOAT\n"
                               f"ElementDataFile = {data_file}\n")
    return folder / name


# --- the cases: each makes its files in ``folder`` and returns (command line, the file at fault) -------------

def predict_onto_its_input(folder):
    source = image(folder)
    return ["predict", "-c", model(folder), "-i", source, "-o", source], source.name


def predict_onto_a_symlink_of_its_input(folder):
    source = image(folder)
    (folder / "seg.nii.gz").symlink_to(source)
    return ["predict", "-c", model(folder), "-i", source, "-o", folder / "seg.nii.gz"], "seg.nii.gz"


def predict_onto_a_hard_link_of_its_input(folder):
    source = image(folder)
    os.link(source, folder / "seg.nii.gz")
    return ["predict", "-c", model(folder), "-i", source, "-o", folder / "seg.nii.gz"], "seg.nii.gz"


def predict_a_folder_into_itself(folder):
    image(folder / "cases", "a.nrrd")
    image(folder / "cases", "b.nrrd")
    return ["predict", "-c", model(folder), "-i", folder / "cases", "-o", folder / "cases"], "a.nrrd"


def probabilities_onto_the_labelmap(folder):
    return ["predict", "-c", model(folder), "-i", image(folder), "-o", folder / "seg.nrrd",
            "--probabilities", folder / "seg.nrrd"], "seg.nrrd"


def uncertainty_onto_the_probabilities(folder):
    return ["predict", "-c", model(folder), "-i", image(folder), "-o", folder / "seg.nrrd",
            "--probabilities", folder / "p.nrrd", "--uncertainty", folder / "p.nrrd"], "p.nrrd"


def case_pattern_without_a_group(folder):
    image(folder / "data" / "images", "a_LFOV.nii.gz")
    image(folder / "data" / "labels", "a_SEMANTIC_LFOV.nii.gz")
    return ["train", "--data", folder / "data", "--output", folder / "run", "--case-pattern", "_LFOV$"], "group"


def predict_to_a_picture_name(folder):
    return ["predict", "-c", model(folder), "-i", image(folder), "-o", folder / "seg.png"], "seg.png"


def evaluate_json_onto_the_reference(folder):
    reference = labelmap(folder)
    return ["evaluate", "--prediction", labelmap(folder, "prediction.nii.gz"), "--reference", reference,
            "--json", reference], reference.name


def convert_onto_its_input(folder):
    source = image(folder, "image.nrrd")
    return ["convert", source, folder / "." / "image.nrrd"], source.name


def overlay_onto_a_symlink_of_the_prediction(folder):
    prediction = labelmap(folder)
    (folder / "picture.png").symlink_to(prediction)
    return ["overlay", "-i", image(folder), "-p", prediction, "-o", folder / "picture.png"], "picture.png"


def ensemble_onto_a_member(folder):
    member = model(folder)
    return ["ensemble", member, member, "-o", member], member.name


def nrrd_declaring_gigabytes_raw(folder):
    return ["convert", nrrd(folder, "bomb.nrrd", "800 800 800", data=bytes(4000)), folder / "out.nii.gz"], "bomb.nrrd"


def nrrd_declaring_gigabytes_gzip(folder):
    path = nrrd(folder, "bomb.nrrd", "800 800 800", "gzip", data=gzip.compress(bytes(4_000_000)))
    return ["convert", path, folder / "out.nii.gz"], "bomb.nrrd"


def mha_compressed_bomb(folder):
    (folder / "bomb.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 800 800 800\nElementType = MET_FLOAT\n"
                                      b"CompressedData = True\nElementDataFile = LOCAL\n" + zlib.compress(bytes(4_000_000)))
    return ["convert", folder / "bomb.mha", folder / "out.nii.gz"], "bomb.mha"


def mha_reading_dev_zero(folder):
    return ["convert", mha(folder, "detached.mha", "/dev/zero"), folder / "out.nii.gz"], "detached.mha"


def mha_reading_outside_its_folder(folder):
    (folder / "secret.raw").write_bytes(bytes(64000))
    (folder / "in").mkdir()
    return ["convert", mha(folder / "in", "detached.mha", "../secret.raw"), folder / "out.nii.gz"], "detached.mha"


def nrrd_reading_outside_its_folder(folder):
    (folder / "secret.raw").write_bytes(bytes(64000))
    (folder / "in").mkdir()
    path = nrrd(folder / "in", "detached.nrrd", "40 40 10", extra="data file: ../secret.raw\n")
    return ["convert", path, folder / "out.nii.gz"], "detached.nrrd"


def half_downloaded_nifti(folder):
    path = image(folder)
    path.write_bytes(path.read_bytes()[:300])
    return ["predict", "-c", model(folder), "-i", path, "-o", folder / "seg.nii.gz"], path.name


def nifti_cut_inside_its_header(folder):
    path = image(folder, "image.nii")
    path.write_bytes(path.read_bytes()[:200])
    return ["convert", path, folder / "out.nrrd"], path.name


def nifti_with_zero_voxel_size(folder):
    path = image(folder, "flat.nii")
    data = bytearray(path.read_bytes())
    data[84:88] = struct.pack("<f", 0.0)
    path.write_bytes(bytes(data))
    return ["convert", path, folder / "out.nrrd"], "flat.nii"


def skewed_grid(folder):
    volume = sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))
    volume.SetDirection((1, 0, 0.4, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(volume, str(folder / "skewed.mha"))
    return ["predict", "-c", model(folder), "-i", folder / "skewed.mha", "-o", folder / "seg.nii.gz"], "skewed.mha"


def values_beyond_single_precision(folder):
    sitk.WriteImage(sitk.GetImageFromArray(np.full(SHAPE, -1e300)), str(folder / "huge.nrrd"))
    return ["predict", "-c", model(folder), "-i", folder / "huge.nrrd", "-o", folder / "seg.nii.gz"], "huge.nrrd"


def a_device_named_as_a_volume(folder):
    (folder / "zero.nii").symlink_to("/dev/zero")
    return ["predict", "-c", model(folder), "-i", folder / "zero.nii", "-o", folder / "seg.nii.gz"], "zero.nii"


def checkpoint_with_a_changed_base_width(folder):
    return ["predict", "-c", model(folder, "wide.pt", base_width=512), "-i", image(folder),
            "-o", folder / "seg.nii.gz"], "wide.pt"


def checkpoint_with_a_changed_depth(folder):
    return ["info", model(folder, "deep.pt", depth=8)], "deep.pt"


def ct_image_as_the_prediction(folder):
    ct = write_volume(Volume(np.random.default_rng(0).integers(0, 2000, SHAPE).astype(np.int16)), folder / "ct.nii.gz")
    return ["evaluate", "--prediction", ct, "--reference", labelmap(folder)], "ct.nii.gz"


def labelmap_3_mm_off(folder):
    prediction = labelmap(folder, "prediction.nii.gz", origin=(3.0, 0.0, 0.0))
    return ["evaluate", "--prediction", prediction, "--reference", labelmap(folder)], "prediction.nii.gz"


def overlay_labelmap_3_mm_off(folder):
    prediction = labelmap(folder, "prediction.nii.gz", origin=(0.0, 3.0, 0.0))
    return ["overlay", "-i", image(folder), "-p", prediction, "-o", folder / "picture.png"], "prediction.nii.gz"


def a_flat_array(folder):
    np.save(folder / "slice.npy", np.zeros((1, 40, 40), np.float32))
    return ["convert", folder / "slice.npy", folder / "out.nii.gz"], "slice.npy"


def datalist_that_is_no_list(folder):
    (folder / "list.json").write_text(json.dumps({"cases": 3}))
    return ["train", "--data", folder / "list.json", "--output", folder / "run"], "list.json"


def run_json_with_a_text_format(folder):
    (folder / "run.json").write_text(json.dumps({"format": "2", "data": str(folder), "output": str(folder / "run")}))
    return ["train", "--config", folder / "run.json"], "run.json"


def training_output_that_is_a_file(folder):
    (folder / "notes.txt").write_text("mine")
    return ["train", "--data", folder, "--output", folder / "notes.txt"], "notes.txt"


def mha_header_that_itk_cannot_parse(folder):
    """ITK's MetaImage reader prints its own complaints on stderr besides raising."""
    (folder / "odd.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementDataFile = LOCAL\n")
    return ["convert", folder / "odd.mha", folder / "out.nii.gz"], "odd.mha"


def predict_two_cases_onto_one_output(folder):
    """A DICOM series folder 'a' and a file 'a.nii.gz' both make the output a.nii.gz."""
    from UNet3DSegmenterLib.io import write_dicom_series

    write_dicom_series(Volume(np.zeros(SHAPE, np.int16)), folder / "cases" / "a")
    image(folder / "cases", "a.nii.gz")
    return ["predict", "-c", model(folder), "-i", folder / "cases", "-o", folder / "out"], "a.nii.gz"


def training_case_that_is_a_device(folder):
    (folder / "zero.nii").symlink_to("/dev/zero")
    (folder / "list.json").write_text(json.dumps([{"image": "zero.nii", "label": labelmap(folder).name}]))
    return ["train", "--data", folder / "list.json", "--output", folder / "run", "--val-fraction", "0"], "zero.nii"


def dicom_option_for_a_file_output(folder):
    return ["convert", image(folder), folder / "out.nii.gz", "--modality", "CT"], "out.nii.gz"


def input_spacing_for_a_file_that_has_one(folder):
    return ["predict", "-c", model(folder), "-i", image(folder), "-o", folder / "seg.nii.gz",
            "--input-spacing", "1", "1", "1"], "image.nii.gz"


CASES: list[Callable[[Path], tuple[list, str]]] = [
    predict_onto_its_input, predict_onto_a_symlink_of_its_input, predict_onto_a_hard_link_of_its_input,
    predict_a_folder_into_itself, probabilities_onto_the_labelmap, uncertainty_onto_the_probabilities,
    case_pattern_without_a_group, predict_to_a_picture_name,
    evaluate_json_onto_the_reference, convert_onto_its_input, overlay_onto_a_symlink_of_the_prediction,
    ensemble_onto_a_member, nrrd_declaring_gigabytes_raw, nrrd_declaring_gigabytes_gzip, mha_compressed_bomb,
    mha_reading_dev_zero, mha_reading_outside_its_folder, nrrd_reading_outside_its_folder, half_downloaded_nifti,
    nifti_cut_inside_its_header,
    nifti_with_zero_voxel_size, skewed_grid, values_beyond_single_precision, a_device_named_as_a_volume,
    checkpoint_with_a_changed_base_width, checkpoint_with_a_changed_depth, ct_image_as_the_prediction,
    labelmap_3_mm_off, overlay_labelmap_3_mm_off, a_flat_array, datalist_that_is_no_list,
    run_json_with_a_text_format, training_output_that_is_a_file, predict_two_cases_onto_one_output,
    training_case_that_is_a_device, dicom_option_for_a_file_output, input_spacing_for_a_file_that_has_one,
    mha_header_that_itk_cannot_parse,
]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (links as links): its bytes and modification time."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            state[str(path)] = (os.readlink(path).encode(), 0)
        elif path.is_file():
            state[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return state


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_hostile_case_ends_cleanly(case, tmp_path, capfd):
    folder = tmp_path / "work"
    folder.mkdir()
    arguments, culprit = case(folder)
    before = snapshot(tmp_path)
    capfd.readouterr()
    status = main([str(argument) for argument in arguments])
    err = capfd.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert culprit in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a refused command changed or added files"
