"""A write the disk cuts short is reported in one line and leaves nothing under the output's name.

A full disk is played by a file size limit (RLIMIT_FSIZE) on the command's process, with SIGXFSZ
ignored so that a write past it fails with EFBIG, as one on a full disk fails with ENOSPC.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.volume import Volume

LIMIT = 6000  # bytes: more than any header, less than any of the outputs below


def run_cli_with_file_size_limit(*args) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    return subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", *map(str, args)], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size)


def assert_short_write_refused(result: subprocess.CompletedProcess, output: Path) -> None:
    """Exit 2; one line of error (progress lines may come before it) and none of ITK's own; no output."""
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "wrote" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: cannot write {output}: the write stopped part-way"), errors[0]
    assert "disk is full" in errors[0] and result.stderr.strip().endswith(errors[0])
    assert not output.exists()
    assert not [path for path in output.parent.iterdir() if ".partial" in path.name]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    array = np.random.default_rng(0).normal(100, 10, (10, 48, 48)).astype(np.float32)
    return write_volume(Volume(array, (1.0, 1.0, 1.0)), tmp_path_factory.mktemp("input") / "image.nii.gz")


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz", "out.nrrd", "out.mha", "out.npy", "series"])
def test_convert_on_a_full_disk_says_so(image, tmp_path, name):
    before = image.read_bytes()
    assert_short_write_refused(run_cli_with_file_size_limit("convert", image, tmp_path / name), tmp_path / name)
    assert image.read_bytes() == before


def test_predict_on_a_full_disk_writes_nothing_and_fails(image, model_path, tmp_path):
    """ITK's NIfTI writer only prints 'wrote only N of M bytes' and carries on: the read-back catches it."""
    result = run_cli_with_file_size_limit("predict", "-c", model_path, "-i", image, "-o", tmp_path / "seg.nii")
    assert_short_write_refused(result, tmp_path / "seg.nii")


def test_predict_probabilities_on_a_full_disk_leave_no_empty_file(image, model_path, tmp_path):
    probabilities = tmp_path / "probabilities.nii.gz"
    result = run_cli_with_file_size_limit("predict", "-c", model_path, "-i", image, "-o", tmp_path / "seg.nrrd",
                                          "--probabilities", probabilities)
    assert_short_write_refused(result, probabilities)


def test_ensemble_on_a_full_disk_says_so(model_path, tmp_path):
    """PyTorch's writer reports a short write as an error of its own ('unexpected pos')."""
    output = tmp_path / "ensemble.pt"
    assert_short_write_refused(run_cli_with_file_size_limit("ensemble", model_path, model_path, "-o", output), output)
