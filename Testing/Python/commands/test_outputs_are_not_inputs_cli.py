"""No command writes over a file it reads: the real CLI refuses, with one line, before anything is written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from cli_runs import refused, run_cli

from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.volume import Volume


def fingerprints(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes: what a refused command must leave as it was."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def write_image(path: Path, labels: bool = False) -> Path:
    array = np.random.default_rng(0).normal(100, 10, (12, 14, 16)).astype(np.float32)
    return write_volume(Volume((array > 105).astype(np.uint8) if labels else array), path)


def test_predict_onto_its_own_input_is_refused(model_path, tmp_path):
    image = write_image(tmp_path / "image.nii.gz")
    before = fingerprints(tmp_path)
    refused(run_cli("predict", "-c", model_path, "-i", image, "-o", image), str(image), "is an input")
    assert fingerprints(tmp_path) == before


def test_predict_into_the_input_folder_is_refused(model_path, tmp_path):
    for name in ("a", "b"):
        write_image(tmp_path / "cases" / f"{name}.nrrd")
    before = fingerprints(tmp_path)
    refused(run_cli("predict", "-c", model_path, "-i", tmp_path / "cases", "-o", tmp_path / "cases"),
                   "is an input")
    assert fingerprints(tmp_path) == before


def test_predict_onto_a_symlink_or_hard_link_of_its_input_is_refused(model_path, tmp_path):
    image = write_image(tmp_path / "image.nii.gz")
    (tmp_path / "link.nii.gz").symlink_to(image)
    os.link(image, tmp_path / "hard.nii.gz")
    before = fingerprints(tmp_path)
    for output in ("link.nii.gz", "hard.nii.gz"):
        refused(run_cli("predict", "-c", model_path, "-i", image, "-o", tmp_path / output), "is an input")
    assert fingerprints(tmp_path) == before


def test_predict_onto_its_checkpoint_is_refused(model_path, tmp_path):
    image = write_image(tmp_path / "image.nii.gz")
    (tmp_path / "seg.nii.gz").symlink_to(model_path)
    before = model_path.read_bytes()
    refused(run_cli("predict", "-c", model_path.parent, "-i", image, "-o", tmp_path / "seg.nii.gz"),
                   "is an input", str(model_path))
    assert model_path.read_bytes() == before


def test_probabilities_onto_the_labelmap_are_refused(model_path, tmp_path):
    image = write_image(tmp_path / "image.nii.gz")
    refused(run_cli("predict", "-c", model_path, "-i", image, "-o", tmp_path / "seg.nii.gz",
                           "--probabilities", tmp_path / "seg.nii.gz"), "two outputs are the same file")
    assert not (tmp_path / "seg.nii.gz").exists()


def test_predict_output_with_a_foreign_extension_is_refused(model_path, tmp_path):
    image = write_image(tmp_path / "image.nii.gz")
    refused(run_cli("predict", "-c", model_path, "-i", image, "-o", tmp_path / "seg.png"), "seg.png")
    assert not (tmp_path / "seg.png").exists()


def test_evaluate_json_onto_the_reference_is_refused(tmp_path):
    reference = write_image(tmp_path / "reference.nii.gz", labels=True)
    prediction = write_image(tmp_path / "prediction.nii.gz", labels=True)
    before = fingerprints(tmp_path)
    refused(run_cli("evaluate", "--prediction", prediction, "--reference", reference, "--json", reference),
                   "is an input")
    assert fingerprints(tmp_path) == before


def test_evaluate_json_beside_the_cases_of_a_folder_is_allowed(tmp_path):
    for folder in ("predictions", "references"):
        write_image(tmp_path / folder / "a.nii.gz", labels=True)
    for _ in range(2):  # a second run replaces its own report, which is no input
        result = run_cli("evaluate", "--prediction", tmp_path / "predictions", "--reference", tmp_path / "references",
                         "--json", tmp_path / "references" / "metrics.json")
        assert result.returncode == 0, result.stderr


def test_convert_onto_its_input_is_refused(tmp_path):
    image = write_image(tmp_path / "image.nrrd")
    before = fingerprints(tmp_path)
    refused(run_cli("convert", image, image), "is an input")
    refused(run_cli("convert", image, tmp_path / "." / "image.nrrd"), "is an input")
    assert fingerprints(tmp_path) == before


def test_overlay_onto_an_input_is_refused(tmp_path):
    image = write_image(tmp_path / "image.nii.gz")
    labels = write_image(tmp_path / "labels.nii.gz", labels=True)
    (tmp_path / "picture.png").symlink_to(labels)
    before = fingerprints(tmp_path)
    refused(run_cli("overlay", "-i", image, "-p", labels, "-o", tmp_path / "picture.png"), "is an input")
    assert fingerprints(tmp_path) == before


def test_ensemble_onto_a_member_is_refused(model_path):
    before = model_path.read_bytes()
    refused(run_cli("ensemble", model_path, model_path, "-o", model_path), "is an input")
    assert model_path.read_bytes() == before
