"""Segment options are declared once (segment_options.SegmentOptions): predict's parser, Predictor's keywords,
the checks and the command line of Slicer's background run all come from that declaration."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from UNet3DSegmenterLib.commands import predict
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.segment_options import SegmentOptions

REQUIRED = ["--checkpoint", "model.pt", "--input", "in.nii.gz", "--output", "out.nii.gz"]


def _parse(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return parser.parse_args([*REQUIRED, *arguments])


def test_every_option_is_a_predict_option_with_its_help_choices_and_default():
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    for item in dataclasses.fields(SegmentOptions):
        action = actions[item.name]
        assert action.option_strings == ["--" + item.name.replace("_", "-")]
        assert action.help.startswith(item.metadata["help"])
        assert action.default == item.default
        assert tuple(action.choices or ()) == tuple(item.metadata["choices"] or ())


def test_the_existing_spellings_still_parse():
    args = _parse("--device", "cpu", "--overlap", "0.25", "--tta", "--largest-component", "--batch-size", "3",
                  "--precision", "fp32", "--roi", "1", "2", "3", "4", "5", "6")
    assert SegmentOptions.from_arguments(args) == SegmentOptions(
        device="cpu", overlap=0.25, tta=True, largest_component=True, batch_size=3, precision="fp32",
        roi=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    assert SegmentOptions.from_arguments(_parse()) == SegmentOptions()


@pytest.mark.parametrize("options", [
    SegmentOptions(),
    SegmentOptions(device="cpu", overlap=0.1 + 0.2, tta=True, largest_component=True, precision="bf16",
                   batch_size=5, roi=(-40.25, -30.0, 1e-3, 0.0, 20.5, 10.0)),
    SegmentOptions(overlap=0.0),
])
def test_to_arguments_gives_predict_the_same_options(options):
    """Slicer's background run passes its options to the child this way: nothing may change on the way."""
    assert SegmentOptions.from_arguments(_parse(*options.to_arguments())) == options


def test_an_option_left_at_its_default_is_left_off_the_command_line():
    assert SegmentOptions().to_arguments() == []
    assert SegmentOptions(largest_component=True).to_arguments() == ["--largest-component"]


def test_keywords_take_field_names_and_their_camel_case():
    options = SegmentOptions().with_keywords(largestComponent=True, batch_size=4, batchSize=4, tta=True)
    assert (options.largest_component, options.batch_size, options.tta) == (True, 4, True)
    with pytest.raises(TypeError, match="unknown segment option 'mirror'"):
        SegmentOptions().with_keywords(mirror=True)


@pytest.mark.parametrize("values, message", [
    ({"overlap": 1.0}, "overlap must be at least 0 and below 1"),
    ({"overlap": float("nan")}, "overlap must be at least 0 and below 1"),
    ({"overlap": "0.5"}, "overlap must be a number"),
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"batch_size": 2.5}, "batch size must be at least 1"),
    ({"device": "tpu"}, "unknown device 'tpu': choose one of auto, cpu, cuda, mps"),
    ({"precision": "int8"}, "unknown precision 'int8'"),
    ({"tta": "yes"}, "tta must be True or False"),
    ({"roi": (1.0, 2.0, 3.0)}, "an ROI is six finite numbers"),
    ({"roi": (1.0, 2.0, 3.0, 4.0, 5.0, float("inf"))}, "an ROI is six finite numbers"),
])
def test_a_value_out_of_range_is_one_line_naming_the_option(values, message):
    with pytest.raises(UserError, match=message) as raised:
        SegmentOptions(**values)
    assert "\n" not in str(raised.value)


def test_the_overlap_left_unset_is_the_checkpoints():
    class Recorded:
        overlap = 0.75

    assert SegmentOptions().overlap_for(Recorded()) == 0.75
    assert SegmentOptions(overlap=0.25).overlap_for(Recorded()) == 0.25


def test_the_declaration_imports_no_torch():
    code = ("import sys; from UNet3DSegmenterLib.segment_options import SegmentOptions; "
            "SegmentOptions(roi=(0, 0, 0, 1, 1, 1)).to_arguments(); assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
