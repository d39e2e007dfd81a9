"""``unet3d-segmenter dicom-sort``: DICOM files of many patients and series, mixed in one tree, into one
folder per patient, study and series (see :mod:`UNet3DSegmenterLib.dicom` for the names)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..progress import ProgressBar

_EXAMPLES = """\
The sorted folders are OUTPUT/<patient>/<study date>_<description>/<series number>_<description>/,
each holding one series, which predict, convert and train read as a volume. Files are copied unless
--move is given; files that are not DICOM images are skipped and listed.

examples:
  unet3d-segmenter dicom-sort export/ sorted/ --dry-run     (report only)
  unet3d-segmenter dicom-sort export/ sorted/
  unet3d-segmenter convert sorted/Doe_Jane_123/20240131_CT/002_Abdomen ct.nii.gz
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dicom-sort`` subcommand's arguments."""
    parser.epilog = _EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", type=Path, help="folder whose files, in any subfolders, are sorted")
    parser.add_argument("output", type=Path, help="folder for the sorted series (created; may already hold some)")
    parser.add_argument("--move", action="store_true", help="move the files instead of copying them")
    parser.add_argument("--dry-run", action="store_true", help="report what would be done, write nothing")


def run(args: argparse.Namespace) -> int:
    from ..dicom import sort_dicom

    bars: dict[str, ProgressBar] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            if bars:
                list(bars.values())[-1].close()
            bars[stage] = ProgressBar(f"{stage} files", "files")
        bars[stage].update(done, total)

    try:
        report = sort_dicom(args.input, args.output, move=args.move, dry_run=args.dry_run, progress=progress)
    except UserError:
        if any(bar.interactive for bar in bars.values()):
            print(file=sys.stderr)  # end the bar's line: the error stays one line of its own
        raise
    if bars:
        list(bars.values())[-1].close()
    print("\n".join(report.summary()))
    return 0
