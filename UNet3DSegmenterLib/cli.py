"""The command line: ``unet3d-segmenter {predict, evaluate, train, demo, info}``.

A user mistake ends in one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", "-c", required=True, type=Path, help="model checkpoint (.pt)")
    parser.add_argument("--input", "-i", required=True, type=Path,
                        help="a volume file (.nii.gz, .nrrd, .mha), a DICOM series folder, or a folder of volumes")
    parser.add_argument("--output", "-o", required=True, type=Path,
                        help="labelmap file, or a folder when the input is a folder of volumes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1) (default: checkpoint's)")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8x slower)")
    parser.add_argument("--largest-component", action="store_true", help="keep the largest component per class")
    parser.add_argument("--probabilities", type=Path, default=None,
                        help="also write class probabilities (multi-component image; a folder for folder input)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="compute precision (auto: bf16 on CPUs with native bf16, fp16 on CUDA)")
    parser.add_argument("--progress-json", action="store_true",
                        help="print progress as one JSON object per line on stdout (for the Slicer module)")


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="model checkpoint (.pt)")


def _run_predict(args: argparse.Namespace) -> int:
    from .predict_command import run_predict

    return run_predict(args)


def _run_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint

    print(load_checkpoint(args.checkpoint).describe())
    return 0


def _commands() -> dict:
    """name -> (help, add_arguments, run); modules are imported only for the command that runs."""
    from . import demo, evaluate, train_command

    return {
        "predict": ("segment volumes with a checkpoint", _predict_arguments, _run_predict),
        "evaluate": ("Dice, IoU, HD95 and surface distance of predictions against references",
                     evaluate.add_arguments, evaluate.run),
        "train": ("train a model from labelled volumes", train_command.add_arguments, train_command.run),
        "demo": ("train and segment on generated phantoms, end to end", demo.add_arguments, demo.run),
        "info": ("describe a checkpoint in words", _info_arguments, _run_info),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3d-segmenter",
        description="3D U-Net / VNet segmentation of CT and MRI volumes: predict, train, evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in _commands().items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
