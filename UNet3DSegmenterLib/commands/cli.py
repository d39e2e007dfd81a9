"""The command line: ``unet3d-segmenter {predict, train, evaluate, overlay, convert, dicom-sort, ensemble, demo,
info}``.

Each command is a module of this package (``dicom-sort`` is ``dicom_sort``) with ``add_arguments(parser)`` and ``run(args)``; a
command's module (and so torch) is imported only when that command runs, so ``--help`` is quick.
A user mistake ends in one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import UserError
from ..protocol import EXIT_INTERRUPTED, EXIT_USER_ERROR, error_line

# name -> help; the module of the same name in this package implements it.
COMMANDS = {
    "predict": "segment volumes with a checkpoint",
    "train": "train a model from labelled volumes",
    "evaluate": "Dice, IoU, HD95, surface distance and voxel accuracy of predictions against references",
    "overlay": "a picture of image | reference | prediction slices for one case (PNG)",
    "convert": "convert a volume to another format (NIfTI, NRRD, MHA, NumPy, DICOM series)",
    "dicom-sort": "sort mixed DICOM files into one folder per patient, study and series",
    "demo": "train and segment on generated phantoms, end to end",
    "info": "describe a checkpoint in words",
    "ensemble": "join checkpoints (e.g. the folds of a cross-validation) into one ensemble file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3d-segmenter",
        description="3D U-Net / VNet segmentation of CT and MRI volumes: predict, train, evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{name.replace('-', '_')}")
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(error_line(str(error)), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
