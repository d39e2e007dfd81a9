"""``predict`` over a whole tree of DICOM series (as ``dicom-sort`` makes it): mirrored outputs, ``--series-filter``,
failures by name, a second run that skips what is done, and the cases shared out by ``--shard`` and ``torchrun``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_runs import refused, run_cli
from dicom_series import write_ct_series

from UNet3DSegmenterLib.batch import SeriesFilter, find_cases, share
from UNet3DSegmenterLib.checkpoint import Label
from UNet3DSegmenterLib.dicom import sort_dicom
from UNet3DSegmenterLib.dicom_seg import read_dicom_seg, write_dicom_seg
from UNet3DSegmenterLib.io import read_volume


@pytest.fixture
def sorted_tree(tmp_path) -> Path:
    """An export of four series (three CT of two orientations, one MR) and an earlier SEG, sorted by dicom-sort."""
    export = tmp_path / "export"
    for index, (orientation, modality, description) in enumerate(
            [("axial", "CT", "abdomen portal"), ("oblique", "CT", "abdomen late"), ("axial", "MR", "t1"),
             ("shuffled-files", "CT", "chest")]):
        write_ct_series(export / f"disk{index}", orientation, seed=index, modality=modality, description=description)
    earlier = read_volume(export / "disk0")
    write_dicom_seg(earlier.with_array(np.ones(earlier.shape, np.uint8)), export / "disk0",
                    [Label(1, "liver")], export / "seg" / "earlier.dcm")
    sort_dicom(export, tmp_path / "sorted")
    return tmp_path / "sorted"


def series_below(tree: Path) -> list[str]:
    return sorted(str(path.relative_to(tree)) for path in tree.rglob("*") if path.is_dir() and any(path.glob("*.dcm")))


def test_a_sorted_tree_gives_mirrored_outputs_for_the_series_the_filter_keeps(organ_model, sorted_tree, tmp_path):
    result = run_cli("predict", "-c", organ_model, "-i", sorted_tree, "-o", tmp_path / "out", "--device", "cpu",
                     "--output-format", "dicom-seg", "--series-filter", "modality=ct",
                     "--series-filter", "description=abdomen*")
    assert result.returncode == 0, result.stderr
    written = sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*.dcm"))
    abdomen = [name for name in series_below(sorted_tree) if "abdomen" in name]
    assert len(abdomen) == 2 and written == sorted(name + ".dcm" for name in abdomen)
    for name in abdomen:
        seg = read_dicom_seg(tmp_path / "out" / (name + ".dcm"), grid=read_volume(sorted_tree / name))
        assert seg.labelmap.array.any()


def test_segmentation_series_are_not_segmented(sorted_tree, tmp_path):
    cases = find_cases(sorted_tree, tmp_path / "out")
    assert len(series_below(sorted_tree)) == 5 and len(cases) == 4  # the earlier SEG is left out


def test_a_failing_series_is_named_and_the_rest_go_on(organ_model, sorted_tree, tmp_path):
    chest = next(sorted_tree / name for name in series_below(sorted_tree) if "chest" in name)
    sorted(chest.iterdir())[5].unlink()  # a slice missing: unevenly spaced, refused
    result = run_cli("predict", "-c", organ_model, "-i", sorted_tree, "-o", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 2
    assert f"error: {chest.relative_to(sorted_tree)}: " in result.stderr and "unevenly spaced" in result.stderr
    assert "1 of 4 cases failed" in result.stderr.strip().splitlines()[-1]
    assert len(list((tmp_path / "out").rglob("*.nii.gz"))) == 3


def test_a_second_run_skips_the_cases_already_done(organ_model, sorted_tree, tmp_path):
    command = ["predict", "-c", organ_model, "-i", sorted_tree, "-o", tmp_path / "out", "--device", "cpu"]
    assert run_cli(*command).returncode == 0
    outputs = sorted((tmp_path / "out").rglob("*.nii.gz"))
    before = {path: path.stat().st_mtime_ns for path in outputs}
    outputs[1].unlink()  # as if the run had been cut off before this case
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert "skipped 3 cases already done" in again.stderr and again.stderr.count("wrote ") == 1
    assert all(path.stat().st_mtime_ns == before[path] for path in outputs if path != outputs[1])
    assert outputs[1].exists()


def test_shares_cover_every_case_once():
    cases = list(range(7))
    shares = [share(cases, index, 3) for index in range(3)]  # type: ignore[arg-type]
    assert sorted(case for part in shares for case in part) == cases


def test_shards_together_write_what_one_run_writes(organ_model, sorted_tree, tmp_path):
    one = run_cli("predict", "-c", organ_model, "-i", sorted_tree, "-o", tmp_path / "one", "--device", "cpu")
    assert one.returncode == 0, one.stderr
    for index in range(2):
        part = run_cli("predict", "-c", organ_model, "-i", sorted_tree, "-o", tmp_path / "shards", "--device", "cpu",
                       "--shard", f"{index}/2")
        assert part.returncode == 0 and part.stderr.count("wrote ") == 2, part.stderr
    assert_same_files(tmp_path / "one", tmp_path / "shards")


@pytest.mark.slow
def test_torchrun_shares_the_cases_and_matches_one_process(organ_model, sorted_tree, tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun gives each process: the same sums' order
    one = subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", "predict", "-c", str(organ_model), "-i",
                          str(sorted_tree), "-o", str(tmp_path / "one"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, env=environment)
    assert one.returncode == 0, one.stderr
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "UNet3DSegmenterLib", "predict", "-c", str(organ_model), "-i", str(sorted_tree),
                               "-o", str(tmp_path / "two"), "--device", "cpu"],
                              capture_output=True, text=True, timeout=600, env=environment)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stderr.count("wrote ") == 4  # each case once, over both processes
    assert "share 0/2: 2 of 4 cases" in launched.stderr and "share 1/2: 2 of 4 cases" in launched.stderr
    assert_same_files(tmp_path / "one", tmp_path / "two")


def assert_same_files(first: Path, second: Path) -> None:
    """Both folders hold the same files, byte for byte."""
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert files and files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_series_filter_and_shard_mistakes_are_refused_in_one_line(model_path, sorted_tree, tmp_path):
    base = ["predict", "-c", model_path, "-i", sorted_tree, "-o", tmp_path / "out"]
    refused(run_cli(*base, "--series-filter", "colour=red"), "--series-filter", "modality")
    refused(run_cli(*base, "--series-filter", "modality=PT"), "no series", "modality=PT")
    refused(run_cli(*base, "--shard", "2/2"), "--shard", "0 <= i < N")
    series = sorted_tree / series_below(sorted_tree)[0]
    refused(run_cli("predict", "-c", model_path, "-i", series, "-o", tmp_path / "x.nii.gz", "--series-filter",
                    "modality=CT"), "--series-filter", "one volume")
    assert not (tmp_path / "out").exists()


def test_series_filter_patterns_ignore_case():
    kept = SeriesFilter.parse(["modality=ct", "description=*PORTAL*"])
    assert kept.accepts("CT", "Abdomen portal venous") and not kept.accepts("MR", "portal")


def test_tree_options_are_segment_options_that_survive_the_command_line():
    import argparse

    from UNet3DSegmenterLib.commands import predict
    from UNet3DSegmenterLib.errors import UserError
    from UNet3DSegmenterLib.segment_options import SegmentOptions

    options = SegmentOptions(output_format="dicom-seg", series_filter=["modality=CT", "description=*a b*"], shard="1/4")
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    args = parser.parse_args(["-c", "m.pt", "-i", "in", "-o", "out", *options.to_arguments()])
    assert SegmentOptions.from_arguments(args) == options and options.series_filter == ("modality=CT", "description=*a b*")
    for wrong in ({"shard": "4/4"}, {"series_filter": ["size=big"]}, {"output_format": "png"}):
        with pytest.raises(UserError):
            SegmentOptions(**wrong)
