"""Names that become paths, and outputs that must never be inputs (paths.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from UNet3DSegmenterLib.datalist import load_datalist
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.paths import check_outputs, safe_file_name
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.training.patches import prepare_cases
from UNet3DSegmenterLib.volume import Volume


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "..", ".", "", "a/../../b", "..\\..\\x",
                                  ".hidden", "name\x00with-nul", "/", "~/home"])
def test_safe_file_name_is_one_harmless_component(name):
    safe = safe_file_name(name)
    assert safe and "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert not safe.startswith(".") and safe not in (".", "..")


def test_safe_file_name_keeps_ordinary_names_and_bounds_length():
    assert safe_file_name("hippocampus_001") == "hippocampus_001"
    assert safe_file_name("Case 7 (left)") == "Case_7_left"
    assert len(safe_file_name("x" * 1000)) == 100


def test_datalist_names_never_place_cache_files_outside_the_cache(tmp_path):
    data, cache, outside = tmp_path / "data", tmp_path / "run" / "cache", tmp_path / "run"
    array = np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32)
    labels = (array > 1).astype(np.uint8)
    write_volume(Volume(array), data / "image.nii.gz")
    write_volume(Volume(labels), data / "label.nii.gz")
    entries = [{"image": "image.nii.gz", "label": "label.nii.gz", "name": name}
               for name in ("../../escaped", str(tmp_path / "absolute"), "..")]
    (data / "list.json").write_text(json.dumps(entries))
    datalist = load_datalist(data / "list.json")
    prepare_cases(datalist.cases, Preprocessing(), [0, 1], cache_dir=cache)
    written = {path for path in tmp_path.rglob("*") if path.is_file()} - set(data.iterdir())
    assert written and all(path.parent == cache for path in written), written
    assert not list(outside.glob("*.npy")) and not list(tmp_path.glob("absolute*"))


def test_an_output_that_is_an_input_by_any_path_is_refused(tmp_path):
    source = tmp_path / "image.nii.gz"
    source.write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(source)
    os.link(source, tmp_path / "hard.nii.gz")
    (tmp_path / "folder").symlink_to(tmp_path, target_is_directory=True)
    for output in (source, tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz", tmp_path / "folder" / "image.nii.gz",
                   tmp_path / "sub" / ".." / "image.nii.gz"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="is an input"):
            check_outputs([output], [source])


def test_two_outputs_that_are_one_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="two outputs are the same file"):
        check_outputs([tmp_path / "seg.nii.gz", tmp_path / "." / "seg.nii.gz"], [])
    check_outputs([tmp_path / "seg.nii.gz", tmp_path / "probabilities.nii.gz", None], [tmp_path / "image.nii.gz"])
